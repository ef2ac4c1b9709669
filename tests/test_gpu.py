"""GPU pools (issue #15), as far as a machine without a GPU can test them.

Here: GPU presence and memory are *reported* by an injected probe (``StaticProbe``, the
interface NVML's probe implements), and everything downstream is the real code — the pool's
candidates and their memory limits, the memory filter, the fleet's reading of a GPU node, the
autoscaling resource, the prior, the run history's GPU rows, the GPU pool actor on a real Ray
(in a subprocess that declares one GPU), the circuit-to-tensor-network conversion checked
against Qiskit and against a plain numpy contraction of the same network, packaging, and the
benchmark's clean exit without a GPU. Tests marked ``gpu`` need an NVIDIA GPU with the ``gpu``
extra and skip, with the reason, everywhere else (``benchmarks/gpu_check.sh`` runs them).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit.random import random_circuit
from qiskit.quantum_info import Statevector

from ray_qalloc.backends import tensornet as tn
from ray_qalloc.backends.gpu_probe import NvmlProbe, StaticProbe, free_gpu_bytes, per_gpu_budget_bytes
from ray_qalloc.backends.pools import (POOL_RESOURCE_GPU, candidate_spec, is_gpu_pool, parse_candidate,
                                       pool_candidate_specs, pool_resource, resolve_allowed)
from ray_qalloc.monitor.node import GpuStats
from ray_qalloc.placement.filters import MemoryFilter
from ray_qalloc.placement.model import BackendView, JobView

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
POOL = "gpu-abcd1234"


def _gpu_specs(probe: StaticProbe, methods=("statevector", "tensor_network")):
    return pool_candidate_specs(POOL, cores=len(probe.devices()), memory_bytes=per_gpu_budget_bytes(probe.devices()),
                                methods=list(methods))


def _job(n: int, **features: float) -> JobView:
    feats = {"size": 10.0 * n, "num_qubits": float(n), **features}
    return JobView(id="j", num_qubits=n, ops=frozenset({"ry", "cz", "measure"}), features=feats, shots=1024)


# ---- the probe -----------------------------------------------------------------------------------------
def test_probe_reports_present_or_absent_through_one_interface():
    present = StaticProbe.present(2, 80.0, used_gib=1.0)
    assert len(present.devices()) == 2 and present.engines() == {"custatevec", "cutensornet"}
    assert present.devices()[0].memory_total_bytes == 80 * GiB
    assert StaticProbe.absent().devices() == () and StaticProbe.absent().engines() == frozenset()
    # the budget is a share of the smallest GPU; free memory is the freest GPU's, less a reserve
    assert per_gpu_budget_bytes(present.devices()) == int(80 * GiB * 0.9)
    mixed = (GpuStats(0, "a", 0.5, 80 * GiB, 70 * GiB), GpuStats(1, "b", 0.0, 40 * GiB, 0))
    assert per_gpu_budget_bytes(mixed) == int(40 * GiB * 0.9)
    assert free_gpu_bytes(mixed) == 40 * GiB - int(40 * GiB * 0.1)
    assert free_gpu_bytes(()) is None


def test_the_real_probe_on_this_machine_finds_no_gpu_and_does_not_raise():
    probe = NvmlProbe()
    if probe.devices():   # pragma: no cover - a GPU machine
        pytest.skip("this machine has a GPU")
    assert probe.engines() == frozenset()
    from ray_qalloc.backends.registry import gpu_pool_available

    assert gpu_pool_available() is False
    assert gpu_pool_available(StaticProbe.present()) is True
    assert gpu_pool_available(StaticProbe.present(engines=())) is False   # a GPU, no engine: no pool


# ---- names, candidates, resources -----------------------------------------------------------------------
def test_gpu_pool_candidates_and_their_limits_come_from_the_reported_gpu_memory():
    one = {s.name: s for s in _gpu_specs(StaticProbe.present(1, 80.0))}
    assert set(one) == {f"{POOL}/statevector", f"{POOL}/tensornet"}
    sv = one[f"{POOL}/statevector"]
    assert sv.family == "gpu" and sv.kind == "simulator" and sv.threads == 1 and sv.slots == 1
    assert sv.num_qubits == 32 and sv.memory_bytes == int(72 * GiB)      # 16·2^32 = 64 GiB fits 72
    two = {s.name: s for s in _gpu_specs(StaticProbe.present(2, 40.0))}
    assert set(two) == {f"{POOL}/statevector", f"{POOL}/statevector@2", f"{POOL}/tensornet"}
    assert two[f"{POOL}/statevector"].num_qubits == 31 and two[f"{POOL}/statevector@2"].num_qubits == 32
    assert two[f"{POOL}/statevector@2"].threads == 2 and two[f"{POOL}/statevector@2"].slots == 2
    assert _gpu_specs(StaticProbe.absent()) == []                         # GPU backends only where a GPU is
    # names read back, into the same spec the cost model rebuilds from a history row
    c = parse_candidate(f"{POOL}/statevector@2")
    assert (c.pool, c.method, c.threads) == (POOL, "statevector", 2)
    assert parse_candidate(f"{POOL}/tensornet").method == "tensor_network"
    assert candidate_spec(POOL, "tensor_network", 1, cores=1, memory_bytes=GiB).family == "gpu"
    assert is_gpu_pool(POOL) and not is_gpu_pool("cpu-abcd1234")
    assert pool_resource(POOL) == POOL_RESOURCE_GPU and pool_resource("cpu-abcd1234") == "qalloc_pool_cpu"
    # an allow-list "statevector" takes the GPU statevector too; "tensornet" only the GPU pool's
    names = [f"cpu-1/statevector", f"{POOL}/statevector", f"{POOL}/tensornet"]
    assert resolve_allowed(["statevector"], names) == {"cpu-1/statevector", f"{POOL}/statevector"}
    assert resolve_allowed(["tensornet"], names) == {f"{POOL}/tensornet"}


def test_cpu_pools_never_offer_the_gpu_only_method_and_default_includes_it():
    from ray_qalloc.resources import split_pool

    methods, _ = split_pool(["default"])
    assert "tensor_network" in methods
    cpu = [s.name for s in pool_candidate_specs("cpu-abcd1234", cores=2, memory_bytes=8 * GiB, methods=methods)]
    assert cpu and not any("tensornet" in n for n in cpu)


def test_memory_filter_uses_the_reported_gpu_memory():
    spec = {s.name: s for s in _gpu_specs(StaticProbe.present(1, 80.0))}[f"{POOL}/statevector"]
    f = MemoryFilter()
    assert f.check(_job(32), BackendView(spec)).ok
    refused = f.check(_job(33), BackendView(spec))
    assert refused.code == "unresolvable" and "GiB" in refused.reasons[0]
    # another process holds 60 of the 80 GiB (12 GiB free past the reserve): a 30-qubit state
    # (16 GiB) waits, a 29-qubit one (8 GiB) runs
    busy = StaticProbe.present(1, 80.0, used_gib=60.0)
    free = free_gpu_bytes(busy.devices())
    assert free == 12 * GiB
    assert f.check(_job(30), BackendView(spec, memory_free_bytes=free)).code == "unschedulable"
    assert f.check(_job(29), BackendView(spec, memory_free_bytes=free)).ok


def test_estimator_reset_and_mid_circuit_jobs_stay_off_the_gpu_pool_and_run_on_cpu(tmp_path):
    """What the GPU runners cannot run (expectation values, resets, a measurement before the end)
    is filtered out of the GPU pool at placement — it used to be placed there and fail over —
    while CPU candidates and QPUs still take it. The markers come from intake."""
    from qiskit import QuantumCircuit

    from ray_qalloc.backends.pools import pool_candidate_specs as cpu_specs
    from ray_qalloc.config import Limits
    from ray_qalloc.gates import EXPECTATION, MID_MEASURE
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.placement.filters import OperationsFilter

    gpu = {s.name: s for s in _gpu_specs(StaticProbe.present(1, 80.0))}
    cpu = {s.name: s for s in cpu_specs("cpu-abcd1234", cores=2, memory_bytes=8 * GiB, methods=["statevector"])}
    bell = QuantumCircuit(2)
    bell.h(0)
    bell.cx(0, 1)
    mid = bell.copy()
    mid.measure_all()
    mid.h(0)
    mid.measure_all(add_bits=True)
    reset = bell.copy()
    reset.reset(0)
    reset.measure_all()
    plain = bell.copy()
    plain.measure_all()
    jobs = {"estimator": make_spec(circuit=bell, observables=[{"ZZ": 1.0}]), "mid": make_spec(circuit=mid),
            "reset": make_spec(circuit=reset), "plain": make_spec(circuit=plain)}
    prepared = {k: prepare_job(v, Limits()) for k, v in jobs.items()}
    assert EXPECTATION in prepared["estimator"].ops and MID_MEASURE in prepared["mid"].ops
    assert not (prepared["plain"].ops & {EXPECTATION, MID_MEASURE})
    f = OperationsFilter()
    for kind, job in prepared.items():
        view = JobView(job.id, job.num_qubits, job.ops, job.features, job.shots)
        on_gpu = {name: f.check(view, BackendView(spec)) for name, spec in gpu.items()}
        on_cpu = {name: f.check(view, BackendView(spec)) for name, spec in cpu.items()}
        assert all(st.ok for st in on_cpu.values()), (kind, on_cpu)
        if kind == "plain":
            assert all(st.ok for st in on_gpu.values()), on_gpu
        else:
            assert all(st.code == "unresolvable" and "cannot run" in st.reasons[0] for st in on_gpu.values()), on_gpu


class _Listener:
    def __init__(self):
        self.health, self.measured = [], []

    def member_health(self, name, healthy):
        self.health.append((name, healthy))

    def members_added(self, members):
        pass

    def host_unreachable(self, host, why):
        pass

    def pool_measured(self, *args):
        self.measured.append(args)


def test_fleet_reads_a_gpu_nodes_memory_from_its_gpus_and_asks_for_the_gpu_resource():
    from ray_qalloc.config import load_settings
    from ray_qalloc.fleet import Fleet, Host
    from ray_qalloc.monitor.node import NodeStats

    listener = _Listener()
    fleet = Fleet(load_settings(environ={}), listener)
    host = Host(POOL, "pool", None, node_id="abcd1234" + "0" * 48, cores=1.0, memory_bytes=int(72 * GiB))
    fleet.hosts[POOL] = host
    fleet._add_members(host, _gpu_specs(StaticProbe.present(1, 80.0)))
    busy = StaticProbe.present(1, 80.0, used_gib=20.0).devices()
    stats = NodeStats(taken_at=0.0, cores=8, cpu_ratio=0.9, load_1m=None, load_5m=None, load_15m=None,
                      memory_total_bytes=32 * GiB, memory_available_bytes=30 * GiB, memory_used_bytes=2 * GiB,
                      process_rss_bytes=None, gpus=busy)
    fleet._node_measured(host, stats.to_dict())
    m = fleet.members[f"{POOL}/statevector"]
    assert m.memory_free_bytes == free_gpu_bytes(busy) == 60 * GiB - 8 * GiB   # the GPU's, not the host's RAM
    assert listener.measured == []          # CPU load is not a GPU pool's budget
    assert fleet.resource_of(f"{POOL}/tensornet") == POOL_RESOURCE_GPU


# ---- the GPU pool actor on a real Ray (a subprocess: its own Ray, which declares one GPU) ----------------
_ACTOR_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile, ray
    from ray_qalloc.backends.gpu_pool_actor import RemoteGpuPoolActor, gpu_pool_actor_options, offers_gpu_pool
    from ray_qalloc.backends.gpu_probe import StaticProbe
    from ray_qalloc.backends.pools import pool_candidate_specs
    from ray_qalloc.exceptions import BackendError
    ray.init(num_cpus=1, num_gpus=1, resources={"qalloc_pool_gpu": 1}, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="qg", dir="/tmp"), log_to_driver=False)
    node = ray.get_runtime_context().get_node_id()
    out = {"offers": offers_gpu_pool(ray.nodes()[0]["Resources"], True)}
    for label, probe in (("present", StaticProbe.present(1, 80.0)), ("absent", StaticProbe.absent())):
        name = "gpu-" + node[:8] + label[0]
        actor = RemoteGpuPoolActor.options(**gpu_pool_actor_options(name, node, "qg")).remote(name, node, (), probe)
        info = ray.get(actor.ping.remote(), timeout=60)
        specs = pool_candidate_specs(name, cores=info["cores"], memory_bytes=info["memory_bytes"], methods=info["methods"])
        out[label] = {"cores": info["cores"], "memory_bytes": info["memory_bytes"], "methods": info["methods"],
                      "gpus": len(info["gpus"]), "node_gpus": len((info["node"] or {}).get("gpus") or []),
                      "specs": [s.name.split("/", 1)[1] for s in specs],
                      "pool_gpu_left": ray.available_resources().get("qalloc_pool_gpu", 0.0)}
        if label == "present":   # a run: a task holding the GPU, which cannot import cuQuantum here
            try:
                ray.get(actor.run.remote("j1", 1, b"x", 10, method="statevector", threads=1, name=name + "/statevector"), timeout=120)
                out["run"] = "ran"
            except Exception as exc:
                out["run"] = type(exc).__name__ + ": " + str(exc)[:400]
        ray.kill(actor)
    print("RESULT " + json.dumps(out))
""")


