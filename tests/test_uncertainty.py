"""Selection weighs risk: a runtime is log-normal (median ``runtime_s``, sd ``log_sd``)."""

from __future__ import annotations

import math
import random

import pytest

from ray_qalloc.backends.pools import pool_candidate_specs
from ray_qalloc.costmodel.prior import METHOD_LOG_SD, QPU_LOG_SD, HeuristicPrior
from ray_qalloc.placement import BackendView, JobView, LiveState, explain, plan, select
from ray_qalloc.placement.model import Estimate, Plan
from ray_qalloc.placement.pipeline import (CLASS_WEIGHTS, MAX_LOG_SD, QUANTUM_FIDELITY_FACTOR, expected_runtime,
                                           static_objective)

FREE = LiveState(0.0, True)
SV_SD = METHOD_LOG_SD["statevector"]
MPS_SD = METHOD_LOG_SD["matrix_product_state"]


def job(**kw) -> JobView:
    base = dict(id="j", num_qubits=20, ops=frozenset({"h", "cx", "measure"}), features={"size": 100.0}, shots=1024)
    base.update(kw)
    return JobView(**base)


def two(sv: float, mps: float, sv_sd: float = SV_SD, mps_sd: float = MPS_SD) -> Plan:
    return Plan("j", {"sv": Estimate("sv", sv, 1.0, 0.0, log_sd=sv_sd),
                      "mps": Estimate("mps", mps, 1.0, 0.0, log_sd=mps_sd)})


@pytest.mark.parametrize("sv, mps, expect, why", [
    (0.30, 0.25, "sv", "thin margin, MPS's spread is large: not worth the risk"),
    (0.30, 0.15, "sv", "2× faster is still within MPS's spread"),
    (0.30, 0.08, "mps", "random 20q depth 6, measured: 3.75× faster, a clear margin"),
    (6.5, 0.03, "mps", "QFT-23, measured: 200× faster"),
    (0.22, 1.0, "sv", "quantum volume 18 as the model predicted it"),
])
def test_select_weighs_spread_with_the_priors_spreads(sv, mps, expect, why):
    live = {"sv": FREE, "mps": FREE}
    assert select(job(), two(sv, mps), live).backend == expect, why


def test_zero_spread_is_the_old_behaviour():
    live = {"sv": FREE, "mps": FREE}
    assert select(job(), two(0.30, 0.25, 0.0, 0.0), live).backend == "mps"
    assert select(job(), two(0.30, 0.25, 0.5, 0.5), live).backend == "mps"   # equal spreads: ratio kept


@pytest.mark.parametrize("seed", range(40))
def test_select_matches_brute_force_with_spreads(seed):
    rng = random.Random(seed)
    j = job(priority=rng.choice(list(CLASS_WEIGHTS)), intent=rng.choice(["auto", "quantum"]))
    names = [f"b{i}" for i in range(rng.randint(1, 6))]
    p = Plan("j", {n: Estimate(n, 10 ** rng.uniform(-3, 2), rng.uniform(0.2, 1.0), rng.uniform(0, 5),
                               log_sd=rng.choice([0.0, rng.uniform(0.0, 3.0)])) for n in names})
    live = {n: LiveState(rng.choice([0.0, 10 ** rng.uniform(-2, 2)]), rng.random() < 0.7) for n in names}

    def objective(n: str, wait: float | None = None) -> float:
        e, w = p.estimates[n], CLASS_WEIGHTS[j.priority]
        wf = w.fidelity * (QUANTUM_FIDELITY_FACTOR if j.intent == "quantum" else 1.0)
        s = min(e.log_sd, MAX_LOG_SD)
        run = e.runtime_s * math.exp(s * s / 2)      # log-normal mean
        wait = live[n].wait_s if wait is None else wait
        return math.log(max(wait + run, 1e-6)) - wf * math.log(e.fidelity) + w.money * e.cost

    choice = select(j, p, live, detailed=True)
    assert choice.backend == min(names, key=lambda n: (objective(n), n))
    static = static_objective(p, j.priority, j.intent)
    for n in names:
        assert choice.scores[n]["objective"] == pytest.approx(objective(n))
        # the static part keeps its meaning for the scheduler: log(median) + static = objective at no wait
        assert math.log(p.estimates[n].runtime_s) + static[n] == pytest.approx(objective(n, 0.0))


