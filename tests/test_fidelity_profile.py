"""What a device's noise does to a circuit's *measured* (Hellinger) fidelity: the depolarizing map
of its ideal output (``costmodel.fidelity.output_profile`` / ``observed_fidelity``), taken at
intake for quantum-intent jobs and applied where placement ranks QPUs."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qiskit import QuantumCircuit, qasm2

from ray_qalloc.costmodel.fidelity import (PROFILE_FEATURES, esp_equivalent, exact_distribution, measure_counts,
                                           observed_fidelity, output_profile, profile_of)


def _exact_map(probs: list[float], bits: int, e: float) -> float:
    n = 2.0 ** bits
    return sum(math.sqrt(p * (e * p + (1 - e) / n)) for p in probs) ** 2


def _random_circuit(n: int, depth: int, seed: int) -> QuantumCircuit:
    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n, n)
    for _ in range(depth):
        for q in range(n):
            qc.u(*rng.uniform(0, 2 * math.pi, 3), q)
        for q in range(0 if _ % 2 == 0 else 1, n - 1, 2):
            qc.cx(q, q + 1)
    qc.measure(range(n), range(n))
    return qc


def _ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure(range(n), range(n))
    return qc


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 6), weights=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=64),
       e=st.floats(0.0, 1.0))
def test_the_profile_reproduces_the_exact_map_and_inverts(bits: int, weights: list[float], e: float) -> None:
    """Against the formula summed directly over a random ideal distribution (the reference)."""
    weights = weights[:2 ** bits]
    total = sum(weights)
    probs = [w / total for w in weights]
    dist = {format(i, f"0{bits}b"): p for i, p in enumerate(probs)}
    prof = output_profile(dist, bits)
    exact = _exact_map(probs, bits, e)
    assert observed_fidelity(e, prof) == pytest.approx(exact, abs=0.02)
    assert observed_fidelity(e, prof) >= e - 1e-12                    # noise never scores below e
    assert observed_fidelity(1.0, prof) == pytest.approx(1.0)
    back = esp_equivalent(observed_fidelity(e, prof), prof)
    if observed_fidelity(0.0, prof) < observed_fidelity(e, prof) - 1e-9:
        assert back == pytest.approx(e, abs=1e-4)


def test_concentrated_outputs_keep_the_esp_and_uniform_ones_hide_all_noise() -> None:
    ghz = exact_distribution(_ghz(8))[0]
    prof = output_profile(ghz, 8)
    for e in (0.1, 0.5, 0.9):
        assert observed_fidelity(e, prof) == pytest.approx(e, abs=0.01)
    uniform = {format(i, "03b"): 1 / 8 for i in range(8)}
    assert all(observed_fidelity(e, output_profile(uniform, 3)) == pytest.approx(1.0) for e in (0.0, 0.3))
    assert observed_fidelity(0.4, None) == 0.4 and esp_equivalent(0.4, None) == 0.4


def test_the_map_predicts_an_emulated_devices_measured_fidelity_better_than_its_esp() -> None:
    """The emulator's noise is local (per gate, T1/T2, readout), not the global channel the map
    assumes: this is the model tested against a device, not against itself."""
    from ray_qalloc.backends.fake_qpu import FakeQPUBackend

    dev = FakeQPUBackend("fake_sherbrooke")
    errors_esp, errors_map = [], []
    for qc in (_random_circuit(6, 20, 0), _random_circuit(7, 40, 1), _ghz(8)):
        res = dev.run(qc, 8192, seed=1)
        measured = measure_counts(qc, res.counts, min_shots_per_outcome=0.0).fidelity
        esp = float(res.metadata["esp"])
        prof = output_profile(exact_distribution(qc)[0], qc.num_clbits)
        errors_esp.append(abs(esp - measured))
        errors_map.append(abs(observed_fidelity(esp, prof) - measured))
    # random circuits: ESP 0.58 and 0.37 where ~0.93 and ~0.89 were measured; the map within 0.1
    assert max(errors_map[:2]) < 0.1 and min(errors_esp[:2]) > 0.3
    assert errors_map[2] <= errors_esp[2] + 0.01          # a GHZ's output is concentrated: map ≈ ESP


def test_intake_takes_the_profile_of_small_quantum_jobs_only() -> None:
    from ray_qalloc.config import Limits
    from ray_qalloc.jobs import make_spec, prepare_job

    src = qasm2.dumps(_random_circuit(5, 4, 1))
    quantum = prepare_job(make_spec(circuit=src, intent="quantum"), Limits())
    prof = profile_of(quantum.features)
    assert prof is not None and len(prof) == len(PROFILE_FEATURES) and prof[-1] == pytest.approx(1.0)
    assert profile_of(prepare_job(make_spec(circuit=src, intent="auto"), Limits()).features) is None
    wide = qasm2.dumps(_ghz(14))
    assert profile_of(prepare_job(make_spec(circuit=wide, intent="quantum"), Limits()).features) is None


def test_placement_ranks_qpus_by_the_fidelity_a_measurement_will_show() -> None:
    """A spread output narrows the gap between devices (and never reorders them); simulators
    keep their exact 1.0."""
    from ray_qalloc import overruns
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.config import Limits
    from ray_qalloc.costmodel.prior import HeuristicPrior
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.placement.model import BackendView, JobView, QubitProfile

    views = []
    for name in ("qpu_fez", "qpu_sherbrooke"):
        qpu = make_backend(name)
        cal = qpu.calibration()
        views.append(BackendView(qpu.spec(), True, cal.summary(), time.time() - cal.taken_at, QubitProfile.of(cal)))
    views.append(BackendView(make_backend("aer_statevector").spec()))
    src = qasm2.dumps(_random_circuit(8, 8, 3))
    stack = overruns.wrap_predictor(HeuristicPrior())

    def fidelities(intent: str) -> dict[str, float]:
        job = prepare_job(make_spec(circuit=src, intent=intent), Limits())
        jv = JobView(job.id, job.num_qubits, job.ops, job.features, job.shots, intent=intent)
        return {e.backend: e.fidelity for e in stack.predict(jv, views)}

    esp, seen = fidelities("auto"), fidelities("quantum")
    assert esp["aer_statevector"] == seen["aer_statevector"] == 1.0
    assert seen["qpu_fez"] > esp["qpu_fez"] and seen["qpu_sherbrooke"] > esp["qpu_sherbrooke"]
    assert (seen["qpu_fez"] > seen["qpu_sherbrooke"]) == (esp["qpu_fez"] > esp["qpu_sherbrooke"])
    assert abs(math.log(seen["qpu_fez"] / seen["qpu_sherbrooke"])) < abs(math.log(esp["qpu_fez"] / esp["qpu_sherbrooke"]))


def test_the_meter_learns_in_success_probability_space() -> None:
    from ray_qalloc.fidelity_meter import _sample

    row = {"backend": "d", "calibration_estimate": 0.5, "fidelity": 0.93, "esp_equivalent": 0.48,
           "measured_at": 1.0, "calibration_at": None}
    assert _sample(row).measured == 0.48
    assert _sample({**row, "esp_equivalent": None}).measured == 0.93       # rows recorded before


def test_the_fidelity_benchmark_scores_what_placement_shows() -> None:
    """``benchmarks.fidelity.fidelity_accuracy``: a device noisier than calibrated (log F 1.5× the
    estimate, seen through each circuit's depolarizing map) is learned in ESP space and scored
    against what was 'measured'; the map alone already beats the raw ESP on spread outputs."""
    import benchmarks.fidelity as bench
    from ray_qalloc.costmodel.prior import HeuristicPrior

    circuits = [(f"rand-{k}", qasm2.dumps(_random_circuit(5, 3 + k, k)), 5) for k in range(6)]
    circuits += [(f"ghz-{n}", qasm2.dumps(_ghz(n)), n) for n in (3, 4, 5, 6)]
    est = bench.calibration_estimates(circuits, ["qpu_fez"], HeuristicPrior())

    class Profiles:
        def get(self, qasm: str, q: str) -> dict:
            name = next(n for n, src, _ in circuits if src == qasm)
            truth = observed_fidelity(est[(name, q)] ** 1.5, est[(name, bench.PROFILE_KEY)])
            return {"fidelity": truth, "ideal": "exact", "shots": 8192, "outcomes": 1.0, "esp": est[(name, q)]}

    out = bench.fidelity_accuracy(Profiles(), circuits, ["qpu_fez"], HeuristicPrior())   # type: ignore[arg-type]
    assert out["n_test"] == 5
    assert out["fidelity_mae"] < out["fidelity_mae_mapped"] < out["fidelity_mae_calibration"]
    assert out["devices"]["qpu_fez"]["exponent"] > 1.0


def _qpu_views(*names: str) -> list:
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.placement.model import BackendView, QubitProfile

    out = []
    for name in names:
        qpu = make_backend(name)
        cal = qpu.calibration()
        out.append(BackendView(qpu.spec(), True, cal.summary(), 0.0, QubitProfile.of(cal)))
    return out


@pytest.mark.parametrize("measured", [True, False])
def test_the_simulation_learns_measured_fidelity_as_the_live_meter_does(measured: bool) -> None:
    """Device A measures far below its calibration on a GHZ-5 stream (B as calibrated): qalloc's
    simulated allocator learns it from the measured runs and moves the later jobs to B. An
    estimate standing in for a measurement (``unmeasured``) teaches nothing."""
    from benchmarks.live_learning import LearningPlanner
    from benchmarks.simulation import SimJob, simulate
    from ray_qalloc.config import Limits
    from ray_qalloc.costmodel.prior import HeuristicPrior
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.overruns import wrap_predictor
    from ray_qalloc.placement.model import JobView

    views = _qpu_views("qpu_fez", "qpu_torino")
    pj = prepare_job(make_spec(circuit=qasm2.dumps(_ghz(5)), shots=1024, intent="quantum"), Limits())
    jobs = [SimJob(f"g{i}", 10.0 * i, JobView(f"g{i}", pj.num_qubits, pj.ops, pj.features, pj.shots,
                                              intent="quantum"), "ghz5") for i in range(8)]
    planner = LearningPlanner(views, wrap_predictor(HeuristicPrior()), {v.name: v.spec for v in views})
    first = {e.backend: e.fidelity for e in planner.plan(jobs[0], 0.0).estimates.values()}
    worse, better = sorted(first, key=first.get, reverse=True)      # the calibration's favourite first
    fidelity = {j.id: {worse: 0.2 * first[worse], better: first[better]} for j in jobs}
    truth = {j.id: {worse: 2.0, better: 2.0} for j in jobs}
    unmeasured = set() if measured else {(j.id, b) for j in jobs for b in (worse, better)}
    rec: list[dict] = []
    simulate(jobs, truth, planner, [v.spec for v in views], "qalloc", record=rec, fidelity=fidelity,
             unmeasured=unmeasured, node_cpus=2.0)
    picks = [r["backend"] for r in sorted(rec, key=lambda r: r["arrival_s"])]
    assert picks[0] == worse
    if measured:
        assert planner.fidelity_samples >= 1 and picks[-1] == better
    else:
        assert planner.fidelity_samples == 0 and set(picks) == {worse}