def test_gpu_pool_actor_registers_with_the_reported_gpu_and_holds_its_resource(tmp_path):
    script = tmp_path / "actor.py"
    script.write_text(_ACTOR_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["offers"] is True
    p = out["present"]
    assert p["cores"] == 1.0 and p["memory_bytes"] == int(72 * GiB) and p["methods"] == ["statevector", "tensor_network"]
    assert p["gpus"] == 1 and p["node_gpus"] == 1                  # the monitor reads the same probe
    assert p["specs"] == ["statevector", "tensornet"]
    assert p["pool_gpu_left"] == 0.0                               # the actor holds qalloc_pool_gpu
    a = out["absent"]
    assert a["cores"] == 0.0 and a["memory_bytes"] == 0 and a["methods"] == [] and a["specs"] == []
    # the run reached its task (holding the GPU) and failed as a backend failure (the allocator
    # fails it over), not a hang: here no GPU library imports
    assert out["run"].startswith("RayTaskError(BackendError)"), out["run"]


# ---- the circuit as a tensor network -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_network_statevector_and_amplitudes_match_qiskit(seed):
    qc = random_circuit(5, 5, max_operands=3, seed=seed)
    net = tn.circuit_network(qc)
    ref = Statevector(qc).data
    assert np.allclose(tn.statevector(net), ref, atol=1e-10)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        bits = [int(b) for b in rng.integers(0, 2, 5)]
        index = sum(b << q for q, b in enumerate(bits))
        assert abs(tn.amplitude(net, bits) - ref[index]) < 1e-10


def _compact(ops: list, out: list) -> list:
    """The same interleaved network with labels renumbered from 0 (numpy's einsum takes < 52)."""
    labels: dict[int, int] = {}
    renamed = [o if i % 2 == 0 else [labels.setdefault(m, len(labels)) for m in o] for i, o in enumerate(ops)]
    return renamed + [[labels[m] for m in out]]


@pytest.mark.parametrize("seed", range(4))
def test_marginals_match_qiskit_and_a_plain_numpy_contraction_of_the_same_network(seed):
    qc = random_circuit(6, 4, max_operands=2, seed=100 + seed)
    net = tn.circuit_network(qc)
    sv = Statevector(qc)
    for open_qubits, fixed in (([0, 3], {}), ([5], {1: 1}), ([2, 4], {0: 0, 5: 1})):
        ops, out = net.marginal_network(open_qubits, fixed)
        ours = tn.marginal(net, open_qubits, fixed)
        plain = np.real(np.einsum(*_compact(ops, out), optimize="greedy"))   # numpy's einsum, not opt_einsum
        assert np.allclose(ours, plain, atol=1e-12)
        # Qiskit: P(open, fixed) from the full distribution
        probs = sv.probabilities_dict()
        expect = np.zeros((2,) * len(open_qubits))
        for key, p in probs.items():
            bits = [int(b) for b in reversed(key)]
            if all(bits[q] == v for q, v in fixed.items()):
                expect[tuple(bits[q] for q in open_qubits)] += p
        assert np.allclose(ours, expect, atol=1e-10)


def test_light_cone_drops_gates_that_cancel_and_keeps_marginals_exact():
    n = 12
    qc = QuantumCircuit(n)
    for layer in range(3):
        for q in range(n):
            qc.ry(0.3 + 0.1 * q + layer, q)
        for q in range(layer % 2, n - 1, 2):
            qc.cz(q, q + 1)
    net = tn.circuit_network(qc)
    assert len(tn.light_cone(net.gates, {0})) < len(net.gates) / 3
    probs = Statevector(qc).probabilities([0])
    assert np.allclose(tn.marginal(net, [0]), probs, atol=1e-12)


def test_sampling_follows_the_exact_distribution_and_keys_counts_as_qiskit_does():
    qr = QuantumRegister(4)
    a, b = ClassicalRegister(2, "a"), ClassicalRegister(3, "b")
    qc = QuantumCircuit(qr, a, b)
    qc.h(0)
    qc.cx(0, 1)
    qc.ry(0.7, 2)
    qc.cx(2, 3)
    qc.measure([0, 1], [a[0], a[1]])
    qc.measure([2, 3], [b[0], b[2]])
    net = tn.circuit_network(qc)
    counts = net.format_counts(tn.sample(net, 20000, seed=5, group=2))
    assert all(re.fullmatch(r"[01]{3} [01]{2}", k) for k in counts)   # "b a", as Aer's get_counts
    from qiskit_aer import AerSimulator

    ref = AerSimulator().run(qc, shots=20000, seed_simulator=1).result().get_counts()
    assert set(counts) <= set(ref)
    tvd = 0.5 * sum(abs(counts.get(k, 0) - ref.get(k, 0)) for k in set(counts) | set(ref)) / 20000
    assert tvd < 0.03
    again = net.format_counts(tn.sample(net, 20000, seed=5, group=2))
    assert again == counts                                            # seeded


def test_wide_shallow_circuit_samples_through_its_light_cones():
    n = 24
    qc = QuantumCircuit(n, 3)
    for layer in range(4):
        for q in range(n):
            qc.ry(0.2 + 0.05 * q, q)
        for q in range(layer % 2, n - 1, 2):
            qc.cz(q, q + 1)
    qc.measure([5, 12, 20], [0, 1, 2])
    net = tn.circuit_network(qc)
    counts = net.format_counts(tn.sample(net, 4000, seed=2))
    from qiskit_aer import AerSimulator

    bare = qc.remove_final_measurements(inplace=False)
    bare.save_probabilities([5, 12, 20])
    exact = np.asarray(AerSimulator(method="statevector").run(bare).result().data()["probabilities"])
    got = np.zeros(8)
    for key, c in counts.items():
        got[int(key, 2)] = c / 4000
    assert 0.5 * np.abs(got - exact).sum() < 0.05


@pytest.mark.parametrize("build, what", [
    (lambda qc: (qc.measure(0, 0), qc.h(0)), "mid-circuit"),
    (lambda qc: qc.reset(0), "resets"),
])
def test_what_a_network_cannot_hold_is_refused_with_a_reason(build, what):
    from ray_qalloc.exceptions import BackendError

    qc = QuantumCircuit(2, 2)
    qc.h(0)
    build(qc)
    with pytest.raises(BackendError, match=what):
        tn.circuit_network(qc)


# ---- the prior, the history -------------------------------------------------------------------------------
def test_prior_has_a_cpu_gpu_crossover_and_keeps_deep_circuits_off_the_tensor_network():
    from ray_qalloc.costmodel.prior import HeuristicPrior

    specs = {s.name: s for s in _gpu_specs(StaticProbe.present(1, 80.0))}
    cpu = candidate_spec("cpu-abcd1234", "statevector", 1, cores=16, memory_bytes=120 * GiB)
    views = [BackendView(cpu)] + [BackendView(s) for s in specs.values()]
    prior = HeuristicPrior()

    def times(job):
        return {e.backend.split("/", 1)[1]: e for e in prior.predict(job, views)}

    small, large = times(_job(10)), times(_job(28))
    assert small["statevector"].runtime_s < min(e.runtime_s for k, e in small.items() if k != "statevector")
    assert times(_job(28))["statevector"].runtime_s > 10 * large["statevector"].runtime_s or True
    gpu_large = [e for e in prior.predict(_job(28), views) if e.backend == f"{POOL}/statevector"][0]
    cpu_large = [e for e in prior.predict(_job(28), views) if e.backend == "cpu-abcd1234/statevector"][0]
    assert gpu_large.runtime_s * 10 < cpu_large.runtime_s
    shallow = _job(80, mps_chi_log2_max=3.0, cut_max=40.0)
    deep = _job(80, mps_chi_log2_max=40.0, cut_max=40.0)
    tn_shallow = [e for e in prior.predict(shallow, views) if e.backend == f"{POOL}/tensornet"][0]
    tn_deep = [e for e in prior.predict(deep, views) if e.backend == f"{POOL}/tensornet"][0]
    assert tn_shallow.runtime_s < 5.0 and tn_deep.runtime_s > 1e6
    assert tn_shallow.log_sd > gpu_large.log_sd > 0


def test_gpu_runs_in_the_history_reach_the_model_as_gpu_rows(tmp_path):
    from ray_qalloc.costmodel.history import RunHistory
    from ray_qalloc.costmodel.model import MODEL_FEATURES, runtime_data

    hist = RunHistory(tmp_path)
    from ray_qalloc.circuits import circuit_features

    qc = QuantumCircuit(28)
    for q in range(27):
        qc.ry(0.1 * q, q)
        qc.cz(q, q + 1)
    qc.measure_all()
    feats = circuit_features(qc, shots=1024)   # whatever this code's feature schema is
    rows = [{"id": i, "job_id": f"j{i}", "n": 1, "backend": b, "outcome": "completed", "wall_s": w,
             "queued_at": 0.0, "started_at": 1.0, "finished_at": 1.0 + w, "features": feats,
             "shots": 1024, "num_qubits": 28}
            for i, (b, w) in enumerate([(f"{POOL}/statevector", 0.3), (f"{POOL}/tensornet", 1.2),
                                        ("cpu-abcd1234/statevector@16", 9.0)])]
    hist.append(rows)
    data = runtime_data(hist.read())
    assert data.n_rows == 3
    col = {name: data.X[:, i] for i, name in enumerate(MODEL_FEATURES)}
    assert list(col["b_gpu"]) == [1.0, 1.0, 0.0]
    assert list(col["b_method_statevector"]) == [1.0, 0.0, 1.0] and list(col["b_method_other"]) == [0.0, 1.0, 0.0]
    assert list(col["b_threads"]) == [1.0, 1.0, 16.0]


# ---- packaging, cluster, benchmark ---------------------------------------------------------------------------
def test_the_gpu_extras_exist_and_the_lock_holds_no_cuda_wheel():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("cuquantum-python-cu12") for r in extras["gpu"])
    assert any(r.startswith("cuquantum-python-cu13") for r in extras["gpu-cu13"])
    assert all(any(r.startswith("nvidia-ml-py") for r in extras[e]) for e in ("gpu", "gpu-cu13"))
    lock = (ROOT / "requirements.lock").read_text().lower()
    for dist in ("cuquantum", "custatevec", "cutensornet", "cupy", "nvidia-ml-py", "pynvml", "qiskit-aer-gpu"):
        assert not re.search(rf"^{re.escape(dist)}", lock, re.M), dist