def test_expected_runtime_is_the_lognormal_mean_and_bounded():
    assert expected_runtime(2.0, 0.0) == 2.0
    assert expected_runtime(2.0, 1.0) == pytest.approx(2.0 * math.exp(0.5))
    assert expected_runtime(2.0, 50.0) == pytest.approx(2.0 * math.exp(MAX_LOG_SD ** 2 / 2))
    assert expected_runtime(2.0, float("nan")) == expected_runtime(2.0, MAX_LOG_SD)
    # the mean, estimated by sampling the log-normal it stands for
    rng = random.Random(1)
    sample = [2.0 * math.exp(rng.gauss(0.0, 0.8)) for _ in range(200_000)]
    assert sum(sample) / len(sample) == pytest.approx(expected_runtime(2.0, 0.8), rel=0.01)


def test_scores_explain_and_reason_show_the_spread():
    p = two(0.30, 0.08)
    choice = select(job(), p, {"sv": FREE, "mps": LiveState(0.01, True)}, detailed=True)
    s = choice.scores["mps"]
    assert s["log_sd"] == MPS_SD and s["expected_runtime_s"] == pytest.approx(expected_runtime(0.08, MPS_SD))
    assert s["completion_s"] == pytest.approx(0.01 + s["expected_runtime_s"])
    assert "σ=1.5" in choice.reason and "median 0.08" in choice.reason
    rows = explain(p, choice)["backends"]
    assert rows["sv"]["log_sd"] == SV_SD and rows["sv"]["expected_runtime_s"] > rows["sv"]["runtime_s"]
    assert p.to_dict()["estimates"]["mps"]["log_sd"] == MPS_SD
    certain = select(job(), two(0.3, 0.08, 0.0, 0.0), {"sv": FREE, "mps": FREE})
    assert "σ" not in certain.reason


def test_the_prior_gives_every_estimate_a_spread_mps_the_largest():
    specs = pool_candidate_specs("cpu-1a2b3c4d", cores=2, memory_bytes=8 * 2**30)
    from ray_qalloc.backends.base import BackendSpec

    qpu = BackendSpec("qpu_a", "qpu", "fake_qpu", 127, device="fake_a", noisy=True)
    views = [BackendView(s) for s in specs] + [BackendView(qpu)]
    p = plan(job(num_qubits=10, ops=frozenset({"h", "cx", "t", "measure"})), views, HeuristicPrior())
    sd = {n: e.log_sd for n, e in p.estimates.items()}
    assert all(v > 0 for v in sd.values())
    assert sd["cpu-1a2b3c4d/mps"] == max(sd.values())
    assert sd["cpu-1a2b3c4d/statevector"] < sd["cpu-1a2b3c4d/density_matrix"] < sd["cpu-1a2b3c4d/mps"]
    assert sd["qpu_a"] == QPU_LOG_SD


def test_select_stays_cheap():
    import time

    p = Plan("j", {f"b{i}": Estimate(f"b{i}", 0.1 * (i + 1), 1.0, 0.0, log_sd=0.1 * i) for i in range(8)})
    live = {n: LiveState(0.01, True) for n in p.estimates}
    j = job()
    select(j, p, live)
    t0 = time.perf_counter()
    for _ in range(5000):
        select(j, p, live)
    us = (time.perf_counter() - t0) / 5000 * 1e6
    print(f"\nselect over 8 backends: {us:.1f} µs")
    assert us < 100   # loose: a shared, busy CI machine
