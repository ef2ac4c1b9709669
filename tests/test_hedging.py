"""Hedged runs, table-driven: when a backup starts, where, and when it must not."""

from __future__ import annotations

import math

import pytest

from ray_qalloc.placement.hedging import (OVERRUN_QUANTILE_Z, HedgePolicy, RunningInfo, decide_hedges,
                                          overrun_bound, remaining_estimate)
from ray_qalloc.placement.model import Estimate, LiveState, Plan

A, B = "cpu-aaaaaaaa", "cpu-bbbbbbbb"
SV, SV2, MPS, STAB = f"{A}/statevector", f"{A}/statevector@2", f"{A}/mps", f"{A}/stabilizer"
SV_B, MPS_B = f"{B}/statevector", f"{B}/mps"
QPU = "qpu_torino"


def est(name: str, runtime: float, log_sd: float = 0.0) -> Estimate:
    return Estimate(name, runtime, 1.0, 0.0, log_sd=log_sd)


def plan_of(job_id: str, **runtimes: float) -> Plan:
    names = {"sv": SV, "sv2": SV2, "mps": MPS, "stab": STAB, "sv_b": SV_B, "mps_b": MPS_B, "qpu": QPU}
    return Plan(job_id, {names[k]: est(names[k], v) for k, v in runtimes.items()})


def run(job_id: str = "j", backend: str = MPS, predicted: float = 1.0, started: float = 0.0, **kw) -> RunningInfo:
    return RunningInfo(job_id, backend, started, predicted, **kw)


FREE = {n: LiveState(0.0, True) for n in (SV, SV2, MPS, STAB, SV_B, MPS_B, QPU)}


def busy(*names: str) -> dict[str, LiveState]:
    return {**FREE, **{n: LiveState(5.0, False) for n in names}}


# (case, runs, plans, live, now, expected [(job, backend)])
CASES = [
    ("overrun, a faster free method: backup there",
     [run()], {"j": plan_of("j", mps=1.0, sv=0.3)}, FREE, 4.0, [("j", SV)]),
    ("not yet k× its prediction",
     [run()], {"j": plan_of("j", mps=1.0, sv=0.3)}, FREE, 2.9, []),
    ("a QPU run is never hedged",
     [run(backend=QPU, kind="qpu")], {"j": plan_of("j", qpu=1.0, sv=0.3)}, FREE, 100.0, []),
    ("one backup per job, ever",
     [run(has_backup=True)], {"j": plan_of("j", mps=1.0, sv=0.3)}, FREE, 10.0, []),
    ("only on free capacity",
     [run()], {"j": plan_of("j", mps=1.0, sv=0.3)}, busy(SV), 4.0, []),
    ("only when predicted faster than the expected rest (as long again as it ran)",
     [run()], {"j": plan_of("j", mps=1.0, sv=5.0)}, FREE, 4.0, []),
    ("the fastest free option of its plan wins",
     [run()], {"j": plan_of("j", mps=1.0, sv=0.3, sv2=0.2, stab=2.0)}, FREE, 4.0, [("j", SV2)]),
    ("never onto a QPU",
     [run()], {"j": plan_of("j", mps=1.0, qpu=0.1)}, FREE, 4.0, []),
    ("the same method on another pool carries the overrun's evidence",
     [run()], {"j": plan_of("j", mps=1.0, mps_b=1.0)}, FREE, 4.0, []),
    ("... unless it is predicted far faster even so",
     [run()], {"j": plan_of("j", mps=1.0, mps_b=0.05)}, FREE, 4.0, [("j", MPS_B)]),
    ("sub-second runs are left alone",
     [run(predicted=0.01)], {"j": plan_of("j", mps=0.01, sv=0.001)}, FREE, 0.5, []),
    ("... but not forever",
     [run(predicted=0.01)], {"j": plan_of("j", mps=0.01, sv=0.001)}, FREE, 1.5, [("j", SV)]),
    ("a job without a plan is skipped",
     [run()], {}, FREE, 10.0, []),
    ("two overruns, one free pool: the worst overrun gets it",
     [run("a", predicted=1.0), run("b", predicted=0.5)],
     {"a": plan_of("a", mps=1.0, sv=0.3), "b": plan_of("b", mps=0.5, sv=0.3)}, busy(SV_B), 4.0, [("b", SV)]),
    ("one backup per pool per call (candidates of a pool share its cores)",
     [run("a"), run("b")],
     {"a": plan_of("a", mps=1.0, sv=0.3), "b": plan_of("b", mps=1.0, sv2=0.2)}, busy(SV_B), 4.0, [("a", SV)]),
    ("two pools free: both jobs get a backup",
     [run("a"), run("b", started=0.1)],
     {"a": plan_of("a", mps=1.0, sv=0.3), "b": plan_of("b", mps=1.0, sv_b=0.3)}, FREE, 4.0,
     [("a", SV), ("b", SV_B)]),
]


