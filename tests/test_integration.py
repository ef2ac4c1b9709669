"""The whole job path on a real local Ray: intake → store → allocator → pool / QPU actor → result.

One Ray instance and one allocator for the whole session (fixture ``qa``).
"""

from __future__ import annotations

import math
import time

import pytest
import ray
from qiskit import QuantumCircuit
from qiskit.circuit.library import QFT

from ray_qalloc.backends.actor import actor_name
from ray_qalloc.backends.pool_actor import pool_actor_name
from ray_qalloc.backends.pools import POOL_RESOURCE_CPU, parse_candidate
from ray_qalloc.backends.registry import FAKE_QPU_POOL
from ray_qalloc.exceptions import ForbiddenInclude, IntakeError, InvalidJobSpec, LimitExceeded
from ray_qalloc.store import JobStore

pytestmark = pytest.mark.timeout(600)

BELL_QASM = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[2];
creg c[2];
h q[0];
cx q[0],q[1];
measure q -> c;
"""


def ry_circuit(theta: float) -> QuantumCircuit:
    qc = QuantumCircuit(1, 1)
    qc.ry(theta, 0)
    qc.measure(0, 0)
    return qc


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure(range(n), range(n))
    return qc


def wait_state(handle, state: str, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = handle.status()
        if st["state"] == state:
            return st
        time.sleep(0.02)
    raise AssertionError(f"job never reached {state}: {handle.status()}")


def test_custom_resources_exist_and_runs_hold_the_cpus_they_use(qa):
    resources = ray.cluster_resources()
    assert resources.get(POOL_RESOURCE_CPU, 0) >= 1
    for name in FAKE_QPU_POOL:
        assert resources.get(f"qalloc_backend_{name}", 0) >= 1, name
    res = qa.submit(BELL_QASM, shots=200, backends=["mps"]).result(timeout=120)
    c = parse_candidate(res.backend)
    assert c is not None and c.method == "matrix_product_state" and c.threads == 1, res.backend
    assert res.metadata["resources"].get("CPU") == 1.0          # Ray sees the core the run holds
    wide = QFT(16).decompose()
    wide.measure_all()
    res = qa.submit(wide, shots=200, backends=[f"{c.pool}/statevector@2"]).result(timeout=120)
    assert res.backend == f"{c.pool}/statevector@2" and res.metadata["resources"].get("CPU") == 2.0


def test_every_method_of_the_pool_is_a_candidate_and_small_circuits_skip_many_threads(qa):
    rows = {b["name"]: b for b in qa.backends()}
    pools = {b["pool"] for b in rows.values() if b["pool"]}
    assert len(pools) == 1
    (pool,) = pools
    methods = {(parse_candidate(n).method, parse_candidate(n).threads) for n in rows if n.startswith(pool)}
    assert {("statevector", 1), ("statevector", 2), ("matrix_product_state", 1), ("stabilizer", 1),
            ("density_matrix", 1)} <= methods
    ex = qa.submit(BELL_QASM, shots=100).explain()
    assert ex["backends"][f"{pool}/statevector@2"]["status"] == "filtered"
    assert ex["backends"][f"{pool}/statevector@2"]["filter"] == "threads"


SIM_METHODS = ["statevector", "mps", "stabilizer", "density_matrix"]


@pytest.mark.parametrize("method", SIM_METHODS)
def test_simulators_are_statistically_right(qa, method):
    shots = 4000
    res = qa.submit(BELL_QASM, shots=shots, backends=[method]).result(timeout=120)
    assert res.backend.split("/")[1] == method and sum(res.counts.values()) == shots
    assert set(res.counts) <= {"00", "11"}
    p00 = res.counts.get("00", 0) / shots
    assert abs(p00 - 0.5) < 5 * math.sqrt(0.25 / shots)


@pytest.mark.parametrize("method", ["statevector", "aer_mps", "density_matrix"])   # old names still read
def test_rotation_probabilities(qa, method):
    theta, shots = 1.1, 4000
    res = qa.submit(ry_circuit(theta), shots=shots, backends=[method]).result(timeout=120)
    p1 = math.sin(theta / 2) ** 2
    assert abs(res.counts.get("1", 0) / shots - p1) < 5 * math.sqrt(p1 * (1 - p1) / shots)


@pytest.mark.parametrize("backend", FAKE_QPU_POOL)
def test_emulated_qpus_are_noisy_but_right(qa, backend):
    shots = 4000
    h = qa.submit(ghz(3), shots=shots, intent="quantum", backends=[backend])
    res = h.result(timeout=180)
    assert res.backend == backend
    good = (res.counts.get("000", 0) + res.counts.get("111", 0)) / shots
    assert 0.80 < good < 1.0                     # noise is there, but the state is right
    assert abs(res.counts.get("000", 0) - res.counts.get("111", 0)) / shots < 0.1
    assert res.qpu_s is not None and res.qpu_s > 2.0   # modelled: per-job overhead + shots × duration


def test_auto_intent_places_clifford_wide_circuit_on_stabilizer(qa):
    h = qa.submit(ghz(40), shots=500)
    res = h.result(timeout=120)
    assert set(res.counts) == {"0" * 40, "1" * 40}
    ex = h.explain()
    # placement's choice: the stabilizer, or MPS once run memory has seen GHZ circuits run fast there
    assert ex["chosen"].endswith(("/stabilizer", "/mps")), ex["chosen"]
    # the result: the stabilizer's, or an idle-core probe's that finished first (an MPS race)
    assert res.backend == ex["chosen"] or [a["outcome"] for a in res.failover_history] == ["hedge_lost", "completed"]
    rows = ex["backends"]
    assert set(rows) == {b["name"] for b in qa.backends()}
    dm = ex["chosen"].split("/")[0] + "/density_matrix"
    assert rows[dm]["status"] == "filtered"       # 16·4⁴⁰ bytes
    assert "needs" in rows[dm]["reasons"][0]


def test_quantum_intent_goes_to_a_qpu_and_explains_why(qa):
    h = qa.submit(ghz(4), intent="quantum", shots=1000)
    res = h.result(timeout=180)
    assert res.backend.startswith("qpu_")
    ex = h.explain()
    sims = [b["name"] for b in qa.backends() if b["kind"] == "simulator"]
    assert sims and all(ex["backends"][b]["status"] == "filtered" for b in sims)
    assert ex["backends"][res.backend]["chosen"]


def test_idempotency_key_gives_the_same_job(qa):
    a = qa.submit(BELL_QASM, shots=100, idempotency_key="same-key-1")
    b = qa.submit(BELL_QASM, shots=100, idempotency_key="same-key-1")
    assert a.id == b.id and a.created and not b.created
    a.result(timeout=120)


@pytest.mark.parametrize("bad, error", [
    ('OPENQASM 2.0;\ninclude "/etc/passwd";\nqreg q[1];', ForbiddenInclude),
    ('OPENQASM 2.0;\ninclude "../../secret.inc";\nqreg q[1];', ForbiddenInclude),
    ("OPENQASM 2.0;\nqreg q[1];\nfoo q[0];", IntakeError),
    (b"\x00\xff\xfe garbage \x80", IntakeError),
    (12345, InvalidJobSpec),
    ("OPENQASM 2.0;\n" + "// pad\n" * 200_000, LimitExceeded),
])
def test_hostile_input_gets_typed_errors_and_nothing_else_breaks(qa, data_dir, bad, error):
    before = JobStore(qa.settings.resolved_store_url).counts_by_state()
    with pytest.raises(error) as info:
        qa.submit(bad)
    assert "To fix" in str(info.value)
    assert JobStore(qa.settings.resolved_store_url).counts_by_state() == before   # nothing stored
    assert qa.submit(BELL_QASM, shots=100).result(timeout=120).counts           # still serving


def test_bad_fields_are_refused_at_intake(qa):
    with pytest.raises(LimitExceeded, match="shots"):
        qa.submit(BELL_QASM, shots=0)
    with pytest.raises(InvalidJobSpec, match="priority"):
        qa.submit(BELL_QASM, priority="urgent")
    with pytest.raises(InvalidJobSpec, match="backends"):
        qa.submit(BELL_QASM, backends=["no_such_backend"])


def test_killing_a_backend_mid_job_fails_over_and_records_once(qa):
    circuit = QFT(10).decompose()
    circuit.measure_all()
    h = qa.submit(circuit, shots=1000, intent="quantum", backends=["qpu_torino", "qpu_fez"])
    st = wait_state(h, "running")
    first = st["backend"]
    ray.kill(ray.get_actor(actor_name(first), namespace=qa.settings.namespace), no_restart=False)
    res = h.result(timeout=300)
    assert res.backend != first
    history = h.status()["attempt_history"]
    assert [a["outcome"] for a in history] == ["actor_died", "completed"]
    assert history[0]["backend"] == first and history[1]["backend"] == res.backend
    store = JobStore(qa.settings.resolved_store_url)
    names = [t["name"] for t in store.transitions(h.id)]
    assert names == ["accept", "dispatch", "failover", "dispatch", "complete"]
    assert h.explain()["failover_history"][0]["outcome"] == "actor_died"
    # the killed backend comes back (max_restarts=-1) and serves again
    again = qa.submit(ghz(3), shots=100, intent="quantum", backends=[first]).result(timeout=300)
    assert again.backend == first


def test_killing_the_allocator_loses_nothing(qa):
    jobs = [qa.submit(ghz(n), shots=300, backends=["statevector", "mps"]) for n in range(2, 8)]
    slow = QFT(9).decompose()
    slow.measure_all()
    jobs.append(qa.submit(slow, shots=500, intent="quantum", backends=["qpu_sherbrooke"]))
    ray.kill(qa.allocator, no_restart=False)
    results = [h.result(timeout=300) for h in jobs]
    for n, res in zip(range(2, 8), results):
        assert set(res.counts) <= {"0" * n, "1" * n}
    assert results[-1].backend == "qpu_sherbrooke"
    store = JobStore(qa.settings.resolved_store_url)
    for h in jobs:
        names = [t["name"] for t in store.transitions(h.id)]
        assert names.count("complete") == 1, names


def test_run_history_is_written_as_parquet(qa):
    qa.submit(BELL_QASM, shots=100).result(timeout=120)
    qa.flush_history()
    from ray_qalloc.costmodel.history import RunHistory

    table = RunHistory(qa.settings.history_dir).read()
    assert table.num_rows >= 1
    cols = set(table.column_names)
    assert {"backend", "wall_s", "success", "f_num_qubits", "f_depth"} <= cols
    assert len(set(table.column("attempt_id").to_pylist())) == table.num_rows


def test_submit_many_in_one_round_trip(qa):
    # classical: an ``auto`` job may rightly go to a (noisy) QPU when the pool is busy with the
    # rest of the batch, and then its counts are not the ideal two outcomes
    handles = qa.submit_many([{"circuit": ghz(n), "shots": 200, "intent": "classical"} for n in range(2, 12)])
    assert len({h.id for h in handles}) == 10
    for n, h in zip(range(2, 12), handles):
        res = h.result(timeout=120)
        assert not res.backend.startswith("qpu_"), res.backend
        assert set(res.counts) <= {"0" * n, "1" * n}


def test_submit_many_refuses_only_the_impossible_job(qa):
    from ray_qalloc.exceptions import NoFeasibleBackend

    wide = QuantumCircuit(150, 150)
    wide.h(0)
    wide.t(0)
    wide.measure(range(150), range(150))
    with pytest.raises(NoFeasibleBackend) as info:
        qa.submit_many([{"circuit": ghz(3), "shots": 100},
                        {"circuit": wide, "shots": 100, "intent": "classical", "backends": ["statevector"]}])
    accepted = info.value.details["accepted"]
    assert len(accepted) == 1
    assert qa.job(accepted[0]).result(timeout=120).counts


def _pool(qa) -> str:
    return next(b["pool"] for b in qa.backends() if b["pool"])


def volume_law(n: int, seed: int = 3) -> QuantumCircuit:
    """Quantum volume: entanglement grows with depth; MPS takes without bound, a statevector ~0.2 s at 18."""
    from qiskit.circuit.library import quantum_volume

    qc = quantum_volume(n, seed=seed).decompose()
    qc.measure_all()
    return qc


def test_cancelling_a_running_simulation_frees_its_core_at_once(qa):
    pool = _pool(qa)
    h = qa.submit(volume_law(18), shots=100, backends=[f"{pool}/mps"])     # would run for minutes
    wait_state(h, "running")
    time.sleep(1.0)
    busy = ray.available_resources().get("CPU", 0.0)
    t0 = time.monotonic()
    assert h.cancel()
    freed = None
    while time.monotonic() - t0 < 10:
        if ray.available_resources().get("CPU", 0.0) >= busy + 1.0:
            freed = time.monotonic() - t0
            break
        time.sleep(0.05)
    assert freed is not None and freed < 5.0, "the cancelled run kept its core"
    assert h.status()["state"] == "cancelled"
    # the pool serves the next job at once
    assert qa.submit(BELL_QASM, shots=100, backends=[f"{pool}/mps"]).result(timeout=60).counts


def test_killing_the_pool_mid_job_places_the_run_again(qa):
    pool = _pool(qa)
    circuit = QFT(20).decompose()
    circuit.measure_all()
    h = qa.submit(circuit, shots=200, backends=[f"{pool}/statevector", f"{pool}/density_matrix@2"])
    wait_state(h, "running")
    ray.kill(ray.get_actor(pool_actor_name(pool), namespace=qa.settings.namespace), no_restart=False)
    res = h.result(timeout=300)
    assert res.counts
    outcomes = [a["outcome"] for a in h.status()["attempt_history"]]
    assert outcomes[-1] == "completed" and len(outcomes) >= 2, outcomes
    store = JobStore(qa.settings.resolved_store_url)
    assert [t["name"] for t in store.transitions(h.id)].count("complete") == 1
