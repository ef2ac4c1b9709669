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
         filters: Sequence[Filter] = DEFAULT_FILTERS, weights: "WeightTable | None" = None) -> Plan:
    """Run the filters, then ask the predictor once for every backend still standing.
    ``weights``: the class weights select will use for this job (default ``DEFAULT_WEIGHTS``)."""
    result = Plan(job.id, weights=weights)
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

    The objective is ``log(completion_s) - fidelity·log(fidelity) + money·cost``; lower wins,
    where completion is the wait plus the risk-adjusted runtime (``expected_runtime``).
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
        run = f"run {s.get('expected_runtime_s', s['runtime_s']):.3g} s"   # baselines score without spread
        if s.get("log_sd", 0.0) > 0.0:
            run += f" = median {s['runtime_s']:.3g} s × spread e^(σ²/2), σ={s['log_sd']:.2g}"
        return (f"lowest objective: expected completion {s['completion_s']:.3g} s "
                f"(wait {s['wait_s']:.3g} s + {run}), fidelity {s['fidelity']:.3f}")

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "can_start": self.can_start, "scores": self.scores,
                "reason": self.reason}


# A job that asked for a QPU (intent ``quantum``) asked for quantum results: its fidelity
# weighs this many times its class's weight (simulators are exact, so for ``auto`` jobs the
# trade-off is mostly time). 2 is the smallest factor that met the placement benchmark's
# fidelity goal (≥ 0.99 of best-fidelity) on the 200-job trace; it cost 8% mean JCT there.
QUANTUM_FIDELITY_FACTOR = 2.0


@dataclass(frozen=True)
class WeightTable:
    """Every class's weights and the quantum-intent factor: one value, made from the typed
    settings (``Settings.placement``) by the allocator and by the benchmark's simulation alike."""

    classes: Mapping[str, Weights]
    quantum_fidelity_factor: float = QUANTUM_FIDELITY_FACTOR

    def of(self, priority: str) -> Weights:
        return self.classes.get(priority) or self.classes.get("normal") or Weights()


DEFAULT_WEIGHTS = WeightTable(CLASS_WEIGHTS, QUANTUM_FIDELITY_FACTOR)

# Bound on the spread ``select`` believes, in log space. Past σ = 2 (a factor 7.4 either way
# at one sd) an estimate says "unknown", not "slow"; the mean's e^(σ²/2) would otherwise grow
# without bound (σ = 3: ×90) and rule out a candidate on noise. What a wrong pick really costs
# beyond that is cut by hedged runs (placement/hedging.py), not by this factor.
MAX_LOG_SD = 2.0


def expected_runtime(runtime_s: float, log_sd: float) -> float:
    """Risk-adjusted runtime: the mean of a log-normal with median ``runtime_s`` and sd ``log_sd``.

    Why the mean, ``median·e^(σ²/2)``: what the allocator minimises is the time jobs take,
    summed over jobs (mean JCT), and the sum of what each pick costs on average is the sum
    of the means. The mean needs no tuned constant (an upper quantile would need its level),
    it costs a well-predicted candidate almost nothing (σ = 0.3: +5%) and a poorly predicted
    one a lot (σ = 1.5: ×3.1), so a method whose predictions are often far off (MPS on an
    entangling circuit) wins only by a clear margin. σ is clipped to ``MAX_LOG_SD``.
    """
    risk = _risk_log(log_sd)
    return runtime_s * math.exp(risk) if risk else runtime_s


def _risk_log(log_sd: float) -> float:
    """log(expected / median) = σ²/2, σ clipped to [0, MAX_LOG_SD] (NaN counts as the bound)."""
    if not log_sd > 0.0:
        return 0.0 if log_sd == log_sd else 0.5 * MAX_LOG_SD * MAX_LOG_SD
    s = log_sd if log_sd < MAX_LOG_SD else MAX_LOG_SD
    return 0.5 * s * s


def _cache_key(priority: str, intent: str) -> str:
    return priority if intent != "quantum" else f"{priority}/quantum"


