"""Placement pipeline: table-driven filters, selection against brute force, explain coverage."""

from __future__ import annotations

import math
import random
import sys

import pytest

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.costmodel.prior import HeuristicPrior, qpu_fidelity, simulator_runtime
from ray_qalloc.placement import BackendView, JobView, LiveState, explain, plan, select
from ray_qalloc.placement.filters import (AllowListFilter, BlockedFilter, CalibrationFreshnessFilter, HealthFilter,
                                          IntentFilter, MemoryFilter, OperationsFilter, QubitsFilter, TenantFilter,
                                          ThreadsFilter)
from ray_qalloc.placement.model import Estimate, Plan

SV = BackendSpec("aer_statevector", "simulator", "aer", 30, method="statevector", memory_bytes=2**30)
DM = BackendSpec("aer_density_matrix", "simulator", "aer", 15, method="density_matrix", memory_bytes=2**30)
STAB = BackendSpec("aer_stabilizer", "simulator", "aer", 5000, method="stabilizer", clifford_only=True)
MPS = BackendSpec("aer_mps", "simulator", "aer", 1000, method="matrix_product_state")
QPU = BackendSpec("qpu_a", "qpu", "fake_qpu", 127, device="fake_a", noisy=True,
                  basis_gates=("cz", "rz", "sx", "x", "measure"))
CAL = {"t1_median_us": 200.0, "t2_median_us": 150.0, "readout_error_median": 0.02,
       "gate_1q_error_median": 2e-4, "gate_2q_error_median": 5e-3}


def job(**kw) -> JobView:
    base = dict(id="j", num_qubits=3, ops=frozenset({"h", "cx", "measure"}),
                features={"size": 3.0, "depth": 3.0, "two_qubit_count": 2.0, "measure_count": 3.0,
                          "cut_max": 1.0, "two_qubit_depth": 2.0},
                shots=1000)
    base.update(kw)
    return JobView(**base)


@pytest.mark.parametrize("flt, j, spec, healthy, code", [
    (QubitsFilter(), job(num_qubits=31), SV, True, "unresolvable"),
    (QubitsFilter(), job(num_qubits=30), SV, True, "ok"),
    (MemoryFilter(), job(num_qubits=27), SV, True, "unresolvable"),     # 16·2^27 = 2 GiB > 1 GiB
    (MemoryFilter(), job(num_qubits=26), SV, True, "ok"),               # exactly 1 GiB
    (MemoryFilter(), job(num_qubits=14), DM, True, "unresolvable"),     # 16·4^14 = 4 GiB
    (MemoryFilter(), job(num_qubits=40), MPS, True, "ok"),
    (OperationsFilter(), job(ops=frozenset({"h", "t", "measure"})), STAB, True, "unresolvable"),
    (OperationsFilter(), job(ops=frozenset({"h", "cx", "s", "measure", "barrier"})), STAB, True, "ok"),
    (OperationsFilter(), job(ops=frozenset({"h", "if_else"})), QPU, True, "unresolvable"),
    (IntentFilter(), job(intent="quantum"), SV, True, "unresolvable"),
    (IntentFilter(), job(intent="quantum"), QPU, True, "ok"),
    (IntentFilter(), job(intent="classical"), QPU, True, "unresolvable"),
    (IntentFilter(), job(intent="auto"), QPU, True, "ok"),
    (HealthFilter(), job(), SV, False, "unschedulable"),
    (HealthFilter(), job(), SV, True, "ok"),
    (BlockedFilter(), job(blocked=frozenset({"aer_statevector"})), SV, True, "unresolvable"),
    (AllowListFilter(), job(allowed=frozenset({"aer_mps"})), SV, True, "unresolvable"),
    (AllowListFilter(), job(allowed=frozenset({"aer_mps"})), MPS, True, "ok"),
])
def test_filter_table(flt, j, spec, healthy, code):
    status = flt.check(j, BackendView(spec, healthy))
    assert status.code == code
    if code != "ok":
        assert status.reasons and status.plugin == flt.name


def _pool_spec(method: str, threads: int) -> BackendSpec:
    from ray_qalloc.backends.pools import candidate_spec

    return candidate_spec("cpu-test", method, threads, cores=4, memory_bytes=2**34)


