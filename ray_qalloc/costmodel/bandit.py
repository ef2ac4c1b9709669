"""A policy that learns from its rewards: Thompson sampling over the cost model's residuals.

Why a bandit on top of the model, and why this one:

* Placement's reward is already defined: the selector minimises ``log(completion) −
  w_f·log(fidelity) + w_m·cost`` (``placement.pipeline``). What it does not know is how wrong
  the model is *for this kind of circuit on this backend*. So the arms are the backends (a
  pool's (method, threads) variant or a QPU), the context is a coarse **feature bucket** of the
  job (width band × Clifford / shallow-cut / entangling: what decides which method wins), and
  the bandit learns, per (backend, bucket), the distribution of log(actual / predicted)
  runtime and, where a measured fidelity comes back, of log(measured / estimated) fidelity.
  The reward of a pick is then the selector's objective evaluated on what was measured; the
  bandit never needs its own notion of "good".
* **Thompson sampling**, applied at plan time (enqueue): each estimate a plan is made with is
  scaled by a draw from its cell's posterior. Dispatch stays arithmetic over those numbers
  (``LiveView.weigh`` never sees the bandit). A well-measured cell draws close to its mean, a
  little-measured one wide: exploration goes where the model is uncertain, not at a fixed rate.
* **Drift** (why the first version lost to the plain correction, measured on
  ``benchmarks.learning``): (1) most jobs of a workload that repeats circuits are answered by
  run memory, which that version neither scaled nor learned from, so after a backend got
  slower its remembered runtimes kept sending jobs there (two thirds of the post-drift
  regret); (2) one discounted cell per (backend, bucket) re-learned a backend-wide drift once
  per bucket, each bucket having seen a few runs. Now:
  - a residual is a backend **level** plus a context **offset** (hierarchical: a bucket's
    offset is pooled toward zero until it has ``offset_weight`` runs of its own); the level
    follows the backend's recent runs (``level_keep``), the offsets what the model gets wrong
    per kind of circuit (``offset_keep``);
  - run memory's exact answers are a context of their own, and their residuals (the same
    circuit on the same backend, normally ~0) feed a **change detector** (two-sided CUSUM,
    at least ``change_min_runs`` runs): at a change the level is rebased by the shift, and
    the runtimes this bandit saw of each circuit are worth ``exp(median − shift then +
    shift now)``, so stale memories are moved at once. Model residuals do not feed it: they
    vary by circuit more than any drift;
  - run memory's neighbour answers (a similar circuit's measured ratio applied to the model)
    are a context of their own too: the model's residual is already in them, and adding the
    level on top made them 10-30× pessimistic;
  - idle evidence still decays (``discount`` per observation anywhere) in the variance only,
    so an arm left alone is retried.

Bounds (the issue: "never exploring for emergency or deadline jobs, and bounded in what
exploration may cost"):

* emergency jobs and jobs with a deadline get the posterior **mean** (no draw);
* a draw is clipped to ``±log(explore_factor)`` around the mean: an arm can look at most that
  factor better than the bandit believes, so an exploratory pick costs at most that factor in
  expected runtime (the same bound as the model's fixed-rate exploration);
* an exploration **budget**: when the draws change the zero-wait argmin of the objective, the
  expected extra objective (mean of the drawn pick − mean of the greedy pick, in log units ≈
  relative runtime) is charged; once the charges exceed ``budget_per_job`` × jobs planned (plus
  ``budget_burst``), plans use the means until the budget has grown again.

Run memory's bounds (``memory:censored``, ``memory:bounded``) are neither scaled nor learned
from; its exact answers are moved by detected changes and never drawn on (a measurement's
spread is run-to-run noise: a draw would explore nothing).

State is a small table of cells (``snapshot``/``restore``, persisted by ``BanditStore``); it
survives allocator restarts and model swaps (on a swap the evidence is thinned by
``swap_keep``: residuals of the old model say something, not everything, about the new one).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.placement.model import BackendView, Estimate, JobView

RUNTIME = "rt"
FIDELITY = "fid"
ANY_BUCKET = "*"             # a backend's level cell
MEMORY = "memory"            # the context of run memory's exact answers
NEIGHBOUR = "neighbour"      # ... of its answers lent by a similar circuit (already corrected)
_MEMORY_EXACT = ("memory:exact",)
_MEMORY_BOUNDS = ("memory:censored", "memory:bounded")
_CLIP = 3.0                  # residuals beyond ×20 are clipped (as the model's online correction)
_SHIFT = "~shift"            # persisted row of a backend's detected shift (not a cell)
_MEMORY_SD = 0.15            # run-to-run spread of a remembered runtime (memory.EXACT_LOG_SD)
_MIN_SD = 0.05
_SHOWN_SIZE = 8192
SNAPSHOT_VERSION = 2


def bucket_of(job: JobView) -> str:
    """The job's context: width band × structure. Why these: width decides statevector cost
    (2ⁿ), the Clifford share decides whether the stabilizer method applies, and the busiest
    cut bounds the MPS bond dimension (2^cut): the three things a model's error follows."""
    n = int(job.num_qubits)
    width = "w<=8" if n <= 8 else "w<=14" if n <= 14 else "w<=20" if n <= 20 else "w>20"
    f = job.features
    cf = f.get("clifford_fraction")
    if cf is not None and cf == cf and cf >= 0.999:
        shape = "clifford"
    else:
        cut = f.get("cut_max")
        shape = "shallow" if cut is not None and cut == cut and cut <= 4 else "entangling"
    return f"{width}:{shape}"


