"""Re-planning a circuit's queued jobs when what memory now knows moves their plans (``Dispatcher.replan_circuit``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.dispatch import Dispatcher
from ray_qalloc.placement.model import Estimate, Plan


def _plan(job_id: str, seconds: float) -> Plan:
    return Plan(job_id, {"pool/sv": Estimate("pool/sv", seconds, 1.0, 0.0)})


def _dispatcher(plan_s: float, memory_s: float, queued: int = 5) -> SimpleNamespace:
    replanned: list[str] = []
    d = SimpleNamespace(
        _by_circuit={"bell": {f"j{i}" for i in range(queued)}},
        queued={f"j{i}": SimpleNamespace(plan=_plan(f"j{i}", plan_s), job=SimpleNamespace(id=f"j{i}"),
                                         view=SimpleNamespace(blocked=frozenset())) for i in range(queued)},
        _dispatching=set(), sched=SimpleNamespace(runs={}), replanned=replanned, planned=[])
    d._replan = lambda q: replanned.append(q.plan.job_id)
    d.view = lambda job, blocked: job
    d.plan_for = lambda view: (d.planned.append(view.id), _plan(view.id, memory_s))[1]
    return d


@settings(max_examples=80, deadline=None)
@given(plan_s=st.floats(1e-4, 10.0), memory_s=st.floats(1e-4, 10.0))
def test_a_completion_replans_the_queue_only_when_memory_moved_its_plans(plan_s: float, memory_s: float) -> None:
    """Against the rule written out: one queued job is planned afresh; the queue keeps its plans
    unless that moved the estimate by more than 2× — a stream of one circuit no longer re-plans
    its whole queue on every completion."""
    d = _dispatcher(plan_s, memory_s)
    Dispatcher.replan_circuit(d, "bell", "pool/sv", math.log(2.0))              # type: ignore[arg-type]
    moved = abs(math.log(memory_s / plan_s)) > math.log(2.0)
    assert sorted(d.replanned) == (sorted(d.queued) if moved else [])
    assert len(d.planned) == 1                          # the check itself: one plan, not the queue's


def test_an_overrun_bound_and_an_unknown_backend() -> None:
    d = _dispatcher(0.01, 0.01)
    Dispatcher.replan_circuit(d, "bell")                                          # type: ignore[arg-type]
    assert len(d.replanned) == 5                        # a censored bound: always planned again
    d = _dispatcher(0.01, 9.0)
    Dispatcher.replan_circuit(d, "bell", "pool/mps")                              # type: ignore[arg-type]
    assert d.replanned == []                            # no queued plan has that backend
    assert Dispatcher.replan_circuit(_dispatcher(0.01, 9.0), "other", "pool/sv") == 0   # type: ignore[arg-type]
