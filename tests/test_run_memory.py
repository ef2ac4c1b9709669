"""Run memory: measured runtimes and overruns beat predictions for circuits seen before."""

from __future__ import annotations

import hashlib
import math
import statistics
import time
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.backends.pools import pool_candidate_specs
from ray_qalloc.config import Limits
from ray_qalloc.costmodel.memory import (CENSORED_FACTOR, CENSORED_LOG_SD, EXACT_LOG_SD, MAX_OBSERVATIONS,
                                         NEIGHBOUR_MAX_DISTANCE, MemoryPredictor, RunMemory, feature_point,
                                         variant_of)
from ray_qalloc.costmodel.prior import HeuristicPrior
from ray_qalloc.jobs import make_spec, prepare_job
from ray_qalloc.placement import BackendView, JobView, LiveState, plan, select

SV = "cpu:statevector@1"
MPS = "cpu:matrix_product_state@1"
FEATS = {"size": 100.0, "depth": 20.0, "two_qubit_count": 40.0, "cut_max": 10.0,
         "interaction_edges": 20.0, "clifford_fraction": 0.5}


def _circuits() -> dict:
    from qiskit.circuit.library import quantum_volume
    from qiskit.circuit.random import random_circuit
    from qiskit.synthesis import synth_qft_full

    return {"qv18": quantum_volume(18, seed=1), "qv18b": quantum_volume(18, seed=2),
            "qv19": quantum_volume(19, seed=1), "rc20": random_circuit(20, 6, seed=1, measure=True),
            "qft23": synth_qft_full(23)}