@dataclass
class Cell:
    """Discounted evidence on one quantity: weighted count, mean, squared spread, and the global
    step of its last update (how long it has been idle)."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    step: int = 0

    def add(self, x: float, step: int, keep: float) -> None:
        """One observation; earlier evidence first kept at ``keep`` (a discount per observation
        of this cell: what makes its mean follow a drift)."""
        n, m2 = self.n * keep, self.m2 * keep
        n1 = n + 1.0
        delta = x - self.mean
        mean1 = self.mean + delta / n1
        self.n, self.mean, self.m2, self.step = n1, mean1, m2 + delta * (x - mean1), step

    def idle(self, step: int, discount: float) -> float:
        """Share of the evidence still trusted after ``step - self.step`` observations elsewhere."""
        return discount ** max(step - self.step, 0)


@dataclass(frozen=True)
class Posterior:
    mean: float      # of the residual's mean
    sd: float        # of that mean (what a draw varies by)
    n: float         # evidence behind it (discounted)


@dataclass
class _Cusum:
    """Two-sided CUSUM of one backend's standardised surprises, with the surprises of the
    excursion in progress on each side (their mean is the shift declared at a change)."""

    up: float = 0.0
    down: float = 0.0
    up_sum: float = 0.0
    up_runs: int = 0
    down_sum: float = 0.0
    down_runs: int = 0

    def add(self, u: float, z: float, slack: float) -> None:
        up = self.up + z - slack
        if up <= 0.0:
            self.up, self.up_sum, self.up_runs = 0.0, 0.0, 0
        else:
            self.up, self.up_sum, self.up_runs = up, self.up_sum + u, self.up_runs + 1
        down = self.down - z - slack
        if down <= 0.0:
            self.down, self.down_sum, self.down_runs = 0.0, 0.0, 0
        else:
            self.down, self.down_sum, self.down_runs = down, self.down_sum + u, self.down_runs + 1

    def change(self, threshold: float, min_runs: int) -> float | None:
        """The shift (mean surprise of the excursion) once one side passed the threshold."""
        if self.up > threshold and self.up_runs >= min_runs:
            return self.up_sum / self.up_runs
        if self.down > threshold and self.down_runs >= min_runs:
            return self.down_sum / self.down_runs
        return None


@dataclass
class BanditConfig:
    """Knobs (typed settings: ``Settings.learning``)."""

    discount: float = 0.99          # per observation anywhere: an idle cell's evidence half-life ≈ 69
    level_keep: float = 0.95        # a backend's level: evidence kept per observation of it (≈ last 20)
    offset_keep: float = 0.99       # a context's offset from its level: per observation (≈ last 100)
    change_slack: float = 0.5       # change detection (CUSUM): surprises under this many sd are noise
    change_threshold: float = 5.0   # ... a change once the excess sums past this many sd
    change_min_runs: int = 2        # ... over at least this many runs (one outlier is no change)
    explore_factor: float = 4.0     # a draw moves an estimate at most this factor from the mean
    budget_per_job: float = 0.05    # expected extra log-objective exploration may cost, per job
    budget_burst: float = 2.0       # ... plus this much up front
    prior_weight: float = 1.0       # pseudo-observations of "no residual" behind a level
    offset_weight: float = 10.0     # ... behind a context's offset: pooled toward the level until
                                    #     the context has about this many runs of its own
    swap_keep: float = 0.5          # evidence kept when the model is swapped
    seed: int = 0


class ResidualBandit:
    """Posteriors of the model's log residuals per (backend, context) as a backend **level** plus
    a context **offset**; draws and learns.

    Why two parts (the previous design kept one discounted cell per (backend, bucket) and lost
    to the plain correction on a drifting workload): a backend that gets slower gets slower *for
    every circuit*, and its buckets each saw a few dozen runs, so a per-bucket cell re-learned
    the drift once per bucket, each after as many runs as it had evidence. Here the level
    (``*`` cell: recent runs of the backend, ``level_keep``) follows a drift within a few runs
    of any kind, and the offsets (slow, ``offset_keep``) keep what the model gets wrong per kind
    of circuit; a new context starts at its backend's level. Run memory's exact answers are a
    context of their own (``memory``): normally their residual is ~0, but after a drift they are
    as stale as the model, and most jobs of a workload that repeats circuits are answered by
    memory; the level moves them too.
    """

    def __init__(self, config: BanditConfig | None = None) -> None:
        self.config = config or BanditConfig()
        self._rng = random.Random(self.config.seed)
        self.cells: dict[tuple[str, str, str], Cell] = {}
        self.shifts: dict[tuple[str, str], float] = {}    # (kind, backend) -> sum of detected changes
        self._cusum: dict[tuple[str, str], _Cusum] = {}   # not persisted: a restart forgets a half-seen change
        self.changes = 0
        self.step = 0
        self.jobs = 0
        self.spent = 0.0
        self.explored = 0       # plans whose draws changed the zero-wait choice
        self.held_back = 0      # plans that would have explored but the budget was spent
        self.observations = 0

    # -- posteriors ----------------------------------------------------------------------------
    def _part(self, cell: Cell | None, spread2: float, k0: float | None = None) -> tuple[float, float, float, float]:
        """(mean, variance of the mean, residual spread², evidence) of one cell on a zero-mean
        prior of weight ``k0`` (``prior_weight``) and spread² ``spread2``. Idle evidence widens
        the variance only: the belief stays, the confidence fades (so an arm left alone is retried)."""
        k0 = self.config.prior_weight if k0 is None else k0
        if cell is None or cell.n <= 0.0:
            return 0.0, spread2 / k0, spread2, 0.0
        n = cell.n
        mean = n * cell.mean / (k0 + n)
        s2 = (cell.m2 + k0 * spread2) / (k0 + n)
        var = s2 / (k0 + n * cell.idle(self.step, self.config.discount))
        return mean, var, s2, n

    def posterior(self, kind: str, backend: str, bucket: str, prior_sd: float) -> Posterior:
        """Normal posterior of the mean residual: the backend's level plus the context's offset
        (the level alone for ``ANY_BUCKET``), on a zero-mean prior with the estimate's own
        spread ``prior_sd``."""
        if bucket == MEMORY:
            mean, var, _, n = self._part(self.cells.get((kind, backend, MEMORY)), _MEMORY_SD ** 2)
            return Posterior(mean, math.sqrt(var), n)
        if bucket == NEIGHBOUR:
            s0 = max(prior_sd, _MIN_SD)
            mean, var, _, n = self._part(self.cells.get((kind, backend, NEIGHBOUR)), s0 * s0)
            return Posterior(mean, math.sqrt(var), n)
        s0 = max(prior_sd, _MIN_SD)
        lmean, lvar, ls2, ln = self._part(self.cells.get((kind, backend, ANY_BUCKET)), s0 * s0)
        if bucket == ANY_BUCKET:
            return Posterior(lmean, math.sqrt(lvar), ln)
        omean, ovar, _, on = self._part(self.cells.get((kind, backend, bucket)), ls2, self.config.offset_weight)
        return Posterior(lmean + omean, math.sqrt(lvar + ovar), on)

    def draw(self, post: Posterior, explore: bool) -> float:
        if not explore or post.sd <= 0.0:
            return post.mean
        bound = math.log(max(self.config.explore_factor, 1.0))
        x = self._rng.gauss(post.mean, post.sd)
        return min(max(x, post.mean - bound), post.mean + bound)

    def learn(self, kind: str, backend: str, bucket: str, residual: float) -> None:
        """One observed log residual (actual / the estimate before the bandit; for ``MEMORY``,
        actual / the drift-corrected remembered runtime). A model context: the level learns it
        less the context's offset, the offset learns it less the level (both as they were).
        Only ``MEMORY`` residuals feed the change detector: the same circuit on the same backend
        taking another time is a change of the backend; a model's residuals vary from circuit
        to circuit by more than a drift (×20 on one family, ×0.1 on the next), and a detector
        fed with them fires on the workload's mix (measured: 6 false changes in 200 runs)."""
        if not math.isfinite(residual):
            return
        x = min(max(residual, -_CLIP), _CLIP)
        if kind == RUNTIME:
            self.step += 1
        self.observations += 1
        c = self.config
        if bucket == MEMORY:
            cell = self.cells.setdefault((kind, backend, MEMORY), Cell())
            mean, _, s2, _ = self._part(cell, _MEMORY_SD ** 2)
            cell.add(x, self.step, c.offset_keep)
            self._detect(kind, backend, x - mean, max(math.sqrt(s2), _MEMORY_SD))
            return
        if bucket == NEIGHBOUR:
            self.cells.setdefault((kind, backend, NEIGHBOUR), Cell()).add(x, self.step, c.level_keep)
            return
        level = self.cells.setdefault((kind, backend, ANY_BUCKET), Cell())
        lmean, _, ls2, _ = self._part(level, 0.25)
        if bucket == ANY_BUCKET:
            level.add(x, self.step, c.level_keep)
            return
        offset = self.cells.setdefault((kind, backend, bucket), Cell())
        omean = self._part(offset, ls2, c.offset_weight)[0]
        level.add(x - omean, self.step, c.level_keep)
        offset.add(x - lmean, self.step, c.offset_keep)

    def _detect(self, kind: str, backend: str, surprise: float, spread: float) -> None:
        """CUSUM on the backend's surprises; at a change, rebase its level by the shift and add
        the shift to what its remembered runtimes are corrected by."""
        c = self.config
        cusum = self._cusum.setdefault((kind, backend), _Cusum())
        cusum.add(surprise, surprise / spread, c.change_slack)
        delta = cusum.change(c.change_threshold, c.change_min_runs)
        if delta is None:
            return
        self._cusum[(kind, backend)] = _Cusum()
        self.changes += 1
        level = self.cells.setdefault((kind, backend, ANY_BUCKET), Cell())
        level.mean += delta
        few = min(level.n, float(c.change_min_runs))     # the new level is known from a few runs
        level.m2 *= few / level.n if level.n > 0 else 0.0
        level.n = few
        self.shifts[(kind, backend)] = self.shifts.get((kind, backend), 0.0) + delta

    def shift(self, kind: str, backend: str) -> float:
        """Sum of the changes detected on ``backend`` (log units): remembered runtimes measured
        before them are scaled by what came after."""
        return self.shifts.get((kind, backend), 0.0)

    def on_model_swap(self) -> None:
        """A new model: what was learned of the old one's residuals is thinned, not dropped."""
        keep = min(max(self.config.swap_keep, 0.0), 1.0)
        for cell in self.cells.values():
            cell.n *= keep
            cell.m2 *= keep

    # -- the budget ------------------------------------------------------------------------------
    def may_explore(self, cost: float) -> bool:
        """Charge ``cost`` (expected extra log-objective) if the budget allows it."""
        c = self.config
        if self.spent + cost > c.budget_burst + c.budget_per_job * self.jobs:
            self.held_back += 1
            return False
        self.spent += cost
        self.explored += 1
        return True

    # -- persistence -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"version": SNAPSHOT_VERSION, "step": self.step, "jobs": self.jobs, "spent": self.spent,
                "explored": self.explored, "held_back": self.held_back, "observations": self.observations,
                "changes": self.changes,
                "cells": [[k, b, u, c.n, c.mean, c.m2, c.step] for (k, b, u), c in self.cells.items()]
                + [[k, b, _SHIFT, 0.0, v, 0.0, self.step] for (k, b), v in self.shifts.items()]}

    def restore(self, snap: Mapping[str, Any]) -> None:
        """Load a snapshot; a version-1 one (a cell per (backend, bucket) holding the whole
        residual) becomes levels and offsets (bucket mean less its backend's)."""
        version = int(snap.get("version", 0))
        if version not in (1, SNAPSHOT_VERSION):
            return
        self.step = int(snap.get("step", 0))
        self.jobs = int(snap.get("jobs", 0))
        self.spent = float(snap.get("spent", 0.0))
        self.explored = int(snap.get("explored", 0))
        self.held_back = int(snap.get("held_back", 0))
        self.observations = int(snap.get("observations", 0))
        self.changes = int(snap.get("changes", 0))
        rows = list(snap.get("cells", []))
        self.shifts = {(str(k), str(b)): float(m) for k, b, u, n, m, m2, s in rows if u == _SHIFT}
        self.cells = {(str(k), str(b), str(u)): Cell(float(n), float(m), float(m2), int(s))
                      for k, b, u, n, m, m2, s in rows if u != _SHIFT}
        if version == 1:
            for (k, b, u), cell in self.cells.items():
                level = self.cells.get((k, b, ANY_BUCKET))
                if u != ANY_BUCKET and level is not None:
                    cell.mean -= level.mean

    def stats(self) -> dict[str, Any]:
        return {"cells": len(self.cells), "observations": self.observations, "jobs": self.jobs,
                "explored": self.explored, "held_back": self.held_back, "spent": round(self.spent, 4),
                "budget": round(self.config.budget_burst + self.config.budget_per_job * self.jobs, 4),
                "changes": self.changes, "shifts": {f"{k}:{b}": round(v, 3) for (k, b), v in self.shifts.items()}}


