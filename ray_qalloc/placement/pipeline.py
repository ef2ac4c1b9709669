"""The placement pipeline: filter → estimate (once, at enqueue) → select (at dispatch).

Why split in time: model calls cost hundreds of microseconds, so every prediction is made
once when a job is queued; the dispatch decision is arithmetic over those numbers and the
backends' live load, so it stays in microseconds however long the queue is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from ray_qalloc.placement.filters import DEFAULT_FILTERS, FidelityFilter, Filter
from ray_qalloc.placement.model import BackendView, Estimate, JobView, LiveState, Plan


class Predictor(Protocol):
    """Anything that turns (job, backends) into estimates in one batched call."""

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]: ...


def plan(job: JobView, backends: Sequence[BackendView], predictor: Predictor,
         filters: Sequence[Filter] = DEFAULT_FILTERS) -> Plan:
    """Run the filters, then ask the predictor once for every backend still standing."""
    result = Plan(job.id)
    survivors: list[BackendView] = []
    for backend in backends:
        for f in filters:
            status = f.check(job, backend)
            if not status.ok:
                result.filtered[backend.name] = status
                break
        else:
            survivors.append(backend)
    fidelity = FidelityFilter()
    for est in predictor.predict(job, survivors) if survivors else []:
        status = fidelity.check_estimate(job, est)
        if status.ok:
            result.estimates[est.backend] = est
        else:
            result.filtered[est.backend] = status
    return result


@dataclass(frozen=True)
class Weights:
    """How a priority class trades time against fidelity and money.

    The objective is ``log(completion_s) - fidelity·log(fidelity) + money·cost``; lower wins.
    Logs make it scale-free: halving the time is worth the same at 1 ms and at 1 h.
    """

    fidelity: float = 4.0
    money: float = 0.0


CLASS_WEIGHTS: dict[str, Weights] = {
    "emergency": Weights(fidelity=2.0, money=0.0),
    "high": Weights(fidelity=4.0, money=0.0),
    "normal": Weights(fidelity=4.0, money=0.01),
    "batch": Weights(fidelity=4.0, money=0.05),
}


@dataclass(frozen=True)
class Choice:
    backend: str | None          # None: nothing feasible
    can_start: bool              # the chosen backend has room now
    scores: dict[str, dict[str, float]]   # the chosen backend's; every backend's when detailed

    @property
    def reason(self) -> str:
        if self.backend is None:
            return "no feasible backend"
        s = self.scores[self.backend]
        return (f"lowest objective: expected completion {s['completion_s']:.3g} s "
                f"(wait {s['wait_s']:.3g} s + run {s['runtime_s']:.3g} s), fidelity {s['fidelity']:.3f}")

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "can_start": self.can_start, "scores": self.scores,
                "reason": self.reason}


# A job that asked for a QPU (intent ``quantum``) asked for quantum results: its fidelity
# weighs this many times its class's weight (simulators are exact, so for ``auto`` jobs the
# trade-off is mostly time). 2 is the smallest factor that met the placement benchmark's
# fidelity goal (≥ 0.99 of best-fidelity) on the 200-job trace; it cost 8% mean JCT there.
QUANTUM_FIDELITY_FACTOR = 2.0


def static_objective(p: Plan, priority: str, intent: str = "auto") -> dict[str, float]:
    """The part of each backend's objective that does not depend on load, cached on the plan."""
    key = priority if intent != "quantum" else f"{priority}/quantum"
    cached = p.static.get(key)
    if cached is None:
        w = CLASS_WEIGHTS.get(priority, CLASS_WEIGHTS["normal"])
        wf = w.fidelity * (QUANTUM_FIDELITY_FACTOR if intent == "quantum" else 1.0)
        cached = {name: -wf * math.log(max(e.fidelity, 1e-9)) + w.money * e.cost
                  for name, e in p.estimates.items()}
        p.static[key] = cached
    return cached


def select(job: JobView, p: Plan, live: Mapping[str, LiveState], *, detailed: bool = False) -> Choice:
    """Pick the backend with the lowest objective given current queue waits.

    The hot path of dispatch: one log per feasible backend over numbers made at enqueue.
    ``detailed`` keeps every backend's scores (for explain), not only the chosen one's.
    """
    static = static_objective(p, job.priority, job.intent)
    log = math.log
    best_obj, best_name, best_state = math.inf, None, None
    scores: dict[str, dict[str, float]] = {}
    for name, est in p.estimates.items():
        state = live.get(name)
        if state is None:  # backend gone from the pool, or excluded
            continue
        completion = state.wait_s + est.runtime_s
        objective = log(completion if completion > 1e-6 else 1e-6) + static[name]
        if detailed:
            scores[name] = _score(state, est, completion, objective)
        if objective < best_obj or (objective == best_obj and best_name is not None and name < best_name):
            best_obj, best_name, best_state = objective, name, state
    if best_name is None:
        return Choice(None, False, scores)
    if not detailed:
        est = p.estimates[best_name]
        scores[best_name] = _score(best_state, est, best_state.wait_s + est.runtime_s, best_obj)
    return Choice(best_name, best_state.can_start, scores)


def _score(state: LiveState, est: Any, completion: float, objective: float) -> dict[str, float]:
    return {"wait_s": state.wait_s, "runtime_s": est.runtime_s, "completion_s": completion,
            "fidelity": est.fidelity, "cost": est.cost, "objective": objective}


def explain(p: Plan, choice: Choice | None) -> dict[str, Any]:
    """Every backend: filtered out (why) or scored (how), and the choice."""
    rows: dict[str, dict[str, Any]] = {}
    for name, status in p.filtered.items():
        rows[name] = {"status": "filtered", "filter": status.plugin, "code": status.code,
                      "reasons": list(status.reasons)}
    for name, est in p.estimates.items():
        row: dict[str, Any] = {"status": "scored", "runtime_s": est.runtime_s, "fidelity": est.fidelity,
                               "cost": est.cost, "source": est.source}
        if choice is not None and name in choice.scores:
            row.update(choice.scores[name])
        row["chosen"] = choice is not None and choice.backend == name
        rows[name] = row
    return {"job_id": p.job_id, "chosen": choice.backend if choice else None,
            "reason": choice.reason if choice else "not yet placed", "backends": rows}
