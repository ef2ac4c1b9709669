"""qalloc's learning in the simulation, the way the live allocator does it (one place).

Why here and not in the simulation core: the core (``benchmarks.simulation``) only offers hooks
(a planner that is told how runs ended, a periodic hedge check); *what* qalloc does with them
is the live allocator's policy, and must stay the live allocator's:

* the predictor is ``ray_qalloc.overruns.wrap_predictor(load_predictor(...))`` — the shipped
  model (or the prior) wrapped in a ``MemoryPredictor`` with a fresh ``RunMemory``, as the
  allocator builds it (exploration at the predictor's default rate, seeded);
* a completed run calls ``observe(backend, predicted_s, actual_s)`` (online correction) and,
  on a simulator, ``remember(job, spec, actual_s, censored=False, predicted_s=...)``
  (``ray_qalloc.dispatch.Dispatcher.learn``);
* every ``settings.hedge.interval_s`` while runs overrun, a run without a backup past
  ``max(overrun_factor × predicted, min_overrun_s)`` is remembered once as a censored bound,
  and ``placement.hedging.decide_hedges`` (``HedgePolicy`` from the same settings,
  ``ray_qalloc.overruns.hedge_policy``) may start one backup; the first result wins and the
  other run is stopped (``ray_qalloc.overruns.tick`` / ``Dispatcher.hedge_tick``). A stopped
  run teaches nothing more (as live).

The circuit key is the trace case id (hash of the QASM text and shots): the same "same circuit
again" as the allocator's ``circuit_key`` (hash of the payload and shots).
"""

from __future__ import annotations

import dataclasses

from typing import Any, Mapping, Sequence

from benchmarks.simulation import HedgeAction, Hedger, PipelinePlanner, RunView, SimJob
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import LiveState


def live_settings() -> Any:
    from ray_qalloc.config import Settings

    return Settings()