@pytest.mark.parametrize("method, threads, qubits, code", [
    # Aer parallelises a state wider than 14 qubits (qubitvector.hpp: num_qubits_ > omp_threshold_)
    ("statevector", 2, 14, "unresolvable"),
    ("statevector", 2, 15, "ok"),
    ("statevector", 1, 3, "ok"),
    # a density matrix of n qubits is a vector of 2n
    ("density_matrix", 2, 7, "unresolvable"),
    ("density_matrix", 2, 8, "ok"),
])
def test_many_threads_only_where_aer_uses_them(method, threads, qubits, code):
    status = ThreadsFilter().check(job(num_qubits=qubits), BackendView(_pool_spec(method, threads)))
    assert status.code == code


PERMS = TenantFilter({"soc": ["aer_statevector", "kind:qpu"]})


@pytest.mark.parametrize("flt, j, view, code", [
    (PERMS, job(tenant="soc"), BackendView(SV), "ok"),
    (PERMS, job(tenant="soc"), BackendView(QPU), "ok"),
    (PERMS, job(tenant="soc"), BackendView(MPS), "unresolvable"),
    (PERMS, job(tenant="other"), BackendView(MPS), "ok"),                      # not listed: anything
    (CalibrationFreshnessFilter(3600.0), job(), BackendView(QPU, calibration_age_s=7200.0), "unschedulable"),
    (CalibrationFreshnessFilter(3600.0), job(), BackendView(QPU, calibration_age_s=60.0), "ok"),
    (CalibrationFreshnessFilter(3600.0), job(), BackendView(QPU), "ok"),        # age unknown
    (CalibrationFreshnessFilter(3600.0), job(), BackendView(SV, calibration_age_s=1e9), "ok"),   # simulators
    (CalibrationFreshnessFilter(None), job(), BackendView(QPU, calibration_age_s=1e9), "ok"),
])
def test_tenant_and_calibration_filters(flt, j, view, code):
    status = flt.check(j, view)
    assert status.code == code
    if code != "ok":
        assert status.reasons and status.plugin == flt.name


def test_fidelity_floor_filters_noisy_qpu_and_explains_every_backend():
    j = job(fidelity_min=0.999)
    views = [BackendView(s, True, CAL if s.kind == "qpu" else None) for s in (SV, DM, STAB, MPS, QPU)]
    p = plan(j, views, HeuristicPrior())
    assert "qpu_a" in p.filtered and p.filtered["qpu_a"].plugin == "fidelity"
    choice = select(j, p, {b.name: LiveState(0.0, True) for b in views})
    ex = explain(p, choice)
    assert set(ex["backends"]) == {v.name for v in views}
    assert sum(1 for r in ex["backends"].values() if r.get("chosen")) == 1
    assert ex["chosen"] == choice.backend


def test_prior_scales_like_the_methods():
    big = job(num_qubits=26, features={"size": 400.0, "cut_max": 13.0})
    clifford = job(num_qubits=26, features={"size": 52.0, "cut_max": 1.0})
    assert simulator_runtime("statevector", big) > 3.9 * simulator_runtime("statevector", job(
        num_qubits=24, features={"size": 400.0}))
    assert simulator_runtime("stabilizer", clifford) < simulator_runtime("statevector", clifford) / 100
    assert simulator_runtime("matrix_product_state", clifford) < simulator_runtime("statevector", clifford)
    deep = job(features={"size": 500.0, "two_qubit_count": 300.0, "depth": 200.0, "measure_count": 3.0})
    assert 0.0 < qpu_fidelity(deep, CAL) < qpu_fidelity(job(), CAL) <= 1.0


def _objective(j: JobView, est: Estimate, wait: float) -> float:
    from ray_qalloc.placement.pipeline import CLASS_WEIGHTS, QUANTUM_FIDELITY_FACTOR

    w = CLASS_WEIGHTS[j.priority]
    wf = w.fidelity * (QUANTUM_FIDELITY_FACTOR if j.intent == "quantum" else 1.0)
    return math.log(max(wait + est.runtime_s, 1e-6)) - wf * math.log(max(est.fidelity, 1e-9)) \
        + w.money * est.cost