@pytest.mark.parametrize("case, runs, plans, live, now, expected", CASES, ids=[c[0] for c in CASES])
def test_decide_hedges(case, runs, plans, live, now, expected):
    hedges = decide_hedges(runs, plans, live, now, HedgePolicy(k=3.0))
    assert [(h.job_id, h.backend) for h in hedges] == expected
    for h in hedges:
        r = next(x for x in runs if x.job_id == h.job_id)
        assert h.backend != r.backend and h.backup_s < h.remaining_s and h.reason


def test_a_rough_prediction_gets_the_room_its_spread_says():
    """σ = 1.5: its 90th percentile is 6.8× the median, so a run at 4× is not yet surprising."""
    plans = {"j": plan_of("j", mps=1.0, sv=0.3)}
    assert decide_hedges([run(log_sd=1.5)], plans, FREE, 4.0) == []
    limit = math.exp(OVERRUN_QUANTILE_Z * 1.5)
    assert [h.backend for h in decide_hedges([run(log_sd=1.5)], plans, FREE, limit + 0.1)] == [SV]
    assert [h.backend for h in decide_hedges([run(log_sd=0.0)], plans, FREE, 4.0)] == [SV]


def test_the_backup_is_weighed_by_its_own_spread():
    """An uncertain backup must beat the rest by its expected (mean) runtime, not its median."""
    plans = {"j": Plan("j", {MPS: est(MPS, 1.0), SV: est(SV, 3.0, log_sd=1.0)})}
    assert decide_hedges([run()], plans, FREE, 4.0) == []           # 3·e^0.5 = 4.9 s > 4 s left
    plans = {"j": Plan("j", {MPS: est(MPS, 1.0), SV: est(SV, 3.0)})}
    assert [h.backend for h in decide_hedges([run()], plans, FREE, 4.0)] == [SV]


def test_overrun_bound_is_the_elapsed_time_once_past_the_threshold():
    policy = HedgePolicy(k=3.0)
    assert overrun_bound(run(), 2.0, policy) is None
    assert overrun_bound(run(), 7.5, policy) == 7.5
    assert overrun_bound(run(backend=QPU, kind="qpu"), 1e6, policy) is None
    assert overrun_bound(run(), 100.0, HedgePolicy(enabled=False)) is None


def test_remaining_time_of_an_overrun_grows_with_what_it_has_run():
    r = run(predicted=10.0)
    assert remaining_estimate(r, 2.0) == 8.0          # within its prediction: the rest of it
    assert remaining_estimate(r, 30.0) == 30.0        # past it: as long again
    assert remaining_estimate(r, 60.0) > remaining_estimate(r, 30.0)


def test_measured_case_quantum_volume_on_mps_is_bounded():
    """QV-18: MPS > 20 s where ~1 s was predicted (σ 1.5), statevector 0.22 s. Hedging starts
    the statevector backup once the run passes its threshold, so the job takes about that
    threshold plus 0.22 s, not the MPS run's unbounded time."""
    plans = {"qv": Plan("qv", {MPS: est(MPS, 1.0, 1.5), SV: est(SV, 0.22, 0.5)})}
    r = RunningInfo("qv", MPS, 0.0, 1.0, 1.5)
    t = next(t / 10 for t in range(1, 1000) if decide_hedges([r], plans, FREE, t / 10))
    assert t <= HedgePolicy().threshold(r) + 0.1 < 20.0