def qalloc_predictor(model: Any, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The predictor the live allocator would build, and what it is (for the JSON)."""
    from ray_qalloc.costmodel.registry import load_predictor

    base = load_predictor(model, seed=seed) if model else load_predictor(None, seed=seed)
    info: dict[str, Any] = {"base": getattr(base, "source", "prior"),
                            "exploration_rate": getattr(base, "exploration_rate", None)}
    try:
        from ray_qalloc.overruns import wrap_predictor
    except ImportError as exc:        # the run memory is not there: online correction only
        info["memory"] = f"not available ({exc})"
        return base, info
    info["memory"] = "MemoryPredictor(base, RunMemory()) via ray_qalloc.overruns.wrap_predictor"
    return wrap_predictor(base), info


class LearningPlanner(PipelinePlanner):
    """``PipelinePlanner`` that learns as ``Dispatcher.learn`` does."""

    def __init__(self, views: Sequence[Any], predictor: Any, specs: Mapping[str, BackendSpec],
                 settings: Any = None) -> None:
        super().__init__(views, predictor, learn=True, settings=settings)
        self.specs = specs
        self.remembered = 0
        self.fidelity_samples = 0

    def observe(self, backend: str, predicted_s: float, actual_s: float, job: SimJob) -> None:
        self.observations += 1
        observe = getattr(self.predictor, "observe", None)
        if observe is not None:
            observe(backend, predicted_s, actual_s)
        spec = self.specs.get(backend)
        remember = getattr(self.predictor, "remember", None)
        if remember is not None and spec is not None and spec.kind == "simulator":
            remember(job.view, spec, actual_s, censored=False, predicted_s=predicted_s)
            self.remembered += 1

    def observe_fidelity(self, backend: str, measured: float, job: SimJob) -> None:
        """As the live fidelity meter: a run of a circuit whose exact ideal output is known and
        whose shots can show its fidelity (``costmodel.fidelity``: ≤ 12 qubits, ≥ 32 shots per
        effective outcome) teaches the device's correction, in success-probability space."""
        from ray_qalloc.costmodel.fidelity import (EXACT_MAX_QUBITS, IDEAL_OUTCOMES_FEATURE, MIN_SHOTS_PER_OUTCOME,
                                                   esp_equivalent, profile_of)
        from ray_qalloc.costmodel.fidelity_correction import FidelitySample, corrections_of

        corr = corrections_of(self.predictor)
        view = next((v for v in self.views if v.name == backend), None)
        outcomes = job.view.features.get(IDEAL_OUTCOMES_FEATURE)
        if (corr is None or view is None or job.view.num_qubits > EXACT_MAX_QUBITS or not outcomes
                or job.view.shots / float(outcomes) < MIN_SHOTS_PER_OUTCOME):
            return
        calibration = getattr(self.predictor, "calibration_fidelity", None)
        estimate = (float(calibration(job.view, view)) if calibration is not None
                    else float(self.predictor.predict(job.view, [view])[0].fidelity))
        if estimate > 0:
            corr.add(FidelitySample(backend, estimate, esp_equivalent(measured, profile_of(job.view.features))))
            self.fidelity_samples += 1

    def stopped(self, backend: str, predicted_s: float, elapsed_s: float, job: SimJob) -> None:
        """As live (``Dispatcher._remember_bound``): a run that lost its race took at least this
        long; a probe cut short for a waiting job is not reported (the simulation passes learn=False)."""
        spec = self.specs.get(backend)
        remember = getattr(self.predictor, "remember", None)
        if remember is not None and spec is not None and spec.kind == "simulator" and elapsed_s > 0:
            remember(job.view, spec, elapsed_s, censored=True, predicted_s=predicted_s)
            self.remembered += 1

    def note_overrun(self, run: RunView) -> None:
        spec = self.specs.get(run.backend)
        remember = getattr(self.predictor, "remember", None)
        if remember is not None and spec is not None and spec.kind == "simulator":
            remember(run.job, spec, run.elapsed_s, censored=True, predicted_s=run.predicted_s)
            self.remembered += 1


def live_hedger(planner: LearningPlanner, settings: Any = None) -> tuple[Hedger | None, dict[str, Any]]:
    """The allocator's overrun tick as a simulation hedger, and its settings (for the JSON)."""
    settings = settings or live_settings()
    h = settings.hedge
    info: dict[str, Any] = {"enabled": h.enabled, "overrun_factor": h.overrun_factor,
                            "min_overrun_s": h.min_overrun_s, "interval_s": h.interval_s}
    try:
        from ray_qalloc.overruns import hedge_policy
        from ray_qalloc.placement.hedging import RunningInfo, decide_hedges, decide_restarts
    except ImportError as exc:
        info["hedging"] = f"not available ({exc})"
        return None, info
    policy = hedge_policy(settings)
    noted: set[str] = set()
    restarted: set[str] = set()      # jobs restarted once already (never twice, as live)

    def hedger(now: float, runs: Sequence[RunView], live: Mapping[str, LiveState]) -> list[HedgeAction]:
        over = [r for r in runs if not r.backup and not r.has_backup
                and r.elapsed_s > max(h.overrun_factor * r.predicted_s, h.min_overrun_s)]
        for r in over:
            if r.run_id not in noted:
                noted.add(r.run_id)
                planner.note_overrun(r)
        if not over or not h.enabled:
            return []
        infos = []
        for r in over:
            spec = planner.specs.get(r.backend)
            est = r.plan.estimates.get(r.backend)
            infos.append(RunningInfo(r.job.id, r.backend, r.started_s, r.predicted_s,
                                     est.log_sd if est is not None else 0.0,
                                     spec.kind if spec is not None else "simulator", r.has_backup))
        kinds = {name: s.kind for name, s in planner.specs.items()}
        plans = {r.job.id: r.plan for r in over}
        acts = [HedgeAction("backup", x.job_id, x.backend)
                for x in decide_hedges(infos, plans, live, now, policy, kinds=kinds)]
        if not h.restart:
            return acts
        hedged = {a.job_id for a in acts}
        left = [dataclasses.replace(i, restarted=i.job_id in restarted) for i in infos
                if i.job_id not in hedged and not i.has_backup]
        run_of = {r.job.id: r.run_id for r in over}
        for x in decide_restarts(left, plans, now, policy, kinds):
            restarted.add(x.job_id)
            acts.append(HedgeAction("restart", x.job_id, x.backend, run_of[x.job_id]))
        return acts

    info["hedging"] = ("ray_qalloc.placement.hedging.decide_hedges, then decide_restarts (hedge.restart="
                       f"{h.restart}), with ray_qalloc.overruns.hedge_policy(Settings())")
    return hedger, info


def live_prober(planner: LearningPlanner, settings: Any = None) -> tuple[Hedger | None, dict[str, Any]]:
    """The allocator's idle-core probes (``ray_qalloc.overruns.probe``) as a simulation prober."""
    settings = settings or live_settings()
    info: dict[str, Any] = {"probe_idle": settings.hedge.probe_idle}
    if not settings.hedge.probe_idle:
        return None, info
    from ray_qalloc.placement.hedging import RunningInfo, decide_probes

    kinds = {name: s.kind for name, s in planner.specs.items()}

    def prober(now: float, runs: Sequence[RunView], live: Mapping[str, LiveState]) -> list[HedgeAction]:
        infos = [RunningInfo(r.job.id, r.backend, r.started_s, r.predicted_s, 0.0,
                             kinds.get(r.backend, "simulator"), False) for r in runs]
        return [HedgeAction("backup", x.job_id, x.backend)
                for x in decide_probes(infos, {r.job.id: r.plan for r in runs}, live, now, kinds)]

    info["probes"] = "ray_qalloc.placement.hedging.decide_probes (idle cores, empty queue)"
    return prober, info


__all__ = ["qalloc_predictor", "LearningPlanner", "live_hedger", "live_prober", "live_settings"]