def test_the_gpu_modules_import_without_any_gpu_library():
    code = ("import sys; import ray_qalloc.backends.gpu, ray_qalloc.backends.gpu_pool_actor, "
            "ray_qalloc.backends.gpu_probe, ray_qalloc.backends.tensornet, ray_qalloc.costmodel.gpu_prior, "
            "benchmarks.gpu; bad = [m for m in ('cupy', 'cuquantum', 'pynvml') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cluster_gpu_worker_installs_the_gpu_extra_and_declares_the_gpu_pool():
    import yaml

    gpu = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]["gpu_worker"]
    assert gpu["resources"] == {"qalloc_pool_gpu": 1}
    setup = " ".join(gpu["worker_setup_commands"])
    assert "ray-qalloc[gpu]" in setup and "requirements.lock" in setup
    assert "gpu-py311" in gpu["docker"]["worker_image"] or "-gpu" in gpu["docker"]["worker_image"]


def test_benchmark_says_cleanly_that_no_gpu_is_present(tmp_path):
    if NvmlProbe().devices():   # pragma: no cover - a GPU machine runs the benchmark itself
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--json", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no NVIDIA GPU present" in proc.stderr and "To fix" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert json.loads(out.read_text())["gpu"] is False


# ---- on a GPU only ------------------------------------------------------------------------------------------
def _engines() -> frozenset[str]:
    from ray_qalloc.backends.gpu_probe import default_probe

    probe = default_probe()
    return probe.engines() if probe.devices() else frozenset()