def _context(source: str, bucket: str) -> str:
    """Which residual an estimate's runtime carries: run memory's own measurement of this
    circuit (``MEMORY``), a neighbour's measured ratio already applied to the model
    (``NEIGHBOUR``: the model's residual must not be added twice), or the model's (``bucket``)."""
    if source in _MEMORY_EXACT:
        return MEMORY
    if source.startswith("memory:neighbour"):
        return NEIGHBOUR
    return bucket


@dataclass(frozen=True)
class _Shown:
    context: str             # what the runtime residual is learned under (bucket, or MEMORY)
    bucket: str              # the job's feature bucket (fidelity residuals)
    base_runtime: float      # the inner predictor's runtime (what observe/remember forward)
    base_fidelity: float
    reference: float         # the runtime the residual is taken against (MEMORY: drift-corrected)


class _Runs:
    """The runtimes this bandit saw of each (backend, circuit), less the backend's detected shift
    at the time: after a change, a remembered runtime is worth ``exp(median + shift now)``.
    Why here and not in run memory: memory's median of the last runs mixes runs from before and
    after a change for several runs of each circuit; only the detector knows which were which.
    Bounded like run memory (LRU entries × its last ``MAX_OBSERVATIONS``)."""

    def __init__(self, max_entries: int) -> None:
        from ray_qalloc.costmodel.memory import MAX_OBSERVATIONS

        self.max_entries = max_entries
        self.keep = MAX_OBSERVATIONS
        self._runs: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def add(self, backend: str, key: str, log_seconds: float) -> None:
        runs = self._runs.get((backend, key))
        if runs is None:
            runs = self._runs[(backend, key)] = deque(maxlen=self.keep)
            while len(self._runs) > self.max_entries:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end((backend, key))
        runs.append(log_seconds)

    def normalised(self, backend: str, key: str | None) -> float | None:
        runs = self._runs.get((backend, key)) if key is not None else None
        return statistics.median(runs) if runs else None


