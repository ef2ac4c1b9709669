"""What the live allocator does about runs that overrun their prediction.

Two defences, one tick (``tick``, every ``settings.hedge.interval_s``):

1. **memory** — a run past ``overrun_factor``× its prediction is remembered *at once* as a
   censored lower bound (it took at least this long on that variant), so the next job of the
   same circuit — or of a close neighbour — is planned with that knowledge;
2. **hedging** — ``placement.hedging.decide_hedges`` may start one backup run on another
   method or pool that is free now and predicted to finish sooner; the first result wins and
   the dispatcher stops the other run;
3. **restart** — a run that got no backup (no core free) is stopped and placed again without
   the backend that overran, once per job, when ``placement.hedging.decide_restarts`` finds
   another method on its pool expected to need at most half its remaining time.

The benchmark's simulation calls the same pure functions (``decide_hedges``, ``RunMemory``), so
what it measures is what runs live. The hard run timeout stays as the last line of defence.
"""

from __future__ import annotations

from typing import Any

from ray_qalloc.config import Settings
from ray_qalloc.costmodel import fidelity_correction
from ray_qalloc.costmodel.memory import MemoryPredictor, RunMemory


def wrap_predictor(fresh: Any, previous: Any = None) -> MemoryPredictor:
    """A predictor that consults run memory, over the model with its measured-fidelity correction
    (``costmodel.fidelity_correction``); a hot-reloaded model keeps the memory and corrections it had."""
    if isinstance(fresh, MemoryPredictor):
        return fresh
    memory = previous.memory if isinstance(previous, MemoryPredictor) else RunMemory()
    return MemoryPredictor(fidelity_correction.corrected(fresh, previous), memory)


def hedge_policy(settings: Settings) -> Any:
    from ray_qalloc.placement.hedging import HedgePolicy

    h = settings.hedge
    return HedgePolicy(k=h.overrun_factor, min_elapsed_s=h.min_overrun_s, restart_min_s=h.restart_min_s)


async def tick(d: Any, settings: Settings, now: float) -> int:
    """One check of the dispatcher's running jobs; returns the backups started."""
    from ray_qalloc.placement.hedging import RunningInfo, decide_hedges, decide_restarts
    from ray_qalloc.placement.scheduler import LiveView

    h = settings.hedge
    policy = hedge_policy(settings)

    def note(r: Any, at: float) -> None:
        remember = getattr(d.predictor, "remember", None)
        m = d.fleet.members.get(r.backend)
        if remember is not None and m is not None and m.spec.kind == "simulator":
            remember(r.view, m.spec, at - r.started_at, censored=True, predicted_s=r.predicted_s)
            d.overruns_noted += 1
            d.replan_circuit(r.view.circuit_key)

    def decide(runs: list[Any], at: float) -> list[tuple[str, str]]:
        infos = []
        for r in runs:
            m = d.fleet.members.get(r.backend)
            if m is None:
                continue
            est = r.plan.estimates.get(r.backend)
            infos.append(RunningInfo(r.job.id, r.backend, r.started_at, r.predicted_s,
                                     est.log_sd if est is not None else 0.0, m.spec.kind, r.backup is not None))
        plans = {r.job.id: _without_blocked(r) for r in runs}
        live = LiveView(d.sched, at, False)
        kinds = {name: m.spec.kind for name, m in d.fleet.members.items()}
        return [(x.job_id, x.backend) for x in decide_hedges(infos, plans, live, at, policy, kinds)]

    def restart(runs: list[Any], at: float) -> list[tuple[str, str]]:
        infos = []
        for r in runs:
            m = d.fleet.members.get(r.backend)
            if m is None:
                continue
            est = r.plan.estimates.get(r.backend)
            infos.append(RunningInfo(r.job.id, r.backend, r.started_at, r.predicted_s,
                                     est.log_sd if est is not None else 0.0, m.spec.kind, False,
                                     restarted=r.job.id in d.restarted))
        kinds = {name: m.spec.kind for name, m in d.fleet.members.items()}
        plans = {r.job.id: _without_blocked(r) for r in runs}
        return [(x.job_id, x.reason) for x in decide_restarts(infos, plans, at, policy, kinds)]

    return await d.hedge_tick(now, decide if h.enabled else None, note, h.overrun_factor, h.min_overrun_s,
                              restart if h.enabled and h.restart else None)


async def probe(d: Any, settings: Settings, now: float) -> int:
    """Nothing is queued: race started simulator runs against methods never measured on their
    circuit, on idle cores (``placement.hedging.decide_probes``)."""
    from ray_qalloc.placement.hedging import RunningInfo, decide_probes
    from ray_qalloc.placement.scheduler import LiveView

    runs = [r for r in d.running.values() if r.backup is None and not r.backup_pending]
    infos = []
    for r in runs:
        m = d.fleet.members.get(r.backend)
        if m is not None and m.spec.kind == "simulator":
            infos.append(RunningInfo(r.job.id, r.backend, r.started_at, r.predicted_s, 0.0, m.spec.kind, False))
    if not infos:
        return 0
    kinds = {name: m.spec.kind for name, m in d.fleet.members.items()}
    plans = {r.job.id: _without_blocked(r) for r in runs}
    started = 0
    for x in decide_probes(infos, plans, LiveView(d.sched, now, False), now, kinds):
        r = d.running.get(x.job_id)
        if r is not None and r.backup is None and await d.start_backup(r, x.backend, probe=True):
            started += 1
    return started


def _without_blocked(r: Any) -> Any:
    """The run's plan minus backends the job may not use again (failover history)."""
    from ray_qalloc.placement.model import Plan

    if not r.view.blocked:
        return r.plan
    return Plan(r.plan.job_id, {b: e for b, e in r.plan.estimates.items() if b not in r.view.blocked},
                dict(r.plan.filtered))
