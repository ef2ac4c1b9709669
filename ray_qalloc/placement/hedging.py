"""Hedged runs: when a run overruns its prediction, start a backup where it should finish sooner.

Why: a prediction can be wrong without bound (MPS on a volume-law circuit ran > 20 s where
~1 s was predicted; 0.22 s as a statevector). Choosing by risk (``pipeline.expected_runtime``)
makes such picks rarer; it cannot make them impossible. Hedging bounds what one costs: once
a run is clearly past what was predicted, a second copy starts on another method or pool
that is predicted to finish before the first, and the first result wins. This replaces the
fixed ``max(120 s, 20× predicted)`` timeout as the first defence (a hard cap stays the last).

Pure decisions over value objects, like the rest of placement. The caller (allocator or the
placement simulator) owns the effects:

* start each returned ``Hedge`` (a backup run of the same job on ``Hedge.backend``) and mark
  the original ``has_backup``;
* when the first of the two results arrives, **stop the other** and keep that one result
  (the job completes once: the store's completion is exactly-once);
* remember the overrun at once (``overrun_bound``) as a censored lower bound in the run
  memory (``costmodel.memory``), so the next job of that circuit goes elsewhere.

Bounds: at most one backup per job (ever: ``has_backup``), only on capacity that is free now
(``LiveState.can_start``, and at most one backup per pool per decision, since candidates of
one pool share its cores), never for QPU runs and never onto a QPU (a QPU job costs money,
is not idempotent, and its result is noisy where the simulator's is exact).

When no capacity is free, a backup cannot start, and the overrunning run would hold its cores
until the hard timeout — every job behind it waiting too (two MPS runs of a volume-law circuit,
predicted 0.46 s, held both cores of a node past 20 s). ``decide_restarts`` is the second
defence: a run that overruns with no backup is stopped and placed again, blocked from the
backend that overran, when another method on the same pool (whose cores the stop frees) is
expected to finish in at most ``RESTART_GAIN`` of what the run is expected still to need. What
it ran is thrown away, so it happens at most once per job, never to a QPU run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from ray_qalloc.backends.pools import method_of_name, parse_candidate
from ray_qalloc.placement.model import LiveState, Plan
from ray_qalloc.placement.pipeline import MAX_LOG_SD, expected_runtime

#: One-sided z of the quantile past which a run counts as overrunning, given its spread: the
#: 90th percentile, so with honest spreads at most one run in ten is ever hedged for nothing.
OVERRUN_QUANTILE_Z = 1.2816
#: Median total time of a heavy-tailed run (power law, α = 1) that has lasted ``e``: ``2e``,
#: so its expected remaining time is taken as ``e`` (the same rule as the run memory's
#: ``CENSORED_FACTOR``). The prediction no longer helps: it has already been passed k-fold.
REMAINING_PER_ELAPSED = 1.0
#: A restart throws away what the run did and its remaining time is itself a median guess
#: (``REMAINING_PER_ELAPSED``): it pays only if the alternative is expected to need at most
#: half of that — the same margin as a median guess being off by 2x.
RESTART_GAIN = 0.5


@dataclass(frozen=True)
class RunningInfo:
    """A run as hedging sees it."""

    job_id: str
    backend: str
    started: float          # clock of the caller (seconds)
    predicted_s: float      # the estimate's median runtime (Estimate.runtime_s)
    log_sd: float = 0.0     # the estimate's spread (Estimate.log_sd)
    kind: str = "simulator"   # "simulator" | "qpu"
    has_backup: bool = False  # a backup was started for this job (or this run is one)
    restarted: bool = False   # the job was stopped and placed again once already

    def elapsed(self, now: float) -> float:
        return max(now - self.started, 0.0)


@dataclass(frozen=True)
class HedgePolicy:
    """When a run counts as overrunning.

    ``k``: a run is overrunning once it has taken ``k``× its median prediction, or its
    predicted ``OVERRUN_QUANTILE_Z`` quantile if that is later (a run whose prediction is
    known to be rough is given the room its spread says), and at least ``min_elapsed_s``.
    ``min_elapsed_s``: below a second, starting a backup (dispatch, transpile, a worker) is a
    fair part of what it could save, and an overrun costs at most about that second.
    """

    k: float = 3.0
    min_elapsed_s: float = 1.0
    enabled: bool = True
    restart_min_s: float = 5.0   # decide_restarts: never before (a cold worker's start is no overrun)

    def threshold(self, run: RunningInfo) -> float:
        """Seconds after its start at which ``run`` counts as overrunning (inf: never, QPUs)."""
        if run.kind == "qpu" or not self.enabled:
            return math.inf
        sd = min(run.log_sd, MAX_LOG_SD) if run.log_sd > 0.0 else 0.0   # selection's bound too
        factor = max(self.k, math.exp(OVERRUN_QUANTILE_Z * sd))
        return max(self.min_elapsed_s, factor * max(run.predicted_s, 0.0))


@dataclass(frozen=True)
class Hedge:
    """Start a backup of ``job_id`` on ``backend``; the first result wins, the caller stops the other."""

    job_id: str
    backend: str
    reason: str
    backup_s: float = 0.0       # the backup's predicted completion (wait + risk-adjusted runtime)
    remaining_s: float = 0.0    # the original's expected remaining time


def overrun_bound(run: RunningInfo, now: float, policy: HedgePolicy | None = None) -> float | None:
    """The censored lower bound to remember at once (its elapsed time) if ``run`` is overrunning;
    None while it is within its prediction, and for QPU runs."""
    policy = policy or HedgePolicy()
    elapsed = run.elapsed(now)
    return elapsed if elapsed > policy.threshold(run) else None


def remaining_estimate(run: RunningInfo, now: float) -> float:
    """Expected remaining time of a run: the prediction's rest while within it; once past it,
    as long again as it has run (``REMAINING_PER_ELAPSED``; runtimes are heavy-tailed: the
    longer a run has lasted, the longer it is likely to last)."""
    elapsed = run.elapsed(now)
    return max(run.predicted_s - elapsed, REMAINING_PER_ELAPSED * elapsed)


def decide_hedges(runs: Iterable[RunningInfo], plans: Mapping[str, Plan], live: Mapping[str, LiveState],
                  now: float, policy: HedgePolicy | None = None,
                  kinds: Mapping[str, str] | None = None) -> list[Hedge]:
    """Backups to start now, worst overrun first.

    A run qualifies when it is past its threshold (``HedgePolicy.threshold``), is not on a QPU
    and has no backup yet. Its backup goes to the backend of its plan with the earliest
    predicted completion (live wait + risk-adjusted runtime) among those that are not the
    run's own backend, can start now, are simulators (``kinds``, else a name that names a
    simulation method), are on a pool no other backup took in this call, and would finish
    before the original's expected remaining time (``remaining_estimate``). A backup on the
    same simulation method is charged the evidence of the overrun: its prediction scaled by
    what this run has shown (at least twice its elapsed time over its prediction), since
    what overran is most often the method on this circuit, not the pool.
    """
    policy = policy or HedgePolicy()
    due: list[tuple[float, str, RunningInfo]] = []
    for run in runs:
        if run.has_backup or run.kind == "qpu":
            continue
        limit = policy.threshold(run)
        elapsed = run.elapsed(now)
        if elapsed > limit:
            due.append((-(elapsed / limit) if limit > 0 else -math.inf, run.job_id, run))
    if not due:
        return []
    due.sort(key=lambda item: (item[0], item[1]))
    taken: set[str] = set()      # pools (or backends) that got a backup in this call
    hedged: set[str] = set()
    out: list[Hedge] = []
    for _, _, run in due:
        if run.job_id in hedged:
            continue
        p = plans.get(run.job_id)
        if p is None:
            continue
        hedge = _backup(run, p, live, now, taken, kinds)
        if hedge is not None:
            out.append(hedge)
            hedged.add(run.job_id)
            taken.add(_pool_of(hedge.backend))
    return out


def _backup(run: RunningInfo, p: Plan, live: Mapping[str, LiveState], now: float, taken: set[str],
            kinds: Mapping[str, str] | None) -> Hedge | None:
    remaining = remaining_estimate(run, now)
    elapsed = run.elapsed(now)
    method = method_of_name(run.backend)
    # what this run has shown of its method on this circuit: at least 2·elapsed where the
    # model said predicted_s
    evidence = (1.0 + REMAINING_PER_ELAPSED) * elapsed / run.predicted_s if run.predicted_s > 0 else math.inf
    best: tuple[float, str] | None = None
    for name, est in p.estimates.items():
        if name == run.backend or _pool_of(name) in taken or not _is_simulator(name, kinds):
            continue
        state = live.get(name)
        if state is None or not state.can_start:
            continue
        runtime = expected_runtime(est.runtime_s, est.log_sd)
        if method is not None and method_of_name(name) == method:
            runtime *= max(evidence, 1.0)
        finish = state.wait_s + runtime
        if finish < remaining and (best is None or finish < best[0] or (finish == best[0] and name < best[1])):
            best = (finish, name)
    if best is None:
        return None
    finish, name = best
    reason = (f"{run.backend} has run {elapsed:.3g} s, predicted {run.predicted_s:.3g} s: expected "
              f"{remaining:.3g} s more; {name} is free and predicted to finish in {finish:.3g} s")
    return Hedge(run.job_id, name, reason, finish, remaining)


@dataclass(frozen=True)
class Restart:
    """Stop ``job_id``'s run on ``backend`` and place the job again without that backend."""

    job_id: str
    backend: str
    reason: str
    alternative: str            # what the restarted job is expected to run on
    alternative_s: float        # its risk-adjusted runtime there
    remaining_s: float          # the stopped run's expected remaining time