def objective_rows(p: Plan, priority: str, intent: str) -> tuple[tuple[str, float, float], ...]:
    """Per backend: (name, risk-adjusted runtime, fidelity + money part), cached on the plan.

    Estimates are fixed once a plan is made (replace the Plan to change them), so this is
    computed once per plan and class; ``select`` then does one add and one log per backend.
    """
    key = _cache_key(priority, intent)
    rows = p.rows.get(key)
    if rows is None:
        table: WeightTable = p.weights or DEFAULT_WEIGHTS
        w = table.of(priority)
        wf = w.fidelity * (table.quantum_fidelity_factor if intent == "quantum" else 1.0)
        rows = tuple((name, expected_runtime(e.runtime_s, e.log_sd),
                      -wf * math.log(max(e.fidelity, 1e-9)) + w.money * e.cost)
                     for name, e in p.estimates.items())
        p.rows[key] = rows
    return rows


def static_objective(p: Plan, priority: str, intent: str = "auto") -> dict[str, float]:
    """The part of each backend's objective that does not depend on load, cached on the plan.

    Defined so that ``log(runtime_s) + static[b]`` is backend ``b``'s objective with no wait:
    it holds the fidelity and money terms and the risk term ``log(expected / median) = σ²/2``
    (the scheduler compares runs on a freed slot that way, without knowing about spreads).
    """
    key = _cache_key(priority, intent)
    cached = p.static.get(key)
    if cached is None:
        cached = {name: base + _risk_log(p.estimates[name].log_sd)
                  for name, _, base in objective_rows(p, priority, intent)}
        p.static[key] = cached
    return cached


def select(job: JobView, p: Plan, live: Mapping[str, LiveState], *, detailed: bool = False) -> Choice:
    """Pick the backend with the lowest objective given current queue waits.

    Objective: ``log(wait + expected runtime) - fidelity·log(fidelity) + money·cost`` with the
    risk-adjusted runtime of ``expected_runtime``. The hot path of dispatch: one add and one
    log per feasible backend over numbers precomputed once per plan (``objective_rows``).
    ``detailed`` keeps every backend's scores (for explain), not only the chosen one's.
    """
    rows = objective_rows(p, job.priority, job.intent)
    log = math.log
    get = live.get
    best_obj, best_name, best_state, best_run = math.inf, None, None, 0.0
    scores: dict[str, dict[str, float]] = {}
    for name, run, base in rows:
        state = get(name)
        if state is None:  # backend gone from the pool, or excluded
            continue
        completion = state.wait_s + run
        objective = log(completion if completion > 1e-6 else 1e-6) + base
        if detailed:
            scores[name] = _score(state, p.estimates[name], run, objective)
        if objective < best_obj or (objective == best_obj and best_name is not None and name < best_name):
            best_obj, best_name, best_state, best_run = objective, name, state, run
    if best_name is None or best_state is None:
        return Choice(None, False, scores)
    if not detailed:
        scores[best_name] = _score(best_state, p.estimates[best_name], best_run, best_obj)
    return Choice(best_name, best_state.can_start, scores)


def _score(state: LiveState, est: Estimate, run: float, objective: float) -> dict[str, float]:
    return score_row(state.wait_s, state.can_start, est, run, objective)


def score_row(wait_s: float, can_start: bool, est: Estimate, run: float, objective: float) -> dict[str, float]:
    """One backend's row of explain: what a decision weighed there."""
    return {"wait_s": wait_s, "runtime_s": est.runtime_s, "log_sd": est.log_sd,
            "expected_runtime_s": run, "completion_s": wait_s + run,
            "fidelity": est.fidelity, "cost": est.cost, "objective": objective}


def explain(p: Plan, choice: Choice | None) -> dict[str, Any]:
    """Every backend: filtered out (why) or scored (how), and the choice."""
    rows: dict[str, dict[str, Any]] = {}
    for name, status in p.filtered.items():
        rows[name] = {"status": "filtered", "filter": status.plugin, "code": status.code,
                      "reasons": list(status.reasons)}
    for name, est in p.estimates.items():
        row: dict[str, Any] = {"status": "scored", "runtime_s": est.runtime_s, "log_sd": est.log_sd,
                               "expected_runtime_s": expected_runtime(est.runtime_s, est.log_sd),
                               "fidelity": est.fidelity, "cost": est.cost, "source": est.source}
        if choice is not None and name in choice.scores:
            row.update(choice.scores[name])
        row["chosen"] = choice is not None and choice.backend == name
        rows[name] = row
    return {"job_id": p.job_id, "chosen": choice.backend if choice else None,
            "reason": choice.reason if choice else "not yet placed", "backends": rows}
