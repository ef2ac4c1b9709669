"""The placement benchmark on hand-made truth (no measuring worker; one tiny real QPU emulation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.baselines import BASELINES, POLICIES
from benchmarks.placement import case_id_of, intake, run
from benchmarks.report import detect_mix, goals, ratios
from benchmarks.simulation import (METRICS, FixedPlans, HedgeAction, HindsightPlanner, PipelinePlanner, SimJob, lower_bound,
                                   percentile, simulate)
from ray_qalloc.backends.base import BackendSpec, Price
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.placement.model import Estimate, JobView, Plan

SIM_PRICE = Price(per_second=0.0001)
QPU_PRICE = Price(per_second=1.6)


def cand(method: str, threads: int = 1, pool: str = "p") -> BackendSpec:
    name = f"{pool}/{method}" if threads == 1 else f"{pool}/{method}@{threads}"
    return BackendSpec(name, "simulator", "aer", 30, slots=2, method=method, threads=threads, price=SIM_PRICE,
                       pool=pool)


def qpu(name: str) -> BackendSpec:
    return BackendSpec(name, "qpu", "fake_qpu", 127, slots=1, device=name, noisy=True, threads=0, price=QPU_PRICE)


SV, MPS, AUTO, Q = "p/statevector", "p/mps", "p/automatic", "qpu_q"
CANDIDATES = [cand("statevector"), cand("matrix_product_state").copy(name=MPS), qpu(Q)]
FREE = [cand("automatic"), qpu(Q)]
CORES = {"p": 2.0}


def view(i: str, priority: str = "normal", deadline_s: float | None = None, intent: str = "auto",
         key: str | None = None) -> JobView:
    return JobView(i, 20, frozenset({"h", "cx", "measure"}), {"size": 40.0}, 100, intent=intent, priority=priority,
                   deadline_s=deadline_s, circuit_key=key)


def plan_of(jid: str, predicted: dict[str, float], fidelity: dict[str, float] | None = None) -> Plan:
    fid = fidelity or {}
    return Plan(jid, {b: Estimate(b, t, fid.get(b, 1.0), 0.0) for b, t in predicted.items()})


def small_trace():
    """8 jobs; predictions wrong on purpose (MPS looks fast, is slow)."""
    jobs, truth, plans, fid = [], {}, {}, {}
    spec = [  # id, arrival, priority, intent, deadline, true (sv, mps, automatic)
        ("j0", 0.0, "normal", "auto", None, (2.0, 8.0, 2.1)),
        ("j1", 0.5, "batch", "auto", None, (4.0, 12.0, 4.2)),
        ("j2", 1.0, "high", "auto", 20.0, (1.0, 6.0, 1.1)),
        ("j3", 1.5, "normal", "quantum", None, None),
        ("j4", 2.0, "emergency", "auto", 10.0, (0.5, 3.0, 0.6)),
        ("j5", 6.0, "normal", "classical", None, (3.0, 9.0, 3.1)),
        ("j6", 9.0, "batch", "auto", None, (2.0, 10.0, 2.2)),
        ("j7", 12.0, "normal", "quantum", 30.0, None),
    ]
    for jid, arrival, prio, intent, deadline, t in spec:
        jobs.append(SimJob(jid, arrival, view(jid, prio, deadline, intent)))
        if t is None:
            truth[jid] = {Q: 5.0}
            plans[jid] = plan_of(jid, {Q: 4.0}, {Q: 0.9})
            fid[jid] = {Q: 0.85}
            continue
        sv, mps, auto = t
        truth[jid] = {SV: sv, MPS: mps, AUTO: auto, Q: 30.0}
        predicted = {SV: 2 * sv, MPS: mps / 8, AUTO: auto}
        fidelity = {}
        if intent == "auto":
            predicted[Q] = 25.0
            fidelity[Q] = 0.9
        plans[jid] = plan_of(jid, predicted, fidelity)
        fid[jid] = {Q: 0.85}
    return jobs, truth, plans, fid


def run_all(jobs, truth, plans, fid):
    out = {}
    prices = {s.name: s.price for s in CANDIDATES + FREE}
    for p in POLICIES:
        pool = FREE if p in ("fcfs", "least_loaded", "aer_automatic", "best_fidelity") else CANDIDATES
        planner = HindsightPlanner(FixedPlans(plans), truth, fid, prices, 60.0) if p == "hindsight" else plans
        out[p] = simulate(jobs, truth, planner, pool, p, fidelity=fid, penalty_s=60.0, node_cpus=CORES)
    return out


def test_lower_bound_is_below_every_policy():
    jobs, truth, plans, fid = small_trace()
    res = run_all(jobs, truth, plans, fid)
    specs = {s.name: s for s in CANDIDATES + FREE}
    bound = lower_bound(jobs, truth, {j: list(p.estimates) for j, p in plans.items()}, specs, cores=2)
    assert bound["completed"] == len(jobs)
    for name, m in res.items():
        assert m["completed"] == len(jobs), (name, m)
        assert bound["mean_jct_s"] <= m["mean_jct_s"] + 1e-9, name
        assert bound["makespan_s"] <= m["makespan_s"] + 1e-9, name
    # the fastest true run: sv for the simulator jobs, the QPU for quantum ones
    assert bound["mean_jct_s"] == pytest.approx((2 + 4 + 1 + 5 + 0.5 + 3 + 2 + 5) / 8)
    assert bound["core_work_s"] == pytest.approx(2 + 4 + 1 + 0.5 + 3 + 2)
    # hindsight (qalloc's selector fed truth) avoids the MPS trap the predictions set
    assert res["hindsight"]["mean_jct_s"] < res["qalloc"]["mean_jct_s"]


def test_aer_automatic_runs_on_the_same_cores_and_quantum_jobs_on_qpus():
    jobs, truth, plans, fid = small_trace()
    rec: list[dict] = []
    simulate(jobs, truth, plans, FREE, "aer_automatic", fidelity=fid, record=rec, node_cpus=CORES)
    for r in rec:
        assert r["backend"] == (Q if r["intent"] == "quantum" else AUTO), r
    # two cores: at most two automatic runs at once
    spans = sorted((r["start_s"], r["completion_s"]) for r in rec if r["backend"] == AUTO)
    for t, _ in spans:
        assert sum(1 for s, e in spans if s <= t < e) <= 2


def test_candidates_share_the_pool_cores():
    """A 2-thread statevector run takes both cores: nothing else starts on the pool meanwhile."""
    pool = [cand("statevector", 2), cand("matrix_product_state").copy(name=MPS)]
    jobs = [SimJob("a", 0.0, view("a")), SimJob("b", 0.1, view("b"))]
    truth = {"a": {"p/statevector@2": 5.0, MPS: 1.0}, "b": {"p/statevector@2": 5.0, MPS: 1.0}}
    plans = {"a": plan_of("a", {"p/statevector@2": 1.0}), "b": plan_of("b", {MPS: 1.0})}
    rec: list[dict] = []
    simulate(jobs, truth, plans, pool, "qalloc", record=rec, node_cpus=CORES)
    by = {r["id"]: r for r in rec}
    assert by["b"]["start_s"] == pytest.approx(5.0)


def test_fcfs_ignores_priority_while_qalloc_serves_emergency_first():
    pool = [cand("statevector").copy(slots=1)]
    jobs = [SimJob("long", 0.0, view("long")), SimJob("norm", 1.0, view("norm")),
            SimJob("emer", 2.0, view("emer", "emergency"))]
    truth = {j.id: {SV: 10.0 if j.id == "long" else 1.0} for j in jobs}
    plans = {j.id: plan_of(j.id, {SV: truth[j.id][SV]}) for j in jobs}
    starts = {}
    for policy in ("qalloc", "fcfs"):
        rec: list[dict] = []
        m = simulate(jobs, truth, plans, pool, policy, record=rec, node_cpus={"p": 1.0})
        assert m["completed"] == 3 and m["preemptions"] == 0
        starts[policy] = {r["id"]: r["start_s"] for r in rec}
    assert starts["qalloc"]["emer"] == 10.0 and starts["qalloc"]["norm"] == 11.0
    assert starts["fcfs"]["norm"] == 10.0 and starts["fcfs"]["emer"] == 11.0


def test_preempted_batch_job_still_completes():
    pool = [cand("statevector").copy(slots=1)]
    jobs = [SimJob("batch", 0.0, view("batch", "batch")), SimJob("emer", 1.0, view("emer", "emergency"))]
    truth = {"batch": {SV: 100.0}, "emer": {SV: 1.0}}
    plans = {j.id: plan_of(j.id, truth[j.id]) for j in jobs}
    rec: list[dict] = []
    m = simulate(jobs, truth, plans, pool, "qalloc", record=rec, node_cpus={"p": 1.0})
    by = {r["id"]: r for r in rec}
    assert m["preemptions"] == 1 and m["completed"] == 2 and m["unplaceable"] == 0
    assert by["emer"]["start_s"] == 1.0 and by["emer"]["completion_s"] == 2.0
    assert by["batch"]["runs"] == 2 and by["batch"]["completion_s"] == pytest.approx(102.0)
    assert m["lost_work_s"] == pytest.approx(1.0)
    assert m["total_cost"] == pytest.approx(SIM_PRICE.cost(1.0, 100) * 2 + SIM_PRICE.cost(100.0, 100))


def test_unmeasured_backend_is_charged_the_penalty_and_no_plan_is_unplaceable():
    jobs = [SimJob("x", 0.0, view("x")), SimJob("y", 0.0, view("y"))]
    plans = {"x": plan_of("x", {SV: 1.0})}
    m = simulate(jobs, {"x": {}}, plans, CANDIDATES, "qalloc", penalty_s=42.0, node_cpus=CORES)
    assert m["completed"] == 1 and m["unplaceable"] == 1 and m["mean_jct_s"] == 42.0


def test_hedge_hook_starts_a_backup_and_the_first_result_wins():
    jobs = [SimJob("a", 0.0, view("a"))]
    truth = {"a": {MPS: 50.0, SV: 2.0}}
    plans = {"a": plan_of("a", {MPS: 0.1, SV: 3.0})}
    seen: list[float] = []

    def hedger(now, runs, live):
        seen.append(now)
        return [HedgeAction("backup", r.job.id, SV) for r in runs if r.elapsed_s > 1.0 and not r.has_backup]

    rec: list[dict] = []
    m = simulate(jobs, truth, plans, CANDIDATES, "qalloc", record=rec, node_cpus=CORES, hedger=hedger,
                 hedge_check_s=0.5)
    assert m["hedges"] == 1 and rec[0]["backend"] == SV
    assert rec[0]["completion_s"] == pytest.approx(1.1 + 2.0)     # overrun seen at 0.6, past 1 s at 1.1: backup then
    assert m["hedge_wasted_s"] == pytest.approx(3.1)               # the MPS run, stopped when sv finished
    assert seen[0] == pytest.approx(0.6)   # first check past the predicted end (0.1 s), then every 0.5 s


def test_a_job_that_finds_its_core_held_by_a_probe_starts_at_once():
    """As live (``stop_probes`` kicks a dispatch pass): a probe racing on the idle core gives it
    back when a job waits, and that job starts then, not at the next event (here: 9 s later)."""
    jobs = [SimJob("a", 0.0, view("a")), SimJob("b", 1.0, view("b"))]
    truth = {"a": {SV: 10.0, MPS: 50.0}, "b": {SV: 1.0, MPS: 1.0}}
    plans = {"a": plan_of("a", {SV: 10.0, MPS: 20.0}), "b": plan_of("b", {SV: 1.0, MPS: 1.0})}

    def prober(now, runs, live):
        return [HedgeAction("backup", r.job.id, MPS) for r in runs if r.backend == SV and live[MPS].can_start]

    rec: list[dict] = []
    m = simulate(jobs, truth, plans, CANDIDATES, "qalloc", record=rec, node_cpus=CORES, prober=prober)
    by_id = {r["id"]: r for r in rec}
    assert m["probes"] == 1
    assert by_id["b"]["start_s"] == pytest.approx(1.0) and by_id["b"]["completion_s"] == pytest.approx(2.0)
    assert by_id["a"]["backend"] == SV and by_id["a"]["completion_s"] == pytest.approx(10.0)


class _Toy:
    """A predictor that is wrong the heavy way: MPS predicted fast, really past any cap."""

    source = "toy"

    def predict(self, job, backends):
        return [Estimate(b.name, 0.05 if b.spec.method == "matrix_product_state" else 1.5, 1.0, 0.0)
                for b in backends]


def test_qalloc_learns_a_wrong_mps_prediction_after_the_first_overrun():
    from benchmarks.live_learning import LearningPlanner, live_hedger
    from ray_qalloc.costmodel.memory import MemoryPredictor, RunMemory
    from ray_qalloc.placement.model import BackendView

    pool = CANDIDATES[:2]
    views = [BackendView(s) for s in pool]
    jobs = [SimJob(f"q{i}", 5.0 * i, view(f"q{i}", key="qv-20"), "qv-20") for i in range(6)]
    truth = {j.id: {MPS: 60.0, SV: 1.0} for j in jobs}
    planner = LearningPlanner(views, MemoryPredictor(_Toy(), RunMemory()), {s.name: s for s in pool})
    hedger, info = live_hedger(planner)
    rec: list[dict] = []
    m = simulate(jobs, truth, planner, pool, "qalloc", record=rec, node_cpus=CORES, hedger=hedger,
                 hedge_check_s=info["interval_s"])
    by = {r["id"]: r for r in rec}
    assert m["hedges"] == 1                       # only the first job ever ran on MPS
    assert all(by[f"q{i}"]["backend"] == SV for i in range(6))
    assert by["q0"]["completion_s"] < 3.0         # its backup finished long before the MPS run would
    assert all(by[f"q{i}"]["completion_s"] - 5.0 * i == pytest.approx(1.0) for i in range(1, 6))
    # without learning or hedging (a baseline's planner) every job pays the wrong pick
    plain = simulate(jobs, truth, PipelinePlanner(views, _Toy(), learn=False), pool, "qalloc", node_cpus=CORES)
    assert plain["mean_jct_s"] > 10 * m["mean_jct_s"]


def test_with_no_core_for_a_backup_an_overrunning_run_is_restarted_keeping_its_place():
    """As live (``RunLife.restart``): one core, two jobs of a circuit the model believes fast on
    MPS (truth: 60 s; statevector 1 s). No backup can start beside the first MPS run, so it is
    stopped and the job queued again without MPS, ahead of the later job; both end on statevector
    in seconds, where without restarts the first would hold the core for its whole MPS run."""
    from benchmarks.live_learning import LearningPlanner, live_hedger
    from ray_qalloc.costmodel.memory import MemoryPredictor, RunMemory
    from ray_qalloc.placement.model import BackendView

    pool = CANDIDATES[:2]
    views = [BackendView(s) for s in pool]
    jobs = [SimJob("q0", 0.0, view("q0", key="qv-20"), "qv-20"), SimJob("q1", 0.2, view("q1", key="qv-20b"), "qv-20b")]
    truth = {"q0": {MPS: 60.0, SV: 1.0}, "q1": {MPS: 60.0, SV: 1.0}}

    def run(restart: bool) -> tuple[dict, dict]:
        from ray_qalloc.config import load_settings

        settings = load_settings(hedge={"restart": restart, "probe_idle": False})
        planner = LearningPlanner(views, MemoryPredictor(_Toy(), RunMemory()), {s.name: s for s in pool},
                                  settings=settings)
        hedger, info = live_hedger(planner, settings)
        rec: list[dict] = []
        m = simulate(jobs, truth, planner, pool, "qalloc", record=rec, node_cpus={"p": 1.0}, hedger=hedger,
                     hedge_check_s=info["interval_s"])
        return m, {r["id"]: r for r in rec}

    m, by = run(True)
    assert m["restarts"] >= 1 and m["hedges"] == 0
    # restarted once past hedge.restart_min_s (5 s), then 1 s on statevector
    assert by["q0"]["backend"] == SV and by["q0"]["completion_s"] < 5.0 + 1.0 + 1.0
    assert by["q1"]["completion_s"] < 15.0 and by["q0"]["completion_s"] < by["q1"]["completion_s"]
    slow, _ = run(False)
    assert slow["restarts"] == 0 and slow["mean_jct_s"] > 5 * m["mean_jct_s"]


def test_ratios_and_goals_depend_on_the_mix():
    jobs, truth, plans, fid = small_trace()
    res = run_all(jobs, truth, plans, fid)
    for name in POLICIES:
        for key in METRICS:
            assert key in res[name], (name, key)
    bound = {"mean_jct_s": 1.0}
    r = ratios(res, bound)
    for key in ("qalloc_over_aer_automatic_mean_jct", "qalloc_over_least_loaded_mean_jct",
                "qalloc_over_fcfs_mean_jct", "qalloc_over_lower_bound_mean_jct",
                "qalloc_over_best_fidelity_mean_fidelity_quantum", "qalloc_minus_best_baseline_deadline_miss_rate"):
        assert r[key] is not None, key
    assert r["best_baseline_for_deadlines"] in BASELINES
    assert r["qalloc_over_lower_bound_mean_jct"] == pytest.approx(res["qalloc"]["mean_jct_s"])
    heavy = {g["name"]: g for g in goals(r, "heavy")}
    light = {g["name"]: g for g in goals(r, "light")}
    assert heavy["qalloc_over_aer_automatic_mean_jct"]["target"] == 0.5
    assert "qalloc_over_least_loaded_mean_jct" in heavy and "qalloc_over_least_loaded_mean_jct" not in light
    assert light["qalloc_over_aer_automatic_mean_jct"]["target"] == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 95) is None
    assert detect_mix([{"mix": "light"}], [20], [True])[0] == "light"
    assert detect_mix([{}, {}], [20, 22], [True, True])[0] == "heavy"
    assert detect_mix([{}, {}], [8, 12], [True, False])[0] == "light"


def test_truth_reads_censored_runs_as_three_caps_two_threads_below_threshold_and_pairs_automatic(tmp_path):
    from benchmarks.truth import automatic_spec, pool_specs, read_truth

    specs = pool_specs("cpu-local", 2, 4 * 2**30) + [automatic_spec("cpu-local", 2, 4 * 2**30)]
    h1, h2 = RunHistory(tmp_path / "threads1"), RunHistory(tmp_path / "threads2")
    rows1 = [{"job_id": c, "case_id": c, "backend": b, "outcome": o, "wall_s": w, "cap_s": 2.0, "attempt_id": i}
             for i, (c, b, o, w) in enumerate([("small", "aer_statevector", "completed", 0.1),
                                               ("wide", "aer_statevector", "completed", 4.0),
                                               ("wide", "aer_mps", "censored_time", 2.0),
                                               ("wide", "aer_automatic", "completed", 3.9),
                                               ("wide", "aer_density_matrix", "censored_memory", None)])]
    rows1[3]["method"] = "statevector"      # what Aer's automatic chose: both share the smaller time
    h1.append(rows1, source="test")
    h2.append([{"job_id": "wide", "case_id": "wide", "backend": "aer_statevector", "outcome": "completed",
                "wall_s": 2.5, "cap_s": 2.0, "attempt_id": 99}], source="test")
    # a second sample, taken later: the truth is the smaller run (the one less disturbed by other work)
    RunHistory(tmp_path / "sample1" / "threads1").append(
        [{"job_id": "small", "case_id": "small", "backend": "aer_statevector", "outcome": "completed",
          "wall_s": 0.08, "cap_s": 2.0, "attempt_id": 7},
         {"job_id": "wide", "case_id": "wide", "backend": "aer_mps", "outcome": "censored_time", "wall_s": 2.0,
          "cap_s": 2.0, "attempt_id": 8}], source="test")
    truth, outcomes = read_truth(tmp_path, {"small", "wide"}, specs, 2.0)
    assert truth["wide"] == {"cpu-local/statevector": 3.9, "cpu-local/statevector@2": 2.5,
                             "cpu-local/mps": 6.0, "cpu-local/automatic": 3.9}
    assert truth["small"] == {"cpu-local/statevector": 0.08, "cpu-local/statevector@2": 0.08}
    assert outcomes["wide"]["cpu-local/mps"] == "censored_time (min of 2 samples)"
    assert outcomes["wide"]["cpu-local/density_matrix"] == "censored_memory"
    assert outcomes["wide"]["cpu-local/automatic"] == "completed (paired with cpu-local/statevector)"


def test_cpu_clock_truth_is_cpu_seconds_and_two_threads_no_better_than_their_wall_speedup(tmp_path):
    """On a loaded machine wall time measures the load: ``clock="cpu"`` charges a one-thread run
    the CPU it used; a two-thread run max(cpu_2 / 2, cpu_1 x wall_2 / wall_1); a row without
    CPU time falls back to its wall time; a censored run stays 3x the cap."""
    from benchmarks.truth import automatic_spec, pool_specs, read_truth

    specs = pool_specs("cpu-local", 2, 4 * 2**30) + [automatic_spec("cpu-local", 2, 4 * 2**30)]
    rows1 = [{"job_id": c, "case_id": c, "backend": b, "outcome": o, "wall_s": w, "cpu_s": cpu, "cap_s": 2.0,
              "attempt_id": i}
             for i, (c, b, o, w, cpu) in enumerate([
                 ("wide", "aer_statevector", "completed", 4.0, 0.4),      # loaded: 10x its CPU
                 ("wide", "aer_automatic", "completed", 3.0, 0.5),
                 ("wide", "aer_mps", "censored_time", 2.0, 0.3),
                 ("wide", "aer_density_matrix", "completed", 1.0, None),  # no CPU recorded: wall
                 ("flat", "aer_statevector", "completed", 1.0, 0.2)])]
    rows1[1]["method"] = "statevector"
    RunHistory(tmp_path / "threads1").append(rows1, source="test")
    RunHistory(tmp_path / "threads2").append(
        [{"job_id": "wide", "case_id": "wide", "backend": "aer_statevector", "outcome": "completed", "wall_s": 2.5,
          "cpu_s": 0.3, "cap_s": 2.0, "attempt_id": 20},       # wall speedup 1.6: 0.4 x 2.5/4 = 0.25 > 0.3/2
         {"job_id": "flat", "case_id": "flat", "backend": "aer_statevector", "outcome": "completed", "wall_s": 1.0,
          "cpu_s": 0.5, "cap_s": 2.0, "attempt_id": 21}], source="test")   # cpu/2 = 0.25 > 0.2 x 1.0
    truth, _ = read_truth(tmp_path, {"wide", "flat"}, specs, 2.0, clock="cpu")
    assert truth["wide"]["cpu-local/statevector"] == truth["wide"]["cpu-local/automatic"] == pytest.approx(0.4)
    assert truth["wide"]["cpu-local/statevector@2"] == pytest.approx(0.25)
    assert truth["wide"]["cpu-local/mps"] == 6.0
    assert truth["wide"]["cpu-local/density_matrix"] == 1.0
    assert truth["flat"]["cpu-local/statevector@2"] == pytest.approx(0.25)
    wall, _ = read_truth(tmp_path, {"wide", "flat"}, specs, 2.0)
    assert wall["wide"]["cpu-local/statevector"] == 3.0 and wall["wide"]["cpu-local/statevector@2"] == 2.5


GHZ = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nh q[0];\ncx q[0],q[1];\ncx q[1],q[2];\nmeasure q -> c;\n'
QFT = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nh q[0];\ncp(pi/2) q[1],q[0];\nh q[1];\n'
       'cp(pi/4) q[2],q[0];\ncp(pi/2) q[2],q[1];\nh q[2];\nmeasure q -> c;\n')


def test_measured_fidelity_of_a_real_emulated_qpu_run():
    """A GHZ-3 through the real FakeQPUBackend: exact ideal distribution, Hellinger fidelity."""
    from qiskit import qasm2

    from benchmarks.fidelity import ideal_distribution, qpu_profile, qpu_seconds

    ideal, how = ideal_distribution(qasm2.loads(GHZ))
    assert how == "exact" and ideal == pytest.approx({"000": 0.5, "111": 0.5})
    p = qpu_profile("qpu_torino", GHZ, True, 2000, 7)
    assert p["fidelity_source"] == "measured" and p["ideal"] == "exact" and p["noise_model"] == "exact_local"
    assert 0.8 < p["fidelity"] < 1.0
    assert qpu_seconds(p, 1000) == pytest.approx(1000 * (p["duration_s"] + p["rep_delay_s"]) + p["overhead_s"])


def write_trace(path: Path) -> None:
    lines = [
        {"id": "a", "arrival_s": 0.0, "qasm": GHZ, "shots": 1024, "priority": "normal", "deadline_s": None,
         "intent": "auto", "fidelity_min": None, "tenant": "t1"},
        {"id": "b", "arrival_s": 0.2, "qasm": QFT, "shots": 512, "priority": "emergency", "deadline_s": 5.0,
         "intent": "auto", "fidelity_min": None, "tenant": "t2"},
        {"id": "c", "arrival_s": 0.3, "qasm": GHZ, "shots": 1024, "priority": "high", "deadline_s": 30.0,
         "intent": "quantum", "fidelity_min": 0.5, "tenant": "t1"},
        {"id": "d", "arrival_s": 0.4, "qasm": QFT, "shots": 512, "intent": "classical"},   # optional fields left out
        {"id": "a", "arrival_s": 0.5, "qasm": GHZ, "shots": 1024, "priority": "batch"},     # repeated id
        {"id": "bad", "arrival_s": 0.6, "qasm": "OPENQASM 2.0; this is not qasm", "shots": 10},
        {"id": "bad2", "arrival_s": 0.7, "qasm": GHZ, "shots": 10, "priority": "urgent"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


_IDS = __import__("itertools").count(1)


def fake_measure(cases, backends, history, *, time_cap_s, threads=1, **_):
    """Inject truth: one history row per (case, backend), as the measure module would write."""
    rows = []
    for c in cases:
        for b in backends:
            if b == "aer_stabilizer" and "cp" in c.source:
                continue                    # filtered: not Clifford, no row
            row = {"job_id": c.case_id, "case_id": c.case_id, "backend": b, "family": c.family, "shots": c.shots,
                   "cap_s": time_cap_s, "attempt_id": next(_IDS)}   # unique, as the history requires
            if b == "aer_density_matrix":
                row.update(outcome="censored_time", wall_s=time_cap_s)
            else:
                row.update(outcome="completed", wall_s=0.01 * (1 + len(b)) / threads)
            rows.append(row)
    history.append(rows, source="test")
    return type("Report", (), {"attempted": len(rows), "censored": 0, "skipped_existing": 0, "by_outcome": {}})()


# the QPUs placement predicts best for the GHZ job (best_fidelity picks by prediction): the
# superconducting fez and the trapped-ion device (no routing)
BEST_PREDICTED = ("qpu_fez", "qpu_ion_aria")


def fake_profiles(circuits, backends, cache, **_):
    for qasm, n in circuits:
        for b in backends:
            cache.add(qasm, {"backend": b, "num_qubits": n, "duration_s": 2e-6, "rep_delay_s": 250e-6,
                             "overhead_s": 2.0, "fidelity": 0.9 if b in BEST_PREDICTED else 0.8,
                             "fidelity_source": "measured", "ideal": "exact", "noise_model": "exact_local"})
    return {"measured": len(circuits) * len(backends)}


def test_hand_written_trace_end_to_end_with_injected_truth(tmp_path):
    from rich.console import Console

    from benchmarks.traces import read_trace

    trace = tmp_path / "trace.jsonl"
    write_trace(trace)
    work = intake(read_trace(trace))
    assert sorted(j.id for j in work.jobs) == ["a", "a#1", "b", "c", "d"]
    assert sorted(r["id"] for r in work.rejected) == ["bad", "bad2"]
    assert len(work.cases) == 2 and work.case_of["a"] == work.case_of["a#1"] == case_id_of(GHZ, 1024)

    result = run(trace, model=None, truth_dir=tmp_path / "truth", time_cap_s=2.0, seed=0, policies=POLICIES,
                 console=Console(quiet=True), measure_fn=fake_measure, profile_fn=fake_profiles)
    assert result["jobs"] == 5 and result["rejected"] == 2 and result["mix"] == "light"
    for name in POLICIES:
        m = result["policies"][name]
        assert all(k in m for k in METRICS), name
        assert m["completed"] == 5, (name, m)
        assert result["lower_bound"]["mean_jct_s"] <= m["mean_jct_s"] + 1e-9, name
    assert result["policies"]["aer_automatic"]["pool"] == "automatic (free)"
    assert result["policies"]["qalloc"]["pool"] == "candidates"
    assert "cpu-local/statevector@2" in result["candidates"]
    # the quantum job ran on the QPU of best measured fidelity under best_fidelity, and its
    # fidelity is the measured one
    assert result["policies"]["best_fidelity"]["mean_fidelity_quantum"] == pytest.approx(0.9)
    assert {g["name"] for g in result["goals"]} >= {"qalloc_over_aer_automatic_mean_jct",
                                                    "qalloc_over_best_fidelity_mean_fidelity_quantum"}
    assert result["families"]["unknown_family_jobs"] == 5
    json.dumps(result, default=str)


def test_trace_mixes_are_wide_or_small_and_hold_families_out():
    from benchmarks.traces import generate_mix

    jobs, info = generate_mix(16, 1, "heavy", families=["qft", "wstate", "qpeexact"], exclude=["qpeexact"],
                              work=lambda qasm, shots: 1.0)
    assert {j["family"] for j in jobs} <= {"qft", "wstate"} and all(j["mix"] == "heavy" for j in jobs)
    from ray_qalloc.circuits import parse_circuit
    from ray_qalloc.config import Limits

    for j in jobs:
        n = parse_circuit(j["qasm"], Limits()).circuit.num_qubits
        assert (n <= 10) if j["intent"] == "quantum" else (17 <= n <= 24), (j["family"], n)
    # arrivals spread so that the estimated work (1 core-s per heavy job) keeps 2 cores ~85 % busy
    n_heavy = sum(1 for j in jobs if j["intent"] != "quantum")
    assert info["estimated_span_s"] == pytest.approx(n_heavy / (2 * 0.85))
    light, _ = generate_mix(12, 1, "light", families=["qaoa", "random"])
    assert all(parse_circuit(j["qasm"], Limits()).circuit.num_qubits <= 16 for j in light)
    with pytest.raises(ValueError):
        generate_mix(4, 1, "heavy", exclude=list(__import__("benchmarks.traces").traces.HEAVY_FAMILIES))


def test_live_mode_replays_a_trace_through_the_real_allocator(tmp_path):
    """In its own process: live mode starts (and stops) a local Ray of its own."""
    import os
    import subprocess
    import sys

    trace = tmp_path / "t.jsonl"
    write_trace(trace)
    out = tmp_path / "live.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # never the test session's Ray
    proc = subprocess.run([sys.executable, "-m", "benchmarks.placement", "--trace", str(trace), "--mode", "live",
                           "--speed", "4", "--json", str(out), "--truth", str(tmp_path / "truth")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    row = result["policies"]["qalloc"]
    assert result["mode"] == "live" and row["completed"] >= 1
    for key in METRICS:
        assert key in row


def test_measure_truth_takes_every_sample_and_two_threads_only_for_wide_circuits(tmp_path):
    from ray_qalloc.costmodel.measure import SweepCase

    from benchmarks.truth import automatic_spec, measure_truth, pool_specs, read_truth

    specs = pool_specs("cpu-local", 2, 4 * 2**30) + [automatic_spec("cpu-local", 2, 4 * 2**30)]
    cases = {c: SweepCase(c, "f", "qasm", n, 1024, QFT) for c, n in (("narrow", 4), ("wide", 20))}
    calls: list[tuple[str, int]] = []

    def measure(cs, backends, history, *, threads=1, **kw):
        calls.extend((c.case_id, threads) for c in cs)
        return fake_measure(cs, backends, history, threads=threads, **kw)

    report = measure_truth(cases, specs, tmp_path, time_cap_s=2.0, measure_fn=measure, progress=False, samples=2)
    assert sorted(calls) == sorted([("narrow", 1), ("wide", 1), ("wide", 2)] * 2)
    assert {(c["sample"], c["threads"]) for c in report.calls} == {(0, 1), (0, 2), (1, 1), (1, 2)}
    truth, _ = read_truth(tmp_path, set(cases), specs, 2.0)
    assert truth["wide"]["cpu-local/statevector@2"] < truth["wide"]["cpu-local/statevector"]
    assert (tmp_path / "measure-log.jsonl").exists()


def test_qpu_measure_none_profiles_without_running_and_per_job_names_every_choice(tmp_path):
    """``--qpu-measure none``: no circuit is run on an emulated QPU (its profile comes from the
    schedule and ESP, labelled not measured, in a cache of its own); ``--per-job`` lists where
    every policy sent every job and each job's true runtimes, which is what explains a loss."""
    from rich.console import Console

    trace = tmp_path / "trace.jsonl"
    write_trace(trace)

    def no_runs(*_a, **_k):
        raise AssertionError("no QPU run may be measured with qpu_measure='none'")

    asked = []

    def esp(backend, qasm):
        asked.append(backend)
        return {"backend": backend, "num_qubits": 3, "duration_s": 2e-6, "rep_delay_s": 250e-6, "overhead_s": 2.0,
                "esp": 0.7, "fidelity": 0.7, "fidelity_source": "esp_transpiled", "ideal": None, "noise_model": None}

    result = run(trace, model=None, truth_dir=tmp_path / "truth", time_cap_s=2.0, seed=0,
                 policies=("qalloc", "aer_automatic"), console=Console(quiet=True), measure_fn=fake_measure,
                 profile_fn=no_runs, qpu_measure="none", esp_fn=esp, per_job=True)
    assert asked and (tmp_path / "truth" / "qpu-esp.jsonl").exists()
    assert not (tmp_path / "truth" / "qpu.jsonl").exists()
    fid = result["measure"]["qpu"]
    assert fid["qpu_measure"] == "none" and fid["esp_only"] == len(asked)
    # every job's circuit is carried by a quantum or auto job here: 5 jobs x 5 QPUs, none measured
    assert result["modelling"]["fidelity_truth"]["job_qpu_pairs_by_fidelity_source"] == {"esp_transpiled": 25}
    for name in ("qalloc", "aer_automatic"):
        rows = result["policies"][name]["per_job"]
        assert sorted(r["id"] for r in rows) == ["a", "a#1", "b", "c", "d"]
        assert all(r["backend"] and r["completion_s"] >= r["arrival_s"] for r in rows)
    # the job's truth: every simulator candidate it could run on, and the QPUs' modelled time
    t = result["truth"]["d"]["runtime_s"]
    assert "cpu-local/statevector" in t and "cpu-local/automatic" in t
    assert "qpu_fez" in result["truth"]["c"]["runtime_s"]
    # a second run asks for nothing again (both caches are reused)
    asked.clear()
    run(trace, model=None, truth_dir=tmp_path / "truth", time_cap_s=2.0, seed=0, policies=("qalloc",),
        console=Console(quiet=True), measure_fn=fake_measure, profile_fn=no_runs, qpu_measure="none", esp_fn=esp)
    assert asked == []