@pytest.mark.parametrize("seed", range(40))
def test_select_matches_brute_force(seed):
    rng = random.Random(seed)
    j = job(priority=rng.choice(["emergency", "high", "normal", "batch"]), intent=rng.choice(["auto", "quantum"]))
    names = [f"b{i}" for i in range(rng.randint(1, 6))]
    p = Plan("j", {n: Estimate(n, 10 ** rng.uniform(-3, 2), rng.uniform(0.2, 1.0), rng.uniform(0, 5))
                   for n in names})
    live = {n: LiveState(rng.choice([0.0, 10 ** rng.uniform(-2, 2)]), rng.random() < 0.7) for n in names}
    choice = select(j, p, live)
    best = min(names, key=lambda n: (_objective(j, p.estimates[n], live[n].wait_s), n))
    assert choice.backend == best
    assert choice.can_start == live[best].can_start


@pytest.mark.parametrize("intent, expect", [("auto", "fast"), ("quantum", "faithful")])
def test_quantum_intent_weighs_fidelity_more(intent, expect):
    # "faithful" has 3% more fidelity but a 20% longer expected completion: worth it only to a
    # job that asked for quantum results
    p = Plan("j", {"fast": Estimate("fast", 1.0, 0.90, 0.0), "faithful": Estimate("faithful", 1.0, 0.93, 0.0)})
    live = {"fast": LiveState(0.0, True), "faithful": LiveState(0.2, False)}
    assert select(job(intent=intent), p, live).backend == expect


def test_select_with_nothing_feasible():
    choice = select(job(), Plan("j"), {})
    assert choice.backend is None and not choice.can_start


def test_placement_imports_neither_ray_nor_qiskit():
    import subprocess

    code = ("import sys, ray_qalloc.placement, ray_qalloc.costmodel.prior;"
            "bad=[m for m in ('ray','qiskit') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tenant_permissions_name_pools_and_methods():
    from ray_qalloc.backends.pools import pool_candidate_specs

    flt = TenantFilter({"lab": ["cpu-aaaa", "kind:qpu"], "soc": ["statevector"], "old": ["aer_mps"]})
    specs = {s.name: s for s in pool_candidate_specs("cpu-aaaa", cores=2, memory_bytes=1 << 30)
             + pool_candidate_specs("cpu-bbbb", cores=2, memory_bytes=1 << 30)}
    qpu = BackendSpec("qpu_fez", "qpu", "fake_qpu", 156)

    def ok(tenant: str, spec: BackendSpec) -> bool:
        return flt.check(JobView("j", 2, frozenset(), {}, 10, tenant=tenant), BackendView(spec)).ok

    assert ok("lab", specs["cpu-aaaa/mps"]) and not ok("lab", specs["cpu-bbbb/mps"]) and ok("lab", qpu)
    assert ok("soc", specs["cpu-bbbb/statevector@2"]) and not ok("soc", specs["cpu-aaaa/mps"]) and not ok("soc", qpu)
    assert ok("old", specs["cpu-bbbb/mps"]) and not ok("old", specs["cpu-bbbb/statevector"])
    assert ok("anyone", specs["cpu-aaaa/stabilizer"])


def test_class_weights_come_from_the_typed_settings():
    """The allocator and the benchmark make plans with ``Settings.placement``: a class that does not
    weigh fidelity takes the faster, noisier backend; the default class does not."""
    from ray_qalloc.config import load_settings

    job = JobView("j", 3, frozenset({"h", "cx"}), {}, 100, intent="quantum")
    est = {"fast_noisy": Estimate("fast_noisy", 1.0, 0.5, 0.0), "slow_clean": Estimate("slow_clean", 2.0, 0.99, 0.0)}
    live = {"fast_noisy": LiveState(0.0, True), "slow_clean": LiveState(0.0, True)}
    default = Plan("j", dict(est), weights=load_settings().placement.table())
    careless = Plan("j", dict(est), weights=load_settings(
        placement={"class_weights": {"normal": {"fidelity": 0.0}}}).placement.table())
    assert select(job, default, live).backend == "slow_clean"
    assert select(job, careless, live).backend == "fast_noisy"
