"""The seeded drift model, and FakeQPUBackend with drift on (real Aer runs) and off (unchanged)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qiskit import QuantumCircuit
from qiskit.quantum_info import hellinger_fidelity

from ray_qalloc.backends.fake_qpu import FakeQPUBackend, calibration_of, load_fake_device
from ray_qalloc.exceptions import ConfigError
from ray_qalloc.monitor.calseries import SeriesKey, samples_from_calibration
from ray_qalloc.monitor.drift import (BROKEN_ERROR, Defect, DeviceBaseline, DriftModel, DriftSettings,
                                      apply_to_target, drifted_error, ou_bridge)

P = 900.0
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
STILL = dict(t1_sigma=0.0, t2_sigma=0.0, readout_sigma=0.0, gate_1q_sigma=0.0, gate_2q_sigma=0.0,
             qubit_defect_rate_per_day=0.0, coupler_defect_rate_per_day=0.0)


@pytest.fixture(scope="module")
def manila():
    return load_fake_device("fake_manila_v2")


@pytest.fixture(scope="module")
def sherbrooke():
    return load_fake_device("fake_sherbrooke")


class Clock:
    """A settable clock shared by backends and monitors in a test."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def flip_chain(length: int = 21) -> QuantumCircuit:
    """An odd chain of X gates kept apart by barriers: ends in |1>, so T1 decay shows."""
    qc = QuantumCircuit(1)
    for _ in range(length):
        qc.x(0)
        qc.barrier()
    qc.measure_all()
    return qc


# ------------------------------------------------------------------------------ the model


def test_deterministic_and_independent_of_query_order(manila) -> None:
    s = DriftSettings(seed=7)
    times = [0.0, 5 * P + 123.0, 3 * 86_400.0, 40 * P, 2 * 86_400.0 + 17.0]
    a = DriftModel.for_target(manila.target, s, "fake_manila")
    b = DriftModel.for_target(manila.target, s, "fake_manila")
    forward = [a.state_at(t).samples() for t in times]
    backward = [b.state_at(t).samples() for t in reversed(times)][::-1]
    assert forward == backward
    other_seed = DriftModel.for_target(manila.target, DriftSettings(seed=8), "fake_manila").state_at(times[2])
    other_device = DriftModel.for_target(manila.target, s, "fake_lima").state_at(times[2])
    assert other_seed.samples() != forward[2] and other_device.samples() != forward[2]


@SETTINGS
@given(st.lists(st.floats(0, 20 * 86_400.0), min_size=1, max_size=6), st.integers(0, 3))
def test_state_is_a_function_of_time_whatever_was_asked_before(manila, times: list[float], seed: int) -> None:
    s = DriftSettings(seed=seed, chunk_steps=8)  # small chunks: many boundaries and windows crossed
    warm = DriftModel.for_target(manila.target, s, "fake_manila")
    for t in times:
        warm.state_at(t)
    fresh = DriftModel.for_target(manila.target, s, "fake_manila")
    assert warm.state_at(times[-1]).samples() == fresh.state_at(times[-1]).samples()


def test_time_zero_is_the_snapshot(manila) -> None:
    model = DriftModel.for_target(manila.target, DriftSettings(seed=1), "fake_manila")
    state = model.state_at(0.0)
    snapshot = calibration_of(manila, "m")
    gate_errors = {op: [manila.target[op][(q,)].error for q in range(5)] for op in ("sx", "x")}
    expected = samples_from_calibration(snapshot, gate_errors)
    assert state.samples().keys() == expected.keys()
    for key, value in expected.items():
        assert state.samples()[key] == pytest.approx(value, rel=1e-12), key


def test_wander_has_the_configured_spread_and_mean_reversion(manila) -> None:
    s = DriftSettings(seed=3, **{**STILL, "t1_sigma": 0.2, "t2_sigma": 0.25})
    model = DriftModel.for_target(manila.target, s, "fake_manila")
    times = np.arange(0, 60 * 86_400.0, P)
    z = np.array([model.standardized(t)[:5] for t in times])  # T1 of 5 qubits, unit variance
    assert z.std() == pytest.approx(1.0, abs=0.25)
    assert abs(z.mean()) < 0.4
    lag = int(s.t1_tau_s / P)  # autocorrelation at one tau is 1/e
    corr = np.mean([np.corrcoef(z[:-lag, q], z[lag:, q])[0, 1] for q in range(5)])
    assert corr == pytest.approx(math.exp(-1), abs=0.15)
    t1 = np.array([model.state_at(t).t1_s for t in times[::8]])
    log_ratio = np.log(t1 / model.baseline.t1_s)
    assert log_ratio.std() == pytest.approx(0.2, abs=0.06)