def test_ratios_pair_the_jobs_both_policies_completed():
    """A policy that refuses a slow job must not look faster for it (nor one that runs a job the
    other refused look slower): a ratio is over the jobs both completed."""
    from benchmarks.report import ratios, strip_paired
    from benchmarks.simulation import PAIRED

    def row(jct: dict[str, float], fid: dict[str, float]) -> dict:
        return {"mean_jct_s": sum(jct.values()) / len(jct), "deadline_miss_rate": 0.0,
                "mean_fidelity_quantum": sum(fid.values()) / len(fid) if fid else None,
                PAIRED: {"jct": jct, "fidelity_quantum": fid}}

    pol = {"qalloc": row({"a": 1.0, "b": 10.0, "q": 2.0}, {"q": 0.9, "r": 0.5}),
           "aer_automatic": row({"a": 2.0, "q": 2.0}, {"q": 0.8}),
           "best_fidelity": row({"a": 2.0, "q": 4.0, "r": 8.0}, {"q": 0.95, "r": 0.6})}
    r = ratios(pol)
    assert r["qalloc_over_aer_automatic_mean_jct"] == 3.0 / 4.0       # a and q; b only qalloc ran
    assert r["qalloc_over_best_fidelity_mean_fidelity_quantum"] == (0.9 + 0.5) / (0.95 + 0.6)
    assert r["paired_jobs"]["aer_automatic:jct"] == 2
    strip_paired(pol)
    assert all(PAIRED not in v for v in pol.values())
