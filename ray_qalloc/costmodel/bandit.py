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
* **Drift**: every cell's evidence decays by ``discount`` per observation anywhere (discounted
  Thompson sampling), so a cell nobody chose for a while regains uncertainty and is tried
  again; a backend that got slower is measured slower within a few runs.
* A bucket cell starts from its backend's pooled cell (one pseudo-observation), so a new
  bucket inherits what the backend taught elsewhere.

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

Run memory's exact answers (``memory:exact``, ``memory:censored``, ``memory:bounded``) are
measurements of this very circuit: they are neither scaled nor learned from.

State is a small table of cells (``snapshot``/``restore``, persisted by ``BanditStore``); it
survives allocator restarts and model swaps (on a swap the evidence is thinned by
``swap_keep``: residuals of the old model say something, not everything, about the new one).
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.placement.model import BackendView, Estimate, JobView

RUNTIME = "rt"
FIDELITY = "fid"
ANY_BUCKET = "*"
_MEMORY_EXACT = ("memory:exact", "memory:censored", "memory:bounded")
_CLIP = 3.0                  # residuals beyond ×20 are clipped (as the model's online correction)
_SHOWN_SIZE = 8192
SNAPSHOT_VERSION = 1


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
    """Discounted evidence on one (kind, backend, bucket): weighted count, mean, squared spread."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    step: int = 0

    def at(self, step: int, discount: float) -> tuple[float, float, float]:
        """(n, mean, m2) decayed to ``step``."""
        if self.n <= 0.0:
            return 0.0, 0.0, 0.0
        f = discount ** max(step - self.step, 0)
        return self.n * f, self.mean, self.m2 * f

    def add(self, x: float, step: int, discount: float) -> None:
        n, mean, m2 = self.at(step, discount)
        n1 = n + 1.0
        delta = x - mean
        mean1 = mean + delta / n1
        self.n, self.mean, self.m2, self.step = n1, mean1, m2 + delta * (x - mean1), step


@dataclass(frozen=True)
class Posterior:
    mean: float      # of the residual's mean
    sd: float        # of that mean (what a draw varies by)
    n: float         # evidence behind it (discounted)


@dataclass
class BanditConfig:
    """Knobs (typed settings: ``Settings.learning``)."""

    discount: float = 0.99          # per observation: evidence half-life ≈ 69 observations
    explore_factor: float = 4.0     # a draw moves an estimate at most this factor from the mean
    budget_per_job: float = 0.05    # expected extra log-objective exploration may cost, per job
    budget_burst: float = 2.0       # ... plus this much up front
    prior_weight: float = 1.0       # pseudo-observations a cell borrows from its backend's pool
    swap_keep: float = 0.5          # evidence kept when the model is swapped
    seed: int = 0


class ResidualBandit:
    """Per (backend, bucket) posteriors of the model's log residuals; draws and learns."""

    def __init__(self, config: BanditConfig | None = None) -> None:
        self.config = config or BanditConfig()
        self._rng = random.Random(self.config.seed)
        self.cells: dict[tuple[str, str, str], Cell] = {}
        self.step = 0
        self.jobs = 0
        self.spent = 0.0
        self.explored = 0       # plans whose draws changed the zero-wait choice
        self.held_back = 0      # plans that would have explored but the budget was spent
        self.observations = 0

    # -- posteriors ----------------------------------------------------------------------------
    def posterior(self, kind: str, backend: str, bucket: str, prior_sd: float) -> Posterior:
        """Normal posterior of the mean residual: the bucket cell on top of its backend's pooled
        cell (itself on a zero-mean prior with the estimate's own spread ``prior_sd``)."""
        c = self.config
        s0 = max(prior_sd, 0.05)
        pool = self.cells.get((kind, backend, ANY_BUCKET))
        pn, pmean, pm2 = pool.at(self.step, c.discount) if pool is not None else (0.0, 0.0, 0.0)
        k0 = c.prior_weight
        pool_mean = pn * pmean / (k0 + pn)
        pool_var = (pm2 + k0 * s0 * s0) / (k0 + pn)
        if bucket == ANY_BUCKET:
            return Posterior(pool_mean, math.sqrt(pool_var / (k0 + pn)), pn)
        cell = self.cells.get((kind, backend, bucket))
        n, mean, m2 = cell.at(self.step, c.discount) if cell is not None else (0.0, 0.0, 0.0)
        post_mean = (k0 * pool_mean + n * mean) / (k0 + n)
        var = (m2 + k0 * pool_var) / (k0 + n)
        return Posterior(post_mean, math.sqrt(var / (k0 + n)), n)

    def draw(self, post: Posterior, explore: bool) -> float:
        if not explore or post.sd <= 0.0:
            return post.mean
        bound = math.log(max(self.config.explore_factor, 1.0))
        x = self._rng.gauss(post.mean, post.sd)
        return min(max(x, post.mean - bound), post.mean + bound)

    def learn(self, kind: str, backend: str, bucket: str, residual: float) -> None:
        """One observed log residual (actual / the model's honest estimate)."""
        if not math.isfinite(residual):
            return
        x = min(max(residual, -_CLIP), _CLIP)
        if kind == RUNTIME:
            self.step += 1
        self.observations += 1
        for b in (bucket, ANY_BUCKET):
            self.cells.setdefault((kind, backend, b), Cell()).add(x, self.step, self.config.discount)

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
                "cells": [[k, b, u, c.n, c.mean, c.m2, c.step] for (k, b, u), c in self.cells.items()]}

    def restore(self, snap: Mapping[str, Any]) -> None:
        if int(snap.get("version", 0)) != SNAPSHOT_VERSION:
            return
        self.step = int(snap.get("step", 0))
        self.jobs = int(snap.get("jobs", 0))
        self.spent = float(snap.get("spent", 0.0))
        self.explored = int(snap.get("explored", 0))
        self.held_back = int(snap.get("held_back", 0))
        self.observations = int(snap.get("observations", 0))
        self.cells = {(str(k), str(b), str(u)): Cell(float(n), float(m), float(m2), int(s))
                      for k, b, u, n, m, m2, s in snap.get("cells", [])}

    def stats(self) -> dict[str, Any]:
        return {"cells": len(self.cells), "observations": self.observations, "jobs": self.jobs,
                "explored": self.explored, "held_back": self.held_back, "spent": round(self.spent, 4),
                "budget": round(self.config.budget_burst + self.config.budget_per_job * self.jobs, 4)}