def test_ou_bridge_has_the_exact_conditional_distribution() -> None:
    """Reference: the Gaussian conditional of the knots given both ends, from the covariance matrix."""
    steps, paths, a = 12, 40_000, 0.8
    rng = np.random.default_rng(0)
    start, end = 0.7, -1.2
    bridge = ou_bridge(np.full(paths, start), np.full(paths, end), np.full(paths, a),
                       rng.standard_normal((steps, paths)))
    assert np.allclose(bridge[0], start) and np.allclose(bridge[-1], end)
    k = np.arange(steps + 1)
    cov = a ** np.abs(k[:, None] - k[None, :])  # stationary standardized OU on the knots
    inner, ends = k[1:-1], np.array([0, steps])
    gain = cov[np.ix_(inner, ends)] @ np.linalg.inv(cov[np.ix_(ends, ends)])
    mean = gain @ np.array([start, end])
    var = np.diag(cov[np.ix_(inner, inner)] - gain @ cov[np.ix_(ends, inner)])
    np.testing.assert_allclose(bridge[1:-1].mean(axis=1), mean, atol=0.02)
    np.testing.assert_allclose(bridge[1:-1].var(axis=1), var, rtol=0.05)


@SETTINGS
@given(st.floats(1e-5, 0.3), st.floats(0.2, 5.0), st.floats(0, 0.05), st.floats(0, 0.05))
def test_drifted_error_properties(e0: float, scale: float, limit0: float, limit1: float) -> None:
    cap = BROKEN_ERROR
    value = float(drifted_error(e0, scale, limit0, limit1, cap))
    assert 0.0 <= value <= cap
    assert value >= min(limit1, e0 * scale, cap) - 1e-15          # relaxation is a floor
    assert float(drifted_error(e0, 1.0, limit0, limit0, cap)) == pytest.approx(e0)  # no drift: snapshot
    worse = float(drifted_error(e0, scale, limit0, limit1 + 0.01, cap))
    assert worse >= value                                         # shorter T1 never helps
    assert float(drifted_error(0.9, scale, limit0, limit1, cap)) == 0.9  # broken stays broken


def test_qubit_defect_drops_t1_and_drags_its_errors_up(manila) -> None:
    defect = Defect(element=(2,), start_s=10 * P, duration_s=4 * P, factor=10.0)
    model = DriftModel.for_target(manila.target, DriftSettings(seed=0, **STILL, defects=(defect,)), "m")
    before, during, after = model.state_at(9 * P), model.state_at(11 * P), model.state_at(15 * P)
    assert during.defects == (defect,) and not before.defects and not after.defects
    assert during.t1_s[2] == pytest.approx(before.t1_s[2] / 10.0)
    assert during.t2_s[2] <= 2 * during.t1_s[2] + 1e-15
    assert during.readout_error[2] > before.readout_error[2] * 1.5
    assert during.gate_1q_error["sx"][2] > before.gate_1q_error["sx"][2]
    pair = next(i for i, c in enumerate(during.couplers) if 2 in c)
    assert during.gate_2q_error[pair] > before.gate_2q_error[pair]
    others = [q for q in range(5) if q != 2]
    np.testing.assert_allclose(during.t1_s[others], before.t1_s[others])
    np.testing.assert_allclose(after.t1_s, before.t1_s)


def test_random_defects_follow_their_rates_and_avoid_broken_couplers(sherbrooke) -> None:
    s = DriftSettings(seed=4, qubit_defect_rate_per_day=0.2, coupler_defect_rate_per_day=0.1)
    model = DriftModel.for_target(sherbrooke.target, s, "fake_sherbrooke")
    days = 20
    found = model.defects_between(0.0, days * 86_400.0)
    qubit = [d for d in found if d.kind == "qubit"]
    coupler = [d for d in found if d.kind == "coupler"]
    b = model.baseline
    live = [c for c, e in zip(b.couplers, b.gate_2q_error) if e < BROKEN_ERROR]
    assert len(live) < len(b.couplers)  # sherbrooke has broken couplers: the case is exercised
    expect_q, expect_c = 0.2 * days * b.num_qubits, 0.1 * days * len(live)
    assert abs(len(qubit) - expect_q) < 4 * math.sqrt(expect_q)
    assert abs(len(coupler) - expect_c) < 4 * math.sqrt(expect_c)
    assert all(d.element in live for d in coupler)
    lo, hi = s.defect_t1_factor
    assert all(lo <= d.factor <= hi for d in qubit)
    assert found == model.defects_between(0.0, days * 86_400.0)
    broken = next(c for c in b.couplers if c not in live)
    with pytest.raises(ConfigError, match="broken"):
        DriftModel.for_target(sherbrooke.target, DriftSettings(
            defects=(Defect(element=broken, start_s=0, duration_s=10, factor=3.0),)), "fake_sherbrooke")
    with pytest.raises(ConfigError, match="does not exist"):
        DriftModel.for_target(sherbrooke.target, DriftSettings(
            defects=(Defect(element=(500,), start_s=0, duration_s=10, factor=3.0),)), "fake_sherbrooke")