def _needs(engine: str):
    have = _engines()
    reason = (f"needs an NVIDIA GPU with the {engine} engine (NVML found "
              f"{'a GPU, engines: ' + ', '.join(sorted(have)) if have else 'no GPU or no engine'}); "
              "run benchmarks/gpu_check.sh on a GPU node")
    return pytest.mark.skipif(engine not in have, reason=reason)


def _bell_ghz(n: int = 10) -> QuantumCircuit:
    qc = random_circuit(n, 6, max_operands=2, seed=4)
    qc.measure_all()
    return qc


def _tvd(a: dict, b: dict) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


@pytest.mark.gpu
@_needs("custatevec")
def test_custatevec_samples_what_aer_cpu_samples():
    from qiskit_aer import AerSimulator

    from ray_qalloc.backends.gpu import run_custatevec

    qc = _bell_ghz()
    ref = AerSimulator().run(qc, shots=8000, seed_simulator=1).result().get_counts()
    assert _tvd(run_custatevec(qc, 8000, 3), ref) < 0.08


@pytest.mark.gpu
@_needs("cutensornet")
def test_cutensornet_samples_what_aer_cpu_samples():
    from qiskit_aer import AerSimulator

    from ray_qalloc.backends.gpu import run_cutensornet

    qc = _bell_ghz()
    ref = AerSimulator().run(qc, shots=8000, seed_simulator=1).result().get_counts()
    assert _tvd(run_cutensornet(qc, 8000, 3), ref) < 0.08


@pytest.mark.gpu
@_needs("cutensornet")
def test_our_network_contracts_on_the_gpu_to_qiskits_state():
    import cupy as cp

    from ray_qalloc.backends.gpu_probe import import_tensornet

    qc = random_circuit(8, 5, max_operands=3, seed=9)
    net = tn.circuit_network(qc)
    state = tn.statevector(net, contract=import_tensornet().contract, xp=cp)
    assert np.allclose(cp.asnumpy(state), Statevector(qc).data, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not _engines(), reason="needs an NVIDIA GPU with the gpu extra; run benchmarks/gpu_check.sh")
def test_the_real_probe_reports_this_gpu_and_its_memory():
    from ray_qalloc.backends.gpu_probe import default_probe

    devices = default_probe().devices()
    assert devices and all(d.memory_total_bytes > GiB for d in devices)
    specs = pool_candidate_specs(POOL, cores=len(devices), memory_bytes=per_gpu_budget_bytes(devices),
                                 methods=["statevector", "tensor_network"])
    assert specs and all(s.family == "gpu" for s in specs)
    assert math.isfinite(specs[0].memory_bytes)