@pytest.fixture(scope="module")
def jobs() -> dict[str, JobView]:
    """Real jobs from real circuits, through intake (features), keyed by content hash."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, qc in _circuits().items():
            j = prepare_job(make_spec(circuit=qc, shots=1024), Limits())
            out[name] = JobView(name, j.num_qubits, j.ops, j.features, j.shots,
                                circuit_key=hashlib.sha256(j.payload).hexdigest())
    return out


@pytest.fixture(scope="module")
def pool() -> list[BackendView]:
    return [BackendView(s) for s in pool_candidate_specs("cpu-1a2b3c4d", cores=2, memory_bytes=8 * 2**30)]


# -- exact, censored, bounds ----------------------------------------------------------------------

def test_exact_hit_is_the_median_with_a_small_spread():
    m = RunMemory()
    for t in (0.22, 0.9, 0.2, 0.25, 0.21):   # one run slowed by load
        m.record(SV, "c1", 18, FEATS, t)
    hit = m.lookup(SV, "c1", 18, FEATS, predicted_s=5.0)
    assert hit is not None and hit.source == "memory:exact"
    assert hit.runtime_s == pytest.approx(0.22)
    assert EXACT_LOG_SD <= hit.log_sd < CENSORED_LOG_SD
    assert m.lookup(MPS, "c1", 18, FEATS, predicted_s=5.0) is None   # another variant knows nothing


def test_censored_only_is_at_least_twice_the_bound_and_never_lowers_a_prediction():
    m = RunMemory()
    m.record(MPS, "qv", 18, FEATS, 20.0, censored=True)
    hit = m.lookup(MPS, "qv", 18, FEATS, predicted_s=1.0)
    assert hit is not None and hit.source == "memory:censored"
    assert hit.runtime_s == pytest.approx(CENSORED_FACTOR * 20.0) and hit.at_least_s == 20.0
    assert hit.log_sd == CENSORED_LOG_SD
    # a model that already predicts longer than the bound suggests keeps its prediction; the
    # recall only says that this variant ran the circuit ("bounded": not to be probed again)
    kept = m.lookup(MPS, "qv", 18, FEATS, predicted_s=100.0)
    assert kept is not None and kept.source == "memory:bounded" and kept.runtime_s == 100.0


def test_overrun_longer_than_the_typical_run_wins_over_the_median():
    m = RunMemory()
    for t in (1.0, 1.1, 0.9):
        m.record(MPS, "c", 10, FEATS, t)
    m.record(MPS, "c", 10, FEATS, 30.0, censored=True)
    hit = m.lookup(MPS, "c", 10, FEATS, predicted_s=0.5)
    assert hit is not None and hit.runtime_s >= 30.0 and hit.source == "memory:censored"


def test_one_run_reported_at_every_pass_is_one_event_and_its_end_replaces_its_bound():
    m = RunMemory()
    for t in (0.2, 0.21, 0.19):
        m.record(SV, "c", 18, FEATS, t, run_id=f"done{t}")
    for elapsed in (1.0, 2.0, 3.0):     # an overrun noticed at three passes
        m.record(SV, "c", 18, FEATS, elapsed, censored=True, run_id="slow")
    hit = m.lookup(SV, "c", 18, FEATS, 0.2)
    assert hit is not None and hit.runtime_s == 3.0          # at least the latest bound
    m.record(SV, "c", 18, FEATS, 3.5, run_id="slow")          # it ended: a measured time now
    hit = m.lookup(SV, "c", 18, FEATS, 0.2)
    assert hit is not None and hit.source == "memory:exact"
    assert hit.runtime_s == pytest.approx(statistics.median([0.2, 0.21, 0.19, 3.5]))


def test_old_outcomes_age_out_of_a_bounded_window():
    m = RunMemory()
    m.record(SV, "c", 5, FEATS, 50.0, censored=True)
    for i in range(MAX_OBSERVATIONS):
        m.record(SV, "c", 5, FEATS, 1.0 + i * 0.01)
    hit = m.lookup(SV, "c", 5, FEATS, 1.0)
    assert hit is not None and hit.source == "memory:exact" and hit.runtime_s < 2.0


def test_lru_keeps_at_most_max_entries_and_drops_the_least_recently_used():
    m = RunMemory(max_entries=3)
    for key in ("a", "b", "c"):
        m.record(SV, key, 4, FEATS, 1.0)
    assert m.lookup(SV, "a", 4, FEATS, 1.0) is not None      # touch a: b is now the oldest
    m.record(SV, "d", 4, FEATS, 1.0)
    m.record(SV, "e", 4, FEATS, 1.0)
    assert len(m) == 3
    assert m.lookup(SV, "b", 4, FEATS) is None and m.lookup(SV, "c", 4, FEATS) is None
    assert all(m.lookup(SV, k, 4, FEATS) is not None for k in ("a", "d", "e"))
    # evicted circuits are gone from the neighbour index too
    assert all(len(b) <= 3 for b in m._buckets.values()) and sum(len(b) for b in m._buckets.values()) == 3


def test_qpus_are_never_remembered_and_variants_ignore_the_pool():
    qpu = BackendSpec("qpu_a", "qpu", "fake_qpu", 127, device="fake_a")
    assert variant_of(qpu) is None
    a, b = (pool_candidate_specs(p, cores=2, memory_bytes=2**33) for p in ("cpu-aaaaaaaa", "cpu-bbbbbbbb"))
    assert [variant_of(s) for s in a] == [variant_of(s) for s in b]
    assert len({variant_of(s) for s in a}) == len(a)      # method and threads tell them apart
    mp = MemoryPredictor(HeuristicPrior())
    j = JobView("q", 3, frozenset({"h"}), FEATS, 100, circuit_key="k")
    mp.remember(j, qpu, 5.0, censored=True, predicted_s=1.0)
    assert len(mp.memory) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-3, 1e4), min_size=1, max_size=MAX_OBSERVATIONS),
       st.floats(1e-3, 1e4))
def test_exact_lookup_is_the_median_of_what_was_recorded(times, predicted):
    m = RunMemory()
    for t in times:
        m.record(SV, "key", 12, FEATS, t, predicted_s=predicted)
    hit = m.lookup(SV, "key", 12, FEATS, predicted)
    assert hit is not None and hit.source == "memory:exact"
    assert hit.runtime_s == pytest.approx(statistics.median(times))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 1e3), st.booleans()), min_size=1, max_size=MAX_OBSERVATIONS),
       st.floats(1e-3, 1e4), st.booleans())
def test_never_below_a_censored_bound(events, predicted, with_prediction):
    m = RunMemory()
    for seconds, censored in events:
        m.record(MPS, "key", 16, FEATS, seconds, censored=censored)
    bound = max((s for s, c in events if c), default=0.0)
    pred = predicted if with_prediction else None
    hit = m.lookup(MPS, "key", 16, FEATS, pred)
    answer = hit.runtime_s if hit is not None else pred
    if bound > 0:
        assert answer is not None and answer >= bound
        if not any(not c for _, c in events):
            assert answer >= min(CENSORED_FACTOR * bound, max(pred or 0.0, bound))


# -- neighbours -------------------------------------------------------------------------------------

def test_a_neighbour_lends_its_ratio_with_a_spread_that_grows_with_distance(jobs):
    qv18, qv18b, qv19, qft = jobs["qv18"], jobs["qv18b"], jobs["qv19"], jobs["qft23"]
    m = RunMemory()
    # the model said 1 s on MPS; the run took 8 s
    m.record(MPS, qv18.circuit_key, qv18.num_qubits, qv18.features, 8.0, predicted_s=1.0)
    near = m.lookup(MPS, qv18b.circuit_key, qv18b.num_qubits, qv18b.features, predicted_s=2.0)
    wider = m.lookup(MPS, qv19.circuit_key, qv19.num_qubits, qv19.features, predicted_s=2.0)
    assert near is not None and near.source == "memory:neighbour"
    assert near.runtime_s == pytest.approx(16.0)                 # the ratio 8×, on this prediction
    assert wider is not None and wider.runtime_s == pytest.approx(16.0)
    assert 0 < near.distance < wider.distance <= NEIGHBOUR_MAX_DISTANCE
    assert EXACT_LOG_SD < near.log_sd < wider.log_sd
    # QFT is another kind of circuit: no transfer
    assert m.lookup(MPS, qft.circuit_key, qft.num_qubits, qft.features, predicted_s=2.0) is None
    # a neighbour without a prediction cannot lend a ratio
    m2 = RunMemory()
    m2.record(MPS, qv18.circuit_key, qv18.num_qubits, qv18.features, 8.0)
    assert m2.lookup(MPS, qv18b.circuit_key, qv18b.num_qubits, qv18b.features, predicted_s=2.0) is None


def test_a_censored_neighbour_is_a_lower_bound_that_only_raises(jobs):
    qv18, qv18b = jobs["qv18"], jobs["qv18b"]
    m = RunMemory()
    m.record(MPS, qv18.circuit_key, 18, qv18.features, 20.0, censored=True, predicted_s=1.0)
    hit = m.lookup(MPS, qv18b.circuit_key, 18, qv18b.features, predicted_s=1.5)
    assert hit is not None and hit.source == "memory:neighbour-censored"
    assert hit.runtime_s == pytest.approx(CENSORED_FACTOR * 20.0 * 1.5)
    assert hit.log_sd > CENSORED_LOG_SD
    # stopped before its prediction (e.g. preempted): says nothing about a neighbour
    m2 = RunMemory()
    m2.record(MPS, qv18.circuit_key, 18, qv18.features, 0.2, censored=True, predicted_s=1.0)
    assert m2.lookup(MPS, qv18b.circuit_key, 18, qv18b.features, predicted_s=1.0) is None


def test_feature_point_is_scale_free(jobs):
    """4× the gates (the same mix) is one unit apart, whether the circuit is small or large."""
    def scaled(f: dict, by: float) -> dict:
        return {**f, "size": f["size"] * by, "two_qubit_count": f["two_qubit_count"] * by}

    qv = dict(jobs["qv18"].features)
    for base in (qv, scaled(qv, 10.0)):
        d = math.dist(feature_point(18, base), feature_point(18, scaled(base, 4.0)))
        assert d == pytest.approx(1.0, rel=0.02)


def test_lookups_are_cheap():
    m = RunMemory()
    for i in range(5000):
        n = 10 + i % 10
        m.record(MPS, f"c{i}", n, {**FEATS, "size": 50.0 + i % 97, "depth": 5.0 + i % 31}, 1.0, predicted_s=0.5)
    t0 = time.perf_counter()
    for i in range(2000):
        m.lookup(MPS, f"c{i}", 10 + i % 10, FEATS, 0.5)                   # exact
    exact_us = (time.perf_counter() - t0) / 2000 * 1e6
    t0 = time.perf_counter()
    for i in range(500):
        m.lookup(MPS, None, 10 + i % 10, {**FEATS, "size": 60.0 + i}, 0.5)   # neighbour search
    near_us = (time.perf_counter() - t0) / 500 * 1e6
    print(f"\nrun memory: exact {exact_us:.1f} µs, neighbour {near_us:.1f} µs")
    assert exact_us < 50 and near_us < 500   # loose: a shared, busy CI machine


# -- MemoryPredictor on the real prior, real circuits ---------------------------------------------

def test_memory_predictor_overrides_only_what_it_knows(jobs, pool):
    mp = MemoryPredictor(HeuristicPrior())
    assert mp.source == "prior"                        # attributes are the base's
    qv, qft = jobs["qv18"], jobs["qft23"]
    base = {e.backend: e for e in HeuristicPrior().predict(qv, pool)}
    assert [e.runtime_s for e in mp.predict(qv, pool)] == [base[b.name].runtime_s for b in pool]
    sv = next(b for b in pool if b.name == "cpu-1a2b3c4d/statevector")
    mp.remember(qv, sv.spec, 0.22, predicted_s=base[sv.name].runtime_s)
    after = {e.backend: e for e in mp.predict(qv, pool)}
    assert after[sv.name].runtime_s == pytest.approx(0.22) and after[sv.name].source == "memory:exact"
    assert after[sv.name].log_sd < base[sv.name].log_sd
    assert after[sv.name].cost == sv.spec.price.cost(0.22, qv.shots)
    others = [b.name for b in pool if b.name != sv.name]
    assert all(after[n] == base[n] for n in others)      # other variants: the prior's estimates
    # another circuit altogether is untouched
    qft_base = HeuristicPrior().predict(qft, pool)
    assert mp.predict(qft, pool) == qft_base


@pytest.fixture(scope="module")
def shipped():
    """The cost model that ships with the package (a real, trained artifact)."""
    from ray_qalloc.costmodel.model import LearnedPredictor
    from ray_qalloc.costmodel.registry import PACKAGED_DIR, latest_artifact

    path = latest_artifact(PACKAGED_DIR)
    if path is None:
        pytest.skip("no packaged cost-model artifact")
    from ray_qalloc.costmodel.model import CostModel

    return lambda: LearnedPredictor(CostModel.load(path), exploration_rate=0.0)


def test_an_overrun_sends_the_next_job_of_that_circuit_and_its_neighbours_elsewhere(jobs, pool, shipped):
    """Quantum volume 18 on MPS ran past its 20 s cap (measured) where the shipped model
    predicts a fraction of a second. Remembered at once as a censored bound, that circuit and
    its neighbour (another seed) are placed elsewhere; QFT-23 is another kind of circuit and
    keeps the model's estimate."""
    mp = MemoryPredictor(shipped())
    qv, qv_b, qft = jobs["qv18"], jobs["qv18b"], jobs["qft23"]
    mps = next(b for b in pool if b.name == "cpu-1a2b3c4d/mps")
    live = {b.name: LiveState(0.0, True) for b in pool}
    predicted = plan(qv, pool, mp).estimates[mps.name].runtime_s
    mp.remember(qv, mps.spec, 20.0, censored=True, predicted_s=predicted)
    for j in (qv, qv_b):
        p = plan(j, pool, mp)
        est = p.estimates[mps.name]
        if est.source.startswith("memory:"):
            assert est.runtime_s >= 20.0 * (1.0 if j is qv else 0.5)
        else:   # the model itself already expects it to be slow
            assert est.runtime_s >= CENSORED_FACTOR * 20.0 * (1.0 if j is qv else 0.5)
        assert method_of(select(j, p, live).backend) != "matrix_product_state"
    assert not plan(qft, pool, mp).estimates[mps.name].source.startswith("memory:")


