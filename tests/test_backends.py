"""Executors: Aer methods, emulated QPUs, the IBM adapter in local mode, and the registry.

No Ray here: these are the classes a backend actor calls in its worker process.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit.library import QFTGate

from ray_qalloc.backends import (DEFAULT_POOL, AerBackend, Backend, FakeQPUBackend,
                                 IBMRuntimeBackend, Reattachable, default_backends,
                                 gpu_available, make_backend, modelled_qpu_seconds,
                                 scheduled_duration)
from ray_qalloc.backends.aer import METHODS, supported_operations
from ray_qalloc.backends.fake_qpu import depolarize_counts
from ray_qalloc.exceptions import BackendError

SHOTS = 4000
FAKE_QPUS = ("qpu_torino", "qpu_sherbrooke", "qpu_fez")


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure(range(n), range(n))
    return qc


def qft_of_plus(n: int) -> QuantumCircuit:
    """QFT of |+>^n is |0>^n: a wide circuit with a known ideal answer."""
    qc = QuantumCircuit(n, n)
    qc.h(range(n))
    qc.append(QFTGate(n), range(n))
    qc.measure(range(n), range(n))
    return qc


def fraction(counts: dict[str, int], *keys: str) -> float:
    return sum(counts.get(k, 0) for k in keys) / sum(counts.values())


@pytest.fixture(autouse=True)
def no_ibm_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    """No test may find a real account: clear the variables and hide the saved-account file."""
    for var in ("QISKIT_IBM_TOKEN", "QISKIT_IBM_INSTANCE", "QISKIT_IBM_CHANNEL", "QISKIT_IBM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    yield


@pytest.fixture(scope="module")
def fake_qpus() -> dict[str, FakeQPUBackend]:
    return {name: make_backend(name) for name in FAKE_QPUS}  # type: ignore[misc]


# ------------------------------------------------------------------------------ Aer


@pytest.mark.parametrize("method", [m for m in METHODS if m != "automatic"])
def test_aer_ghz_is_half_zeros_half_ones(method: str) -> None:
    backend = AerBackend(method)
    result = backend.run(ghz(4), SHOTS, seed=11)
    assert set(result.counts) <= {"0000", "1111"}
    assert sum(result.counts.values()) == SHOTS
    assert abs(fraction(result.counts, "0000") - 0.5) < 0.05
    assert result.method == method
    assert result.backend == backend.spec().name
    assert result.wall_s >= result.execute_s > 0
    assert result.transpile_s == 0.0  # h, cx, measure: every method runs them as they are


def test_aer_seed_makes_runs_repeatable() -> None:
    backend = AerBackend("statevector")
    assert backend.run(ghz(3), 500, seed=5).counts == backend.run(ghz(3), 500, seed=5).counts


def test_statevector_matches_born_rule() -> None:
    theta = 1.1
    qc = QuantumCircuit(1, 1)
    qc.ry(theta, 0)
    qc.measure(0, 0)
    shots = 20_000
    result = AerBackend("statevector").run(qc, shots, seed=3)
    p0 = math.cos(theta / 2) ** 2
    sigma = math.sqrt(p0 * (1 - p0) / shots)
    assert abs(result.counts.get("0", 0) / shots - p0) < 5 * sigma


def test_mps_transpiles_gates_it_lacks() -> None:
    assert "crx" not in supported_operations("matrix_product_state")
    qc = QuantumCircuit(3, 3)
    qc.h(0)
    qc.crx(math.pi, 0, 1)                      # |1> on 0 flips 1 (up to phase)
    qc.cu(math.pi, 0, math.pi, 0, 1, 2)        # cu3(pi, 0, pi) is a CX
    qc.measure(range(3), range(3))
    result = AerBackend("mps").run(qc, SHOTS, seed=2)
    assert result.transpile_s > 0 and result.metadata["transpiled"]
    assert set(result.counts) <= {"000", "111"}
    assert abs(fraction(result.counts, "000") - 0.5) < 0.05


def test_stabilizer_refuses_non_clifford() -> None:
    backend = AerBackend("stabilizer")
    for gate in ("t", "rz"):
        qc = QuantumCircuit(1, 1)
        qc.h(0)
        qc.t(0) if gate == "t" else qc.rz(0.3, 0)
        qc.measure(0, 0)
        with pytest.raises(BackendError, match="Clifford"):
            backend.run(qc, 10)
    clifford = QuantumCircuit(1, 1)
    clifford.rz(math.pi / 2, 0)                # S up to phase: accepted
    clifford.measure(0, 0)
    assert backend.run(clifford, 10, seed=1).counts == {"0": 10}


def test_aer_spec_sizes_from_memory() -> None:
    sv = AerBackend("statevector", memory_bytes=16 * 2**20, threads=2)
    dm = AerBackend("density_matrix", memory_bytes=16 * 2**20)
    spec = sv.spec()
    assert (spec.name, spec.kind, spec.family, spec.method) == ("aer_statevector", "simulator", "aer", "statevector")
    assert spec.resource_name == "qalloc_backend_aer_statevector"
    assert spec.num_qubits == 20 and dm.spec().num_qubits == 10
    assert spec.threads == 2 and spec.memory_bytes == 16 * 2**20 and not spec.noisy
    assert "cx" in spec.basis_gates and list(spec.basis_gates) == sorted(spec.basis_gates)
    assert AerBackend("stabilizer").spec().clifford_only
    assert AerBackend("mps").spec().name == "aer_mps"
    assert AerBackend("mps").spec().num_qubits >= 1000
    assert sv.calibration() is None
    with pytest.raises(BackendError, match="exceed"):
        sv.run(ghz(21), 10)
    with pytest.raises(BackendError, match="unknown Aer method"):
        AerBackend("tensor_network_magic")


# ------------------------------------------------------------------------------ fake QPUs


@pytest.mark.parametrize("name", FAKE_QPUS)
def test_fake_qpu_calibration(fake_qpus: dict[str, FakeQPUBackend], name: str) -> None:
    backend = fake_qpus[name]
    spec = backend.spec()
    cal = backend.calibration()
    assert (spec.kind, spec.family, spec.noisy, spec.slots) == ("qpu", "fake_qpu", True, 1)
    assert spec.device is not None and spec.device.startswith("fake_") and spec.num_qubits >= 127
    assert len(cal.t1_s) == len(cal.t2_s) == len(cal.readout_error) == spec.num_qubits
    assert all(v > 0 for v in cal.t1_s if v == v) and all(v > 0 for v in cal.t2_s if v == v)
    two_q = "cz" if "cz" in spec.basis_gates else "ecr"
    assert 0 < cal.gate_error["sx"] < 0.01 and 0 < cal.gate_error[two_q] < 0.1
    assert cal.gate_duration_s[two_q] > 0 and cal.readout_duration_s > 0
    assert cal.edge_error and cal.rep_delay_s > 0 and cal.taken_at > 1.5e9
    assert backend.calibration() is cal  # computed once


@pytest.mark.parametrize("name", FAKE_QPUS)
def test_fake_qpu_ghz3_is_noisy_but_right(fake_qpus: dict[str, FakeQPUBackend], name: str) -> None:
    backend = fake_qpus[name]
    result = backend.run(ghz(3), SHOTS, seed=7)
    assert sum(result.counts.values()) == SHOTS
    good = fraction(result.counts, "000", "111")
    assert 0.8 <= good < 1.0                       # mostly right, but noise is there
    assert abs(fraction(result.counts, "000") - fraction(result.counts, "111")) < 0.1
    meta = result.metadata
    assert meta["noise_model"] == "exact_local" and len(meta["layout"]) == 3
    assert 0.5 < meta["esp"] < 1.0 and meta["duration_s"] > 0
    cal = backend.calibration()
    expected = SHOTS * (meta["duration_s"] + cal.rep_delay_s) + backend.overhead_s
    assert result.qpu_s == pytest.approx(expected)
    assert result.qpu_s == pytest.approx(modelled_qpu_seconds(SHOTS, meta["duration_s"], cal.rep_delay_s, 2.0))
    assert result.wall_s >= result.transpile_s + result.execute_s * 0.99


def test_fake_qpu_noise_models_are_cached(fake_qpus: dict[str, FakeQPUBackend]) -> None:
    backend = fake_qpus["qpu_fez"]
    layout = tuple(backend.run(ghz(3), 100, seed=1).metadata["layout"])
    assert backend.noise_model(layout) is backend.noise_model(layout)
    start = time.perf_counter()
    backend.run(ghz(3), 1000, seed=2)
    assert time.perf_counter() - start < 1.0


def test_fake_qpu_layout_avoids_broken_couplers(fake_qpus: dict[str, FakeQPUBackend]) -> None:
    backend = fake_qpus["qpu_sherbrooke"]
    target = backend.device.target
    broken = {q for q, p in target["ecr"].items() if p is not None and p.error is not None and p.error >= 0.5}
    assert broken  # the snapshot has some
    for circuit in (ghz(3), qft_of_plus(12)):
        transpiled = backend.transpile(circuit)
        used = {tuple(transpiled.find_bit(q).index for q in inst.qubits)
                for inst in transpiled.data if inst.operation.name == "ecr"}
        assert used and not used & broken


def test_fake_qpu_wide_circuit_takes_global_depolarizing_path(fake_qpus: dict[str, FakeQPUBackend]) -> None:
    backend = fake_qpus["qpu_torino"]
    start = time.perf_counter()
    result = backend.run(qft_of_plus(16), SHOTS, seed=4)
    assert time.perf_counter() - start < 10.0
    assert result.metadata["noise_model"] == "global_depolarizing"
    assert len(result.metadata["layout"]) >= 16
    assert sum(result.counts.values()) == SHOTS
    assert all(len(k) == 16 for k in result.counts)
    wide_ghz = backend.run(ghz(20), SHOTS, seed=4)
    assert wide_ghz.metadata["noise_model"] == "global_depolarizing"
    good = fraction(wide_ghz.counts, "0" * 20, "1" * 20)
    assert 0.05 < good < 0.95 and len(wide_ghz.counts) > 2
    # the kept fraction follows the estimate (readout is applied as flips on top)
    assert good == pytest.approx(wide_ghz.metadata["esp"], abs=0.1)


def test_fake_qpu_keeps_register_format() -> None:
    backend = FakeQPUBackend("fake_manila_v2", name="qpu_manila")
    qr, a, b = QuantumRegister(2), ClassicalRegister(1, "a"), ClassicalRegister(1, "b")
    qc = QuantumCircuit(qr, a, b)
    qc.x(1)
    qc.measure(0, a[0])
    qc.measure(1, b[0])
    result = backend.run(qc, 500, seed=1)
    assert max(result.counts, key=result.counts.get) == "1 0"
    assert backend.spec().name == "qpu_manila" and backend.spec().num_qubits == 5


def test_depolarize_counts() -> None:
    import numpy as np

    counts = {"1 01": 600, "0 00": 400}
    same = depolarize_counts(counts, keep=1.0, flips={}, rng=np.random.default_rng(0))
    assert same == counts
    mixed = depolarize_counts(counts, keep=0.0, flips={0: 0.0, 1: 0.0, 2: 0.0}, rng=np.random.default_rng(0))
    assert sum(mixed.values()) == 1000 and len(mixed) == 8
    assert all(k[1] == " " for k in mixed) and max(mixed.values()) < 200
    flipped = depolarize_counts({"000": 1000}, keep=1.0, flips={0: 1.0}, rng=np.random.default_rng(0))
    assert flipped == {"001": 1000}


def test_scheduled_duration_is_the_critical_path() -> None:
    from qiskit_ibm_runtime.fake_provider import FakeManilaV2

    target = FakeManilaV2().target
    qc = QuantumCircuit(5, 1)
    qc.x(0)
    qc.x(0)
    qc.x(1)
    qc.measure(0, 0)
    schedule = scheduled_duration(qc, target)
    expected = target["x"][(0,)].duration * 2 + target["measure"][(0,)].duration
    assert schedule.duration_s == pytest.approx(expected)
    assert schedule.idle_s[0] == 0.0


# ------------------------------------------------------------------------------ IBM


@pytest.fixture(scope="module")
def ibm_local() -> IBMRuntimeBackend:
    from qiskit_ibm_runtime.fake_provider import FakeManilaV2

    return IBMRuntimeBackend(backend=FakeManilaV2())


def test_ibm_local_mode_runs_and_reports_the_job_id_first(ibm_local: IBMRuntimeBackend,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    submitted: list[str] = []
    waits: list[int] = []
    original_wait = ibm_local._wait

    def wait(job, job_id):  # type: ignore[no-untyped-def]
        waits.append(len(submitted))           # how many ids were reported before waiting
        return original_wait(job, job_id)

    monkeypatch.setattr(ibm_local, "_wait", wait)
    bell = QuantumCircuit(2, 2)
    bell.h(0)
    bell.cx(0, 1)
    bell.measure([0, 1], [0, 1])
    result = ibm_local.run(bell, 1000, seed=3, on_submitted=submitted.append)
    assert submitted and submitted[0] and waits == [1]
    assert result.provider_job_id == submitted[0]
    assert sum(result.counts.values()) == 1000
    assert fraction(result.counts, "00", "11") > 0.85
    assert result.metadata["qpu_s_source"] == "modelled"
    rep = ibm_local.calibration().rep_delay_s
    assert result.qpu_s == pytest.approx(1000 * (result.metadata["duration_s"] + rep) + 2.0)


def test_ibm_spec_and_reattach_in_local_mode(ibm_local: IBMRuntimeBackend) -> None:
    spec = ibm_local.spec()
    assert (spec.kind, spec.family, spec.device, spec.num_qubits) == ("qpu", "ibm", "fake_manila", 5)
    assert isinstance(ibm_local, Reattachable)
    assert len(ibm_local.calibration().t1_s) == 5
    with pytest.raises(BackendError, match="local"):
        ibm_local.reattach("some-id", 100)


def test_ibm_multiple_registers_use_qiskit_format(ibm_local: IBMRuntimeBackend) -> None:
    qr, a, z = QuantumRegister(2), ClassicalRegister(1, "a"), ClassicalRegister(1, "z")
    qc = QuantumCircuit(qr, a, z)
    qc.x(0)
    qc.measure(0, a[0])
    qc.measure(1, z[0])
    result = ibm_local.run(qc, 200, seed=1)
    assert max(result.counts, key=result.counts.get) == "0 1"


def test_ibm_from_env_without_credentials_is_none() -> None:
    assert IBMRuntimeBackend.from_env() is None
    with pytest.raises(BackendError, match="credentials"):
        make_backend("ibm_torino")


# ------------------------------------------------------------------------------ registry


def test_registry_builds_every_default_backend_by_name() -> None:
    assert DEFAULT_POOL == ("aer_statevector", "aer_mps", "aer_stabilizer", "aer_density_matrix",
                            "qpu_torino", "qpu_sherbrooke", "qpu_fez", "qpu_ion_aria", "qpu_atom_rydberg")
    backends = default_backends(threads=1)
    names = [b.spec().name for b in backends]
    assert names[:9] == list(DEFAULT_POOL)
    assert all(isinstance(b, Backend) for b in backends)
    assert len({b.spec().device for b in backends if b.spec().kind == "qpu"}) == 5
    for name in DEFAULT_POOL:
        assert make_backend(name).spec().name == name
    assert isinstance(gpu_available(), bool)
    assert ("aer_statevector_gpu" in names) == gpu_available()
    with pytest.raises(BackendError, match="unknown"):
        make_backend("nonsense")
    with pytest.raises(BackendError, match="unknown Aer"):
        make_backend("aer_nonsense")


def test_aer_automatic_is_a_baseline_outside_the_default_pool():
    from ray_qalloc.backends.registry import DEFAULT_POOL, make_backend

    assert "aer_automatic" not in DEFAULT_POOL
    res = make_backend("aer_automatic").run(ghz(3), 200, seed=1)
    assert res.method == "stabilizer" and sum(res.counts.values()) == 200   # Aer picks stabilizer for Clifford


def test_circuits_with_ecr_gates_transpile_to_one_way_couplers():
    """MQT's random circuits contain ECR gates; Sherbrooke drives some couplers one way only."""
    from mqt.bench import BenchmarkLevel, get_benchmark

    from ray_qalloc.backends.registry import make_backend

    qc = get_benchmark("randomcircuit", BenchmarkLevel.ALG, circuit_size=12)
    assert "ecr" in qc.count_ops()
    res = make_backend("qpu_sherbrooke").run(qc, 100, seed=1)
    assert sum(res.counts.values()) == 100