def decide_restarts(runs: Iterable[RunningInfo], plans: Mapping[str, Plan], now: float,
                    policy: HedgePolicy | None = None, kinds: Mapping[str, str] | None = None,
                    hedged: Iterable[str] = ()) -> list[Restart]:
    """Overrunning runs to stop and place again (module docstring), worst overrun first.

    A run qualifies when it is past its threshold and ``policy.restart_min_s`` (a restart throws
    away what ran: in the first seconds a run is as likely waiting for its worker to start as
    overrunning — the demo's 6-qubit statevector run was restarted at 0.5 s), is a simulator run, has no backup (its
    job never had one), was not restarted before and got no backup in this tick (``hedged``).
    The alternative is the candidate of its plan on the same pool with another method (the
    method that overran is what the evidence condemns; a thread count of it would repeat it),
    a simulator, whose risk-adjusted runtime is at most ``RESTART_GAIN`` × the run's expected
    remaining time; the fastest such. One restart per pool per call: a second stop would free
    cores the first restart's job is already expected to use."""
    policy = policy or HedgePolicy()
    skip = set(hedged)
    due: list[tuple[float, str, RunningInfo]] = []
    for run in runs:
        if run.has_backup or run.restarted or run.kind == "qpu" or run.job_id in skip:
            continue
        limit = max(policy.threshold(run), policy.restart_min_s)
        elapsed = run.elapsed(now)
        if elapsed > limit:
            due.append((-(elapsed / limit) if limit > 0 else -math.inf, run.job_id, run))
    due.sort(key=lambda item: (item[0], item[1]))
    taken: set[str] = set()
    out: list[Restart] = []
    for _, _, run in due:
        pool, method = _pool_of(run.backend), method_of_name(run.backend)
        p = plans.get(run.job_id)
        if p is None or pool in taken:
            continue
        remaining = remaining_estimate(run, now)
        best: tuple[float, str] | None = None
        for name, est in p.estimates.items():
            if (name == run.backend or _pool_of(name) != pool or method_of_name(name) == method
                    or not _is_simulator(name, kinds)):
                continue
            runtime = expected_runtime(est.runtime_s, est.log_sd)
            if runtime <= RESTART_GAIN * remaining and (best is None or (runtime, name) < best):
                best = (runtime, name)
        if best is None:
            continue
        runtime, name = best
        out.append(Restart(run.job_id, run.backend,
                           f"{run.backend} has run {run.elapsed(now):.3g} s, predicted {run.predicted_s:.3g} s, and no "
                           f"core was free for a backup: stopped and placed again ({name} predicted {runtime:.3g} s)",
                           name, runtime, remaining))
        taken.add(pool)
    return out