def test_probes_race_only_unmeasured_other_methods_on_free_cores():
    from ray_qalloc.placement.hedging import decide_probes
    from ray_qalloc.placement.model import Estimate as E, Plan as P

    def p(**src: str) -> P:
        ests = {"cpu-a/statevector": E("cpu-a/statevector", 1.0, 1.0, 0.0, source="model"),
                "cpu-a/statevector@2": E("cpu-a/statevector@2", 0.6, 1.0, 0.0, source="model"),
                "cpu-a/mps": E("cpu-a/mps", 300.0, 1.0, 0.0, log_sd=1.5, source=src.get("mps", "model")),
                "qpu_x": E("qpu_x", 3.0, 0.9, 1.0)}
        return P("j", ests)

    run = RunningInfo("j", "cpu-a/statevector", 0.0, 1.0)
    free = {"cpu-a/statevector": LiveState(0.0, True), "cpu-a/statevector@2": LiveState(0.0, False),
            "cpu-a/mps": LiveState(0.0, True), "qpu_x": LiveState(0.0, True)}
    kinds = {"qpu_x": "qpu"}
    got = decide_probes([run], {"j": p()}, free, 0.0, kinds)
    assert [(h.job_id, h.backend) for h in got] == [("j", "cpu-a/mps")]      # never a QPU, never the same method
    for measured in ("memory:exact", "memory:censored", "memory:bounded"):
        assert decide_probes([run], {"j": p(mps=measured)}, free, 0.0, kinds) == []
    busy = {**free, "cpu-a/mps": LiveState(0.2, False)}
    assert decide_probes([run], {"j": p()}, busy, 0.0, kinds) == []           # no free core
    assert decide_probes([RunningInfo("j", "cpu-a/statevector", 0.0, 1.0, has_backup=True)], {"j": p()},
                         free, 0.0, kinds) == []                              # one backup per job


# ---- restarts: no core for a backup ----------------------------------------------------------------
# (case, runs, plans, now, expected [(job, alternative)]); a run predicted 1 s, threshold 3 s
RESTART_CASES = [
    ("within its prediction: nothing", [run()], {"j": plan_of("j", mps=1.0, sv=0.5)}, 2.0, []),
    ("overran, another method on its pool needs <= half the remaining time: restart",
     [run()], {"j": plan_of("j", mps=1.0, sv=2.0)}, 4.0, [("j", SV)]),
    ("the fastest such alternative", [run()], {"j": plan_of("j", mps=1.0, sv=1.5, sv2=1.0)}, 4.0, [("j", SV2)]),
    ("the alternative needs more than half the remaining time: keep the run",
     [run()], {"j": plan_of("j", mps=1.0, sv=2.5)}, 4.0, []),
    ("only the same method on other threads: it would repeat the overrun",
     [run(backend=SV)], {"j": plan_of("j", sv=1.0, sv2=0.1)}, 4.0, []),
    ("only another pool: a stop frees nothing there", [run()], {"j": plan_of("j", mps=1.0, sv_b=0.1)}, 4.0, []),
    ("never a QPU run, nor onto a QPU", [run(backend=QPU, kind="qpu")], {"j": plan_of("j", qpu=1.0, sv=0.1)},
     10.0, []),
    ("not onto a QPU", [run()], {"j": plan_of("j", mps=1.0, qpu=0.1)}, 4.0, []),
    ("a job with a backup, or restarted once already: never", [run(has_backup=True), run("k", restarted=True)],
     {"j": plan_of("j", mps=1.0, sv=0.1), "k": plan_of("k", mps=1.0, sv=0.1)}, 4.0, []),
    ("one restart per pool, the worst overrun first",
     [run("j", predicted=1.0), run("k", predicted=0.5, backend=STAB)],
     {"j": plan_of("j", mps=1.0, sv=0.1), "k": plan_of("k", stab=0.5, sv=0.1)}, 4.0, [("k", SV)]),
]


@pytest.mark.parametrize("case, runs, plans, now, expected", RESTART_CASES, ids=[c[0] for c in RESTART_CASES])
def test_decide_restarts(case, runs, plans, now, expected):
    from ray_qalloc.placement.hedging import RESTART_GAIN, decide_restarts

    got = decide_restarts(runs, plans, now, HedgePolicy(k=3.0, min_elapsed_s=0.0, restart_min_s=0.0))
    assert [(r.job_id, r.alternative) for r in got] == expected
    for r in got:
        assert r.alternative_s <= RESTART_GAIN * r.remaining_s and r.backend != r.alternative


def test_a_job_that_got_a_backup_this_tick_is_not_restarted():
    from ray_qalloc.placement.hedging import decide_restarts

    assert decide_restarts([run()], {"j": plan_of("j", mps=1.0, sv=0.1)}, 4.0, hedged=["j"]) == []


def test_no_restart_in_a_runs_first_seconds_whatever_its_prediction():
    """A 6-qubit run predicted 4 ms was restarted at 0.5 s in the demo: its worker was starting."""
    from ray_qalloc.placement.hedging import decide_restarts

    tiny = [run(predicted=0.004)]
    plans = {"j": plan_of("j", mps=0.004, sv=0.05)}
    policy = HedgePolicy(k=3.0, min_elapsed_s=0.5, restart_min_s=5.0)
    assert decide_restarts(tiny, plans, 0.6, policy) == []
    assert decide_restarts(tiny, plans, 4.9, policy) == []
    assert [r.alternative for r in decide_restarts(tiny, plans, 5.1, policy)] == [SV]