class BanditPredictor:
    """A Predictor: the inner predictor's estimates, scaled by Thompson draws (see module doc).

    ``observe``/``remember`` map a shown runtime back to the inner predictor's own, as
    ``MemoryPredictor`` does for its overrides, so the layers below learn against numbers they
    made. Everything else (``source``, ``memory``, ``explore_factor`` ...) is the inner's.
    """

    def __init__(self, base: Any, bandit: ResidualBandit, weights: Any = None,
                 max_entries: int = 20_000) -> None:
        self.base = base
        self.bandit = bandit
        self.weights = weights
        self._shown: OrderedDict[tuple[str, float], _Shown] = OrderedDict()
        self._runs = _Runs(max_entries)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "bandit", "weights", "_shown", "_runs"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        estimates = self.base.predict(job, backends)
        return self.adjust(job, estimates)

    def _reference(self, job: JobView, e: Estimate) -> float:
        """What a residual is taken against: the inner estimate, or for run memory's exact
        answer the runtimes this bandit saw of the circuit, moved by the changes since."""
        if e.source not in _MEMORY_EXACT:
            return e.runtime_s
        shift = self.bandit.shift(RUNTIME, e.backend)
        if shift == 0.0:
            return e.runtime_s
        median = self._runs.normalised(e.backend, job.circuit_key)
        # runs this bandit did not see (neither is persisted; a restart empties both): when they
        # were measured is unknown, so memory's answer stands
        return math.exp(median + shift) if median is not None else e.runtime_s

    def adjust(self, job: JobView, estimates: Sequence[Estimate]) -> list[Estimate]:
        """Estimates with posterior means (greedy) or draws (exploring) applied."""
        bandit = self.bandit
        bandit.jobs += 1
        bucket = bucket_of(job)
        explore = job.priority != "emergency" and job.deadline_s is None
        context = {e.backend: _context(e.source, bucket) for e in estimates if e.source not in _MEMORY_BOUNDS}
        if not context:
            return list(estimates)
        ref = {e.backend: self._reference(job, e) for e in estimates if e.backend in context}
        base = [replace(e, runtime_s=ref[e.backend]) if e.backend in ref else e for e in estimates]
        mean_rt: dict[str, tuple[float, float]] = {}
        draw_rt: dict[str, tuple[float, float]] = {}
        for e in base:
            if e.backend not in context:
                continue
            prt = bandit.posterior(RUNTIME, e.backend, context[e.backend], e.log_sd)
            pf = bandit.posterior(FIDELITY, e.backend, bucket, 0.1) if e.fidelity < 1.0 else None
            mean_rt[e.backend] = (prt.mean, pf.mean if pf else 0.0)
            # a remembered runtime of this very circuit is a measurement, not a model's guess:
            # its spread is run-to-run noise, and a draw on it would explore nothing
            draw_rt[e.backend] = ((bandit.draw(prt, context[e.backend] != MEMORY),
                                   bandit.draw(pf, True) if pf else 0.0)
                                  if explore else mean_rt[e.backend])
        use = mean_rt
        if explore and len(base) > 1:
            greedy = self._objectives(job, base, mean_rt)
            drawn = self._objectives(job, base, draw_rt)
            g, d = min(greedy, key=greedy.__getitem__), min(drawn, key=drawn.__getitem__)
            if g == d or bandit.may_explore(greedy[d] - greedy[g]):
                use = draw_rt
        out = []
        for e, b in zip(estimates, base):
            shift = use.get(e.backend)
            if shift is None:
                out.append(e)
                continue
            rt = b.runtime_s * math.exp(shift[0])
            fid = min(max(e.fidelity * math.exp(shift[1]), 0.0), 1.0)
            cost = e.cost * rt / e.runtime_s if e.cost and e.runtime_s > 0 else e.cost
            self._note(e.backend, rt, _Shown(context[e.backend], bucket, e.runtime_s, e.fidelity, b.runtime_s))
            out.append(replace(e, runtime_s=rt, fidelity=fid, cost=cost, source=f"{e.source}:ts"))
        return out

    def _objectives(self, job: JobView, estimates: Sequence[Estimate],
                    shifts: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        """The selector's zero-wait objective per backend under ``shifts`` (pipeline.select's terms)."""
        from ray_qalloc.placement.pipeline import DEFAULT_WEIGHTS, expected_runtime

        table = self.weights or DEFAULT_WEIGHTS
        w = table.of(job.priority)
        wf = w.fidelity * (table.quantum_fidelity_factor if job.intent == "quantum" else 1.0)
        out = {}
        for e in estimates:
            s = shifts.get(e.backend, (0.0, 0.0))
            rt = expected_runtime(e.runtime_s * math.exp(s[0]), e.log_sd)
            fid = min(max(e.fidelity * math.exp(s[1]), 1e-9), 1.0)
            out[e.backend] = math.log(max(rt, 1e-6)) - wf * math.log(fid) + w.money * e.cost * math.exp(s[0])
        return out

    def _note(self, backend: str, shown: float, what: _Shown) -> None:
        self._shown[(backend, shown)] = what
        self._shown.move_to_end((backend, shown))
        while len(self._shown) > _SHOWN_SIZE:
            self._shown.popitem(last=False)

    # -- learning ------------------------------------------------------------------------------
    def observe(self, backend: str, predicted_s: float, actual_s: float) -> None:
        """A completed run: learn the residual against the reference, forward to the inner."""
        seen = self._shown.get((backend, predicted_s))
        base_pred = seen.base_runtime if seen is not None else predicted_s
        if seen is not None and seen.reference > 0 and actual_s > 0 and math.isfinite(actual_s):
            self.bandit.learn(RUNTIME, backend, seen.context, math.log(actual_s / seen.reference))
        observe = getattr(self.base, "observe", None)
        if observe is not None:
            observe(backend, base_pred, actual_s)

    def observe_fidelity(self, backend: str, predicted_s: float, measured: float) -> None:
        """A measured fidelity of a run (a QPU's): learn log(measured / estimated)."""
        seen = self._shown.get((backend, predicted_s))
        if seen is None or not (measured > 0 and seen.base_fidelity > 0):
            return
        self.bandit.learn(FIDELITY, backend, seen.bucket, math.log(measured / seen.base_fidelity))

    def remember(self, job: JobView, spec: Any, seconds: float, *, censored: bool = False,
                 predicted_s: float | None = None) -> None:
        if not censored and seconds > 0 and math.isfinite(seconds) and job.circuit_key is not None \
                and getattr(spec, "kind", None) == "simulator":
            self._runs.add(spec.name, job.circuit_key, math.log(seconds) - self.bandit.shift(RUNTIME, spec.name))
        remember = getattr(self.base, "remember", None)
        if remember is None:
            return
        if predicted_s is not None:
            seen = self._shown.get((spec.name, predicted_s))
            predicted_s = seen.base_runtime if seen is not None else predicted_s
        remember(job, spec, seconds, censored=censored, predicted_s=predicted_s)


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------

metadata = sa.MetaData()

bandit_cells = sa.Table(
    "qalloc_bandit_cells", metadata,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("backend", sa.String(200), primary_key=True),
    sa.Column("bucket", sa.String(64), primary_key=True),
    sa.Column("n", sa.Float, nullable=False),
    sa.Column("mean", sa.Float, nullable=False),
    sa.Column("m2", sa.Float, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
)

bandit_meta = sa.Table(
    "qalloc_bandit_meta", metadata,
    sa.Column("key", sa.String(32), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("saved_at", sa.Float, nullable=False),
)

_META_KEYS = ("version", "step", "jobs", "spent", "explored", "held_back", "observations", "changes")


class BanditStore:
    """The bandit's cells in the job store's database (SQLite or PostgreSQL): one transaction
    replaces the whole table (a few hundred rows), so a crash leaves the last complete save."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine, checkfirst=True)

    def save(self, snap: Mapping[str, Any], now: float | None = None) -> int:
        now = time.time() if now is None else now
        rows = [{"kind": k, "backend": b, "bucket": u, "n": n, "mean": m, "m2": m2, "step": s}
                for k, b, u, n, m, m2, s in snap.get("cells", [])]
        with self.engine.begin() as conn:
            conn.execute(bandit_cells.delete())
            conn.execute(bandit_meta.delete())
            if rows:
                conn.execute(bandit_cells.insert(), rows)
            conn.execute(bandit_meta.insert(), [{"key": k, "value": float(snap.get(k, 0) or 0), "saved_at": now}
                                                for k in _META_KEYS])
        return len(rows)

    def load(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            meta = {r.key: r.value for r in conn.execute(sa.select(bandit_meta))}
            if not meta:
                return None
            cells = [[r.kind, r.backend, r.bucket, r.n, r.mean, r.m2, r.step]
                     for r in conn.execute(sa.select(bandit_cells))]
        return {**{k: meta.get(k, 0) for k in _META_KEYS}, "cells": cells}


def cells_table(bandit: ResidualBandit, kinds: Iterable[str] = (RUNTIME, FIDELITY)) -> list[dict[str, Any]]:
    """What the bandit believes, per cell (for ``qalloc model bandit`` and the benchmark's JSON):
    ``mean_log_residual``/``factor`` are the posterior (a bucket's: its backend's level plus its
    offset), ``part`` says which (level, offset, memory, neighbour)."""
    parts = {ANY_BUCKET: "level", MEMORY: "memory", NEIGHBOUR: "neighbour"}
    out = []
    for (k, b, u), c in sorted(bandit.cells.items()):
        if k not in kinds:
            continue
        post = bandit.posterior(k, b, u, 0.5)
        out.append({"kind": k, "backend": b, "bucket": u, "part": parts.get(u, "offset"), "n": round(c.n, 2),
                    "mean_log_residual": round(post.mean, 4), "factor": round(math.exp(post.mean), 4),
                    "sd": round(math.sqrt(c.m2 / c.n), 4) if c.n > 1 else None,
                    "shift": round(bandit.shift(k, b), 4)})
    return out


__all__ = ["BanditConfig", "BanditPredictor", "BanditStore", "Cell", "Posterior", "ResidualBandit", "bucket_of",
           "cells_table", "RUNTIME", "FIDELITY", "MEMORY", "NEIGHBOUR"]
