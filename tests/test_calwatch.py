"""Calibration in placement: per-qubit profiles, the coherence budget, and the allocator's loop
that reads every QPU's calibration on a period (a real emulated device drifting in a Ray actor)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from typing import Any

import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.allocator import Allocator
from ray_qalloc.backends.actor import RemoteBackendActor, backend_actor_options
from ray_qalloc.backends.base import BackendSpec, Calibration
from ray_qalloc.config import load_settings
from ray_qalloc.costmodel.prior import HeuristicPrior, qpu_duration_s, qpu_fidelity
from ray_qalloc.monitor.calseries import SeriesKey
from ray_qalloc.monitor.drift import Defect, DriftSettings
from ray_qalloc.placement.filters import CoherenceBudgetFilter
from ray_qalloc.placement.model import BackendView, JobView, QubitProfile

QPU = BackendSpec("qpu_test", "qpu", "fake_qpu", 20, device="fake_test", noisy=True)


def job(n: int, depth: float = 10, depth_2q: float = 4, size: float = 30, two_q: float = 8) -> JobView:
    feats = {"depth": depth, "two_qubit_depth": depth_2q, "size": size, "two_qubit_count": two_q,
             "measure_count": float(n), "bandwidth": 1.0, "max_degree": 2.0}
    return JobView("j", n, frozenset({"h", "cx", "measure"}), feats, 1000, intent="quantum")


def calibration(t1: list[float], t2: list[float] | None = None, readout: list[float] | None = None) -> Calibration:
    n = len(t1)
    return Calibration("qpu_test", time.time(), tuple(t1), tuple(t2 or t1), tuple(readout or [0.02] * n),
                       {"sx": 3e-4, "x": 3e-4}, {"sx": 32e-9, "cz": 68e-9}, 1.56e-6,
                       {(i, i + 1): 5e-3 for i in range(n - 1)})


# ---- the profile against a plain reference -------------------------------------------------------
times = st.floats(min_value=1e-6, max_value=1e-3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(times, times, st.floats(min_value=0.0, max_value=0.4)), min_size=1, max_size=40),
       st.integers(min_value=0, max_value=45), st.floats(min_value=0.0, max_value=1e-3))
def test_profile_is_the_best_qubits_by_each_figure(qubits, n, duration):
    t1, t2, ro = (list(x) for x in zip(*qubits))
    p = QubitProfile.from_calibration(tuple(t1), tuple(t2), tuple(ro))
    k = min(n, len(qubits))
    rates = sorted((1 / a + 1 / b) / 2 for a, b in zip(t1, t2))
    assert p.decay(n, duration) == pytest.approx(math.exp(-duration * sum(rates[:k])), rel=1e-9)
    assert p.readout_fidelity(n) == pytest.approx(math.prod(sorted((1 - e for e in ro), reverse=True)[:k]),
                                                  rel=1e-9)
    coherence = sorted((min(a, b) for a, b in zip(t1, t2)), reverse=True)
    assert p.weakest_coherence_s(n) == (coherence[k - 1] if k else math.inf)


def test_a_qubit_without_coherence_figures_ranks_last():
    p = QubitProfile.from_calibration((100e-6, None, 50e-6), (80e-6, 70e-6, float("nan")), (0.01, None, 0.02))
    assert p.weakest_coherence_s(1) == 80e-6 and p.weakest_coherence_s(2) == 0.0
    assert p.decay(1, 1e-6) > 0 and p.decay(2, 1e-6) == 0.0   # only q0 has both figures
    assert p.readout_fidelity(2) == pytest.approx(0.99 * 0.98) and p.readout_fidelity(3) == 0.0


# ---- fidelity estimates ----------------------------------------------------------------------------
def test_one_defective_qubit_does_not_lower_a_small_jobs_estimate_but_a_wide_ones():
    healthy = calibration([200e-6] * 20)
    defect = calibration([200e-6] * 19 + [2e-6])          # a TLS defect: T1 100× down on one qubit
    ph, pd = QubitProfile.of(healthy), QubitProfile.of(defect)
    small, wide = job(5), job(20)
    assert qpu_fidelity(small, healthy.summary(), pd) == pytest.approx(qpu_fidelity(small, healthy.summary(), ph))
    assert qpu_fidelity(wide, defect.summary(), pd) < 0.8 * qpu_fidelity(wide, healthy.summary(), ph)
    # the medians cannot tell: the defect hides in them
    assert qpu_fidelity(wide, defect.summary()) == pytest.approx(qpu_fidelity(wide, healthy.summary()))


def test_a_chip_with_few_good_qubits_is_estimated_by_them():
    cal = calibration([300e-6] * 4 + [30e-6] * 16)
    p = QubitProfile.of(cal)
    assert qpu_fidelity(job(4), cal.summary(), p) > qpu_fidelity(job(4), cal.summary())   # on the 4 good ones
    assert qpu_fidelity(job(12), cal.summary(), p) < qpu_fidelity(job(4), cal.summary(), p)


def test_the_prior_uses_the_profile_and_the_calibrated_gate_times():
    cal = calibration([200e-6] * 20)
    p = QubitProfile.of(cal)
    assert p.gate_1q_s == 32e-9 and p.gate_2q_s == 68e-9 and p.readout_s == 1.56e-6
    j = job(5, depth=100, depth_2q=40)
    assert qpu_duration_s(j, p) == pytest.approx(60 * 32e-9 + 40 * 68e-9 + 1.56e-6)
    with_p = HeuristicPrior().predict(j, [BackendView(QPU, calibration=cal.summary(), qubits=p)])[0]
    without = HeuristicPrior().predict(j, [BackendView(QPU, calibration=cal.summary())])[0]
    assert with_p.runtime_s < without.runtime_s          # 68 ns CZ against the typical 500 ns
    assert with_p.fidelity == pytest.approx(qpu_fidelity(j, cal.summary(), p))


# ---- the coherence budget --------------------------------------------------------------------------
def view(cal: Calibration) -> BackendView:
    return BackendView(QPU, calibration=cal.summary(), qubits=QubitProfile.of(cal))


def test_the_coherence_budget_refuses_a_circuit_longer_than_its_qubits_live():
    cal = calibration([100e-6] * 20)
    f = CoherenceBudgetFilter(1.0)
    shallow = job(5, depth=50, depth_2q=20)
    deep = job(5, depth=5000, depth_2q=2000)            # 3000·32 ns + 2000·68 ns ≈ 232 µs > 100 µs
    assert f.check(shallow, view(cal)).ok
    status = f.check(deep, view(cal))
    assert status.code == "unresolvable" and "best qubit" in status.reasons[0]
    assert CoherenceBudgetFilter(3.0).check(deep, view(cal)).ok
    assert CoherenceBudgetFilter(None).check(deep, view(cal)).ok
    assert f.check(deep, BackendView(QPU, calibration=cal.summary())).ok     # no profile: not judged


def test_degraded_best_qubits_make_a_qpu_wait_not_refuse():
    # the best qubit could hold it, the 5 best cannot: the next calibration may allow it
    cal = calibration([400e-6] + [60e-6] * 19)
    status = CoherenceBudgetFilter(1.0).check(job(5, depth=3000, depth_2q=1000), view(cal))
    assert status.code == "unschedulable" and "weakest of the 5 best" in status.reasons[0]


def test_simulators_are_never_judged_by_coherence():
    sim = BackendView(replace(QPU, name="sv", kind="simulator", family="aer"), qubits=QubitProfile.of(
        calibration([1e-9] * 20)))
    assert CoherenceBudgetFilter(1.0).check(job(5, depth=10_000), sim).ok


# ---- the live loop ---------------------------------------------------------------------------------
def test_the_allocator_reads_drifting_calibrations_into_placement_and_the_series(qa, tmp_path):
    """A real emulated torino drifting in a Ray actor (one epoch a second, a defect on q7 from 6 s):
    the loop records every epoch in the series, members take each new calibration, the detector
    sees the defect, and the queue is planned against the new values."""
    origin = time.time()
    drift = DriftSettings(seed=5, step_s=1.0, qubit_defect_rate_per_day=0.0, coupler_defect_rate_per_day=0.0,
                          defects=(Defect(element=(7,), start_s=6.0, duration_s=600.0, factor=30.0),),
                          origin_s=origin)
    settings = load_settings(data_dir=tmp_path, health_interval_s=0.5, history_flush_s=60.0,
                             monitor={"calibration_period_s": 0.5})
    from ray_qalloc.backends.registry import make_backend

    spec = make_backend("qpu_torino").spec()
    actor = RemoteBackendActor.options(**backend_actor_options(spec, "calwatch-test", use_resource=False)).remote(
        "qpu_torino", {"drift": drift}, "calwatch-test", "nobody")

    async def main() -> tuple[Any, ...]:
        alloc = Allocator(settings, members={spec.name: (spec, actor)})
        await alloc.ready()
        member = alloc.members[spec.name]
        first_at = member.calibration_taken_at
        seen_t1: list[float] = []
        deadline = time.monotonic() + 60
        replans = 0
        original = alloc.d.replan_queued

        def counting() -> None:
            nonlocal replans
            replans += 1
            original()

        alloc.d.replan_queued = counting     # type: ignore[method-assign]
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            snap = alloc.calwatch.monitor.current(spec.name)
            if snap is not None:
                seen_t1.append(snap.values[SeriesKey("t1", (7,))])
            if any(e.key == SeriesKey("t1", (7,)) and e.kind == "drop" for e in alloc.calwatch.events()):
                break
        status = await alloc.calibration_status()
        return (member, first_at, seen_t1, alloc.calwatch.events(), status, replans,
                alloc.calwatch.monitor.series.history(spec.name))

    member, first_at, seen_t1, events, status, replans, history = asyncio.run(main())
    ray.kill(actor)
    assert member.calibration_taken_at > first_at          # placement took later epochs
    assert member.qubits is not None and member.qubits.qubits == 133
    assert len(history) >= 5                               # the detector's warm-up (4) and the drop
    assert [at for at, _ in history] == sorted({at for at, _ in history})
    drops = [e for e in events if e.key == SeriesKey("t1", (7,)) and e.kind == "drop"]
    assert drops, [e.message for e in events]
    assert drops[0].at - origin >= 6.0                     # not before the defect began
    assert seen_t1[-1] < seen_t1[0] / 10
    assert replans >= 3
    assert status[0]["device"] == spec.name and "q7 T1" in status[0]["alarms"]