def test_drifted_target_reads_back_as_the_state(manila) -> None:
    model = DriftModel.for_target(manila.target, DriftSettings(seed=9, defects=(
        Defect(element=(1,), start_s=0.0, duration_s=86_400.0, factor=6.0),
        Defect(element=(1, 2), start_s=0.0, duration_s=86_400.0, factor=4.0))), "m")
    state = model.state_at(7 * 3600.0)
    target = apply_to_target(manila.target, model.baseline, state)
    from ray_qalloc.backends.fake_qpu import calibration_from_target, qubit_gate_errors_of

    cal = calibration_from_target(target, 5, "m", 0.0, 1e-4)
    read_back = samples_from_calibration(cal, qubit_gate_errors_of(target))
    expected = state.samples()
    assert read_back.keys() == expected.keys()
    for key in expected:
        assert read_back[key] == pytest.approx(expected[key], rel=1e-9), key
    assert DeviceBaseline.from_target(target).num_qubits == 5
    assert read_back[SeriesKey("gate_2q_error", (1, 2))] > 3 * model.baseline.gate_2q_error[
        model.baseline.couplers.index((1, 2))]


# ------------------------------------------------------------------------------ the backend


def test_drift_off_is_the_snapshot_unchanged() -> None:
    plain = FakeQPUBackend("fake_manila_v2", name="qpu_manila")
    assert plain.drift_model is None and plain.drift_time() == 0.0
    assert plain.calibration() == calibration_of(plain.device, "qpu_manila")
    assert plain.target is plain.device.target
    assert "calibration_at" not in plain.run(flip_chain(3), 200, seed=1).metadata


def test_drift_without_movement_gives_the_same_counts_as_off() -> None:
    clock = Clock(5 * P)
    still = FakeQPUBackend("fake_manila_v2", drift=DriftSettings(**STILL), clock=clock)
    plain = FakeQPUBackend("fake_manila_v2")
    clock.t += 3 * P
    a, b = still.run(flip_chain(), 2000, seed=3), plain.run(flip_chain(), 2000, seed=3)
    assert a.counts == b.counts and a.metadata["layout"] == b.metadata["layout"]
    assert a.metadata["calibration_at"] == 8 * P
    cal = still.calibration()
    assert cal.taken_at == 8 * P and cal.t1_s == plain.calibration().t1_s


def test_calibration_moves_with_the_clock_in_steps() -> None:
    clock = Clock(0.0)
    backend = FakeQPUBackend("fake_manila_v2", drift=DriftSettings(seed=2), clock=clock)
    first = backend.calibration()
    clock.t = P - 1.0
    assert backend.calibration() is first  # one calibration per step, as a provider publishes
    clock.t = 30 * P
    later = backend.calibration()
    assert later.taken_at == 30 * P and later.t1_s != first.t1_s
    fixed = FakeQPUBackend("fake_manila_v2", drift=DriftSettings(seed=2, origin_s=-30 * P), clock=Clock(0.0))
    assert fixed.calibration().t1_s == later.t1_s  # fixed origin: the same device from another process


def test_defect_makes_real_aer_counts_worse_then_recovers() -> None:
    """A defect on every qubit, so whichever qubit layout picks sits in it."""
    defects = tuple(Defect(element=(q,), start_s=2 * P, duration_s=2 * P, factor=10.0) for q in range(5))
    clock = Clock(0.0)
    backend = FakeQPUBackend("fake_manila_v2", drift=DriftSettings(**STILL, defects=defects), clock=clock)
    ideal = {"1": 1}
    fidelity = {}
    for label, t in (("before", P), ("during", 3 * P), ("after", 5 * P)):
        clock.t = t
        result = backend.run(flip_chain(), 4000, seed=11)
        fidelity[label] = hellinger_fidelity(result.counts, ideal)
        fidelity[label + "_esp"] = result.metadata["esp"]
    # 4000 shots: the statistical error of the fidelity is well under 0.01
    assert fidelity["during"] < fidelity["before"] - 0.03
    assert fidelity["after"] == pytest.approx(fidelity["before"], abs=0.01)
    assert fidelity["during_esp"] < fidelity["before_esp"]


def test_noise_aware_layout_moves_off_a_defective_qubit() -> None:
    clock = Clock(0.0)
    probe = FakeQPUBackend("fake_manila_v2", drift=DriftSettings(**STILL), clock=clock)
    chosen = probe.run(flip_chain(), 100, seed=1).metadata["layout"][0]
    defect = Defect(element=(chosen,), start_s=P, duration_s=4 * P, factor=15.0)
    backend = FakeQPUBackend("fake_manila_v2", drift=DriftSettings(**STILL, defects=(defect,)), clock=clock)
    clock.t = 2 * P
    during = backend.run(flip_chain(), 4000, seed=1)
    assert during.metadata["layout"][0] != chosen
    # pinned to the defective qubit through its noise model, the same circuit is clearly worse
    from qiskit_aer import AerSimulator

    compact = flip_chain()
    sim = AerSimulator()
    bad = sim.run(compact, shots=4000, seed_simulator=1,
                  noise_model=backend.noise_model((chosen,))).result().get_counts()
    clock.t = 0.0
    good = sim.run(compact, shots=4000, seed_simulator=1,
                   noise_model=backend.noise_model((chosen,))).result().get_counts()
    assert hellinger_fidelity(bad, {"1": 1}) < hellinger_fidelity(good, {"1": 1}) - 0.03