@dataclass(frozen=True)
class _Shown:
    bucket: str
    base_runtime: float      # the inner predictor's runtime (what observe/remember forward)
    base_fidelity: float


class BanditPredictor:
    """A Predictor: the inner predictor's estimates, scaled by Thompson draws (see module doc).

    ``observe``/``remember`` map a shown runtime back to the inner predictor's own, as
    ``MemoryPredictor`` does for its overrides, so the layers below learn against numbers they
    made. Everything else (``source``, ``memory``, ``explore_factor`` ...) is the inner's.
    """

    def __init__(self, base: Any, bandit: ResidualBandit, weights: Any = None) -> None:
        self.base = base
        self.bandit = bandit
        self.weights = weights
        self._shown: OrderedDict[tuple[str, float], _Shown] = OrderedDict()

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "bandit", "weights", "_shown"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        estimates = self.base.predict(job, backends)
        return self.adjust(job, estimates)

    def adjust(self, job: JobView, estimates: Sequence[Estimate]) -> list[Estimate]:
        """Estimates with posterior means (greedy) or draws (exploring) applied."""
        bandit = self.bandit
        bandit.jobs += 1
        bucket = bucket_of(job)
        explore = job.priority != "emergency" and job.deadline_s is None
        learnable = [e for e in estimates if e.source not in _MEMORY_EXACT]
        if not learnable:
            return list(estimates)
        mean_rt: dict[str, tuple[float, float]] = {}
        draw_rt: dict[str, tuple[float, float]] = {}
        for e in learnable:
            prt = bandit.posterior(RUNTIME, e.backend, bucket, e.log_sd)
            pf = bandit.posterior(FIDELITY, e.backend, bucket, 0.1) if e.fidelity < 1.0 else None
            mean_rt[e.backend] = (prt.mean, pf.mean if pf else 0.0)
            draw_rt[e.backend] = ((bandit.draw(prt, True), bandit.draw(pf, True) if pf else 0.0)
                                  if explore else mean_rt[e.backend])
        use = mean_rt
        if explore and len(estimates) > 1:
            greedy = self._objectives(job, estimates, mean_rt)
            drawn = self._objectives(job, estimates, draw_rt)
            g, d = min(greedy, key=greedy.__getitem__), min(drawn, key=drawn.__getitem__)
            if g == d or bandit.may_explore(greedy[d] - greedy[g]):
                use = draw_rt
        out = []
        for e in estimates:
            shift = use.get(e.backend)
            if shift is None:
                out.append(e)
                continue
            rt = e.runtime_s * math.exp(shift[0])
            fid = min(max(e.fidelity * math.exp(shift[1]), 0.0), 1.0)
            cost = e.cost * math.exp(shift[0]) if e.cost else e.cost
            self._note(e.backend, rt, _Shown(bucket, e.runtime_s, e.fidelity))
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
        """A completed run: learn the residual against the inner estimate, forward to the inner."""
        seen = self._shown.get((backend, predicted_s))
        base_pred = seen.base_runtime if seen is not None else predicted_s
        if seen is not None and base_pred > 0 and actual_s > 0 and math.isfinite(actual_s):
            self.bandit.learn(RUNTIME, backend, seen.bucket, math.log(actual_s / base_pred))
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

_META_KEYS = ("version", "step", "jobs", "spent", "explored", "held_back", "observations")


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
    """What the bandit believes, per cell (for ``qalloc model bandit`` and the benchmark's JSON)."""
    out = []
    for (k, b, u), c in sorted(bandit.cells.items()):
        if k not in kinds:
            continue
        n, mean, m2 = c.at(bandit.step, bandit.config.discount)
        out.append({"kind": k, "backend": b, "bucket": u, "n": round(n, 2), "mean_log_residual": round(mean, 4),
                    "factor": round(math.exp(mean), 4), "sd": round(math.sqrt(m2 / n), 4) if n > 1 else None})
    return out


__all__ = ["BanditConfig", "BanditPredictor", "BanditStore", "Cell", "Posterior", "ResidualBandit", "bucket_of",
           "cells_table", "RUNTIME", "FIDELITY"]