def _pool_of(name: str) -> str:
    """The capacity a backend draws on: its pool for a candidate, else the backend itself."""
    c = parse_candidate(name)
    return c.pool if c is not None else name


def _is_simulator(name: str, kinds: Mapping[str, str] | None) -> bool:
    if kinds is not None and name in kinds:
        return kinds[name] == "simulator"
    return method_of_name(name) is not None


# ---- probes: racing an unmeasured method on an idle core --------------------------------------

_MEASURED = ("memory:exact", "memory:censored", "memory:bounded")


def decide_probes(runs: Iterable[RunningInfo], plans: Mapping[str, Plan], live: Mapping[str, LiveState],
                  now: float, kinds: Mapping[str, str] | None = None) -> list[Hedge]:
    """Backups to race *now*, on cores nobody is waiting for (the caller calls this only with an
    empty queue, and stops probes as soon as a job waits).

    Why: hedging repairs an optimistic prediction (a run that overruns); nothing repairs a
    pessimistic one — a method the model believes slow on a circuit unlike its training data is
    never run, so never measured (exploration is bounded by the prediction it doubts). An idle
    core costs nothing, so a started simulator run may get one *probe*: the same job on another
    method its plan holds that was never measured on this circuit (its estimate does not come
    from run memory), on a pool with a free core, the one with the earliest expected finish. The
    first result wins as with any backup; the loser is stopped and remembered as a lower bound.
    """
    out: list[Hedge] = []
    taken: set[str] = set()
    for run in sorted(runs, key=lambda r: (r.started, r.job_id)):
        if run.has_backup or run.kind == "qpu":
            continue
        p = plans.get(run.job_id)
        if p is None:
            continue
        method = method_of_name(run.backend)
        best: tuple[float, str] | None = None
        for name, est in p.estimates.items():
            if name == run.backend or _pool_of(name) in taken or not _is_simulator(name, kinds):
                continue
            if method_of_name(name) == method or est.source.startswith(_MEASURED):
                continue
            state = live.get(name)
            if state is None or not state.can_start:
                continue
            finish = state.wait_s + expected_runtime(est.runtime_s, est.log_sd)
            if best is None or finish < best[0] or (finish == best[0] and name < best[1]):
                best = (finish, name)
        if best is not None:
            finish, name = best
            out.append(Hedge(run.job_id, name, f"probe: {name} never ran this circuit and a core is idle "
                                               f"(predicted {finish:.3g} s); the first result wins", finish,
                             remaining_estimate(run, now)))
            taken.add(_pool_of(name))
    return out