def test_a_fast_measurement_is_used_for_a_neighbour_the_prior_misjudges(jobs, pool):
    """The prior bounds MPS's bond dimension by the entanglement gates could build; a QFT of a GHZ
    state builds little (bond dimension 2: MQT's qftentangled-24 took 0.07-0.24 s of CPU on MPS,
    docs/notes.md) yet the bound calls it hours long. Once one of that kind ran, its ratio
    carries over. (A QFT of |0...0> is no longer misjudged: the features see a product state.)"""
    from qiskit import QuantumCircuit
    from qiskit.synthesis import synth_qft_full

    def entangled_qft(n: int, key: str) -> JobView:
        qc = QuantumCircuit(n)
        qc.h(0)
        for q in range(n - 1):
            qc.cx(q, q + 1)
        qc.compose(synth_qft_full(n), inplace=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            j = prepare_job(make_spec(circuit=qc, shots=1024), Limits())
        return JobView(key, j.num_qubits, j.ops, j.features, j.shots, circuit_key=key)

    qft22, qft23 = entangled_qft(22, "eqft22"), entangled_qft(23, "eqft23")
    mp = MemoryPredictor(HeuristicPrior())
    live = {b.name: LiveState(0.0, True) for b in pool}
    mps = next(b for b in pool if b.name == "cpu-1a2b3c4d/mps")
    before = select(qft23, plan(qft23, pool, mp), live).backend
    assert method_of(before) == "statevector"            # the prior's (wrong) choice
    prior22 = HeuristicPrior().predict(qft22, [mps])[0].runtime_s
    mp.remember(qft22, mps.spec, 0.03, predicted_s=prior22)
    p = plan(qft23, pool, mp)
    assert p.estimates[mps.name].source == "memory:neighbour"
    assert method_of(select(qft23, p, live).backend) == "matrix_product_state"


def method_of(name: str | None) -> str | None:
    from ray_qalloc.backends.pools import method_of_name

    return method_of_name(name) if name else None


def test_remember_maps_a_memory_estimate_back_to_the_model_prediction(jobs, pool):
    """A job that ran on a memory estimate must not record a ratio against the memory's number."""
    mp = MemoryPredictor(HeuristicPrior())
    qv, qv_b = jobs["qv18"], jobs["qv18b"]
    sv = next(b for b in pool if b.name == "cpu-1a2b3c4d/statevector")
    prior_qv = HeuristicPrior().predict(qv, [sv])[0].runtime_s
    mp.remember(qv, sv.spec, 0.5, predicted_s=prior_qv)
    shown = mp.predict(qv, [sv])[0]
    assert shown.source == "memory:exact" and shown.runtime_s == 0.5
    mp.remember(qv, sv.spec, 0.5, predicted_s=shown.runtime_s)     # ran on the memory's estimate
    prior_b = HeuristicPrior().predict(qv_b, [sv])[0].runtime_s
    hit = mp.predict(qv_b, [sv])[0]
    assert hit.source == "memory:neighbour"
    assert hit.runtime_s == pytest.approx(prior_b * 0.5 / prior_qv, rel=1e-6)
