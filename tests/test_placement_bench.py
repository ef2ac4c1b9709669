"""The placement benchmark's simulation core, on hand-made truth (no Aer, no measure worker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.baselines import POLICIES
from benchmarks.placement import (METRICS, SimJob, case_id_of, goals, intake, measured_truth, percentile,
                                  ratios, run, simulate)
from ray_qalloc.backends.base import BackendSpec, Price
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.placement.model import Estimate, JobView, Plan

SIM_PRICE = Price(per_second=0.0001)
QPU_PRICE = Price(per_second=1.6)


def sim(name: str) -> BackendSpec:
    return BackendSpec(name, "simulator", "aer", 30, slots=1, method="statevector", threads=1, price=SIM_PRICE)


def qpu(name: str) -> BackendSpec:
    return BackendSpec(name, "qpu", "fake_qpu", 127, slots=1, device=name, noisy=True, threads=0, price=QPU_PRICE)


POOL = [sim("aer_a"), sim("aer_b"), qpu("qpu_q")]


def view(i: str, priority: str = "normal", deadline_s: float | None = None, intent: str = "auto") -> JobView:
    return JobView(i, 4, frozenset({"h", "cx", "measure"}), {}, 100, intent=intent, priority=priority,
                   deadline_s=deadline_s)


def plan_of(jid: str, predicted: dict[str, float], fidelity: dict[str, float] | None = None) -> Plan:
    fid = fidelity or {}
    return Plan(jid, {b: Estimate(b, t, fid.get(b, 1.0), 0.0) for b, t in predicted.items()})


def small_trace():
    """8 jobs on 2 simulators + 1 QPU; predictions wrong on purpose (aer_b looks fast, is slow)."""
    jobs, truth, plans, fid = [], {}, {}, {}
    spec = [  # id, arrival, priority, intent, deadline, true {a, b, auto}, quantum true qpu time
        ("j0", 0.0, "normal", "auto", None, (2.0, 8.0, 3.0)),
        ("j1", 0.5, "batch", "auto", None, (4.0, 12.0, 5.0)),
        ("j2", 1.0, "high", "auto", 20.0, (1.0, 6.0, 1.5)),
        ("j3", 1.5, "normal", "quantum", None, None),
        ("j4", 2.0, "emergency", "auto", 10.0, (0.5, 3.0, 1.0)),
        ("j5", 6.0, "normal", "classical", None, (3.0, 9.0, 4.0)),
        ("j6", 9.0, "batch", "auto", None, (2.0, 10.0, 2.5)),
        ("j7", 12.0, "normal", "quantum", 30.0, None),
    ]
    for jid, arrival, prio, intent, deadline, t in spec:
        jobs.append(SimJob(jid, arrival, view(jid, prio, deadline, intent)))
        if t is None:   # quantum intent: the QPU only
            truth[jid] = {"qpu_q": 5.0}
            plans[jid] = plan_of(jid, {"qpu_q": 4.0}, {"qpu_q": 0.9})
            fid[jid] = {"qpu_q": 0.85}
            continue
        a, b, auto = t
        truth[jid] = {"aer_a": a, "aer_b": b, "aer_automatic": auto, "qpu_q": 30.0}
        predicted = {"aer_a": 2 * a, "aer_b": b / 4, "aer_automatic": auto}
        fidelity = {}
        if intent == "auto":
            predicted["qpu_q"] = 25.0
            fidelity["qpu_q"] = 0.9
        plans[jid] = plan_of(jid, predicted, fidelity)
        fid[jid] = {"qpu_q": 0.85}
    return jobs, truth, plans, fid


def run_all(jobs, truth, plans, fid, **kw):
    return {p: simulate(jobs, truth, plans, POOL, p, fidelity=fid, penalty_s=60.0, **kw) for p in POLICIES}


def test_oracle_has_the_lowest_mean_jct():
    jobs, truth, plans, fid = small_trace()
    res = run_all(jobs, truth, plans, fid)
    for name, m in res.items():
        assert m["completed"] == len(jobs), (name, m)
    oracle = res["oracle"]["mean_jct_s"]
    for name, m in res.items():
        assert oracle <= m["mean_jct_s"] + 1e-9, (name, m["mean_jct_s"], oracle)
    # the oracle knows aer_a is the fast simulator; qalloc's predictions say aer_b
    assert res["oracle"]["mean_jct_s"] < res["qalloc"]["mean_jct_s"]


def test_fcfs_ignores_priority_while_qalloc_serves_emergency_first():
    pool = [sim("aer_a")]
    jobs = [SimJob("long", 0.0, view("long")), SimJob("norm", 1.0, view("norm")),
            SimJob("emer", 2.0, view("emer", "emergency"))]
    truth = {j.id: {"aer_a": 10.0 if j.id == "long" else 1.0} for j in jobs}
    plans = {j.id: plan_of(j.id, {"aer_a": truth[j.id]["aer_a"]}) for j in jobs}
    starts = {}
    for policy in ("qalloc", "fcfs"):
        rec: list[dict] = []
        m = simulate(jobs, truth, plans, pool, policy, record=rec)
        assert m["completed"] == 3 and m["preemptions"] == 0   # "long" is normal: never a victim
        starts[policy] = {r["id"]: r["start_s"] for r in rec}
    assert starts["qalloc"]["emer"] == 10.0 and starts["qalloc"]["norm"] == 11.0
    assert starts["fcfs"]["norm"] == 10.0 and starts["fcfs"]["emer"] == 11.0
    assert simulate(jobs, truth, plans, pool, "qalloc")["emergency_p99_wait_s"] == pytest.approx(8.0)
    assert simulate(jobs, truth, plans, pool, "fcfs")["emergency_p99_wait_s"] == pytest.approx(9.0)


def test_preempted_batch_job_still_completes():
    pool = [sim("aer_a")]
    jobs = [SimJob("batch", 0.0, view("batch", "batch")), SimJob("emer", 1.0, view("emer", "emergency"))]
    truth = {"batch": {"aer_a": 100.0}, "emer": {"aer_a": 1.0}}
    plans = {j.id: plan_of(j.id, truth[j.id]) for j in jobs}
    rec: list[dict] = []
    m = simulate(jobs, truth, plans, pool, "qalloc", record=rec)
    by = {r["id"]: r for r in rec}
    assert m["preemptions"] == 1 and m["completed"] == 2 and m["unplaceable"] == 0
    assert by["emer"]["start_s"] == 1.0 and by["emer"]["completion_s"] == 2.0
    assert by["batch"]["runs"] == 2 and by["batch"]["completion_s"] == pytest.approx(102.0)  # work lost, redone
    assert m["lost_work_s"] == pytest.approx(1.0)
    assert m["total_cost"] == pytest.approx(SIM_PRICE.cost(1.0, 100) * 2 + SIM_PRICE.cost(100.0, 100))


def test_deadline_misses_are_counted():
    pool = [sim("aer_a"), sim("aer_b")]
    jobs = [SimJob("late", 0.0, view("late", deadline_s=5.0)), SimJob("ok", 0.0, view("ok", deadline_s=100.0)),
            SimJob("none", 0.0, view("none"))]
    truth = {"late": {"aer_a": 10.0, "aer_b": 10.0}, "ok": {"aer_a": 1.0, "aer_b": 1.0},
             "none": {"aer_a": 1.0, "aer_b": 1.0}}
    plans = {j.id: plan_of(j.id, {"aer_a": 1.0, "aer_b": 1.0}) for j in jobs}
    for policy in POLICIES:
        m = simulate(jobs, truth, plans, pool, policy)
        assert m["deadline_jobs"] == 2 and m["deadline_misses"] >= 1, (policy, m)
    m = simulate(jobs, truth, plans, pool, "oracle")
    assert m["deadline_misses"] == 1 and m["deadline_miss_rate"] == 0.5


def test_unmeasured_backend_is_charged_the_penalty_and_no_plan_is_unplaceable():
    pool = [sim("aer_a")]
    jobs = [SimJob("x", 0.0, view("x")), SimJob("y", 0.0, view("y"))]
    plans = {"x": plan_of("x", {"aer_a": 1.0})}
    m = simulate(jobs, {"x": {}}, plans, pool, "qalloc", penalty_s=42.0)
    assert m["completed"] == 1 and m["unplaceable"] == 1 and m["mean_jct_s"] == 42.0


def test_every_policy_reports_every_metric_and_ratios():
    jobs, truth, plans, fid = small_trace()
    res = run_all(jobs, truth, plans, fid)
    for name in POLICIES:
        for key in METRICS:
            assert key in res[name], (name, key)
    r = ratios(res)
    assert set(r) == {"qalloc_over_fcfs_mean_jct", "qalloc_over_least_loaded_mean_jct",
                      "qalloc_over_oracle_mean_jct", "qalloc_over_best_fidelity_mean_fidelity_quantum",
                      "qalloc_minus_oracle_deadline_miss_rate"}
    assert all(v is not None for v in r.values())
    assert [g["name"] for g in goals(r)] == list(r)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 95) is None


def test_aer_automatic_runs_every_simulator_job_on_the_automatic_pool():
    jobs, truth, plans, fid = small_trace()
    rec: list[dict] = []
    simulate(jobs, truth, plans, POOL, "aer_automatic", fidelity=fid, record=rec)
    for r in rec:
        assert r["backend"] == ("qpu_q" if r["intent"] == "quantum" else "aer_automatic"), r


GHZ = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nh q[0];\ncx q[0],q[1];\ncx q[1],q[2];\nmeasure q -> c;\n'
QFT = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nh q[0];\ncp(pi/2) q[1],q[0];\nh q[1];\n'
       'cp(pi/4) q[2],q[0];\ncp(pi/2) q[2],q[1];\nh q[2];\nmeasure q -> c;\n')


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


def fake_measure(cases, backends, history, *, time_cap_s, predicted_factor, source, **_):
    """Inject truth: one history row per (case, backend), as the measure module would write."""
    rows = []
    for i, c in enumerate(cases):
        for b in backends:
            if b == "aer_stabilizer" and "cp" in c.source:
                continue                    # filtered: not Clifford, no row
            row = {"job_id": c.case_id, "case_id": c.case_id, "backend": b, "family": c.family, "shots": c.shots,
                   "cap_s": time_cap_s, "attempt_id": i * 100 + len(rows)}
            if b == "aer_density_matrix":
                row.update(outcome="censored_time", wall_s=time_cap_s)
            elif b.startswith("qpu_"):
                row.update(outcome="completed", wall_s=0.5, qpu_s=2.5)
            else:
                row.update(outcome="completed", wall_s=0.01 * (1 + len(b)))
            rows.append(row)
    history.append(rows, source=source)
    return type("Report", (), {"attempted": len(rows), "censored": 0, "skipped_existing": 0, "wall_s": 0.0,
                               "by_outcome": {}})()


def test_hand_written_trace_end_to_end_with_injected_truth(tmp_path):
    from rich.console import Console

    from benchmarks.traces import read_trace

    trace = tmp_path / "trace.jsonl"
    write_trace(trace)
    work = intake(read_trace(trace))
    assert sorted(j.id for j in work.jobs) == ["a", "a#1", "b", "c", "d"]
    assert sorted(r["id"] for r in work.rejected) == ["bad", "bad2"]
    assert len(work.cases) == 2 and work.case_of["a"] == work.case_of["a#1"] == case_id_of(GHZ, 1024)

    result = run(trace, model=None, history=tmp_path / "hist", time_cap_s=2.0, seed=0, policies=POLICIES,
                 console=Console(quiet=True), measure_fn=fake_measure)
    assert result["jobs"] == 5 and result["rejected"] == 2
    for name in POLICIES:
        m = result["policies"][name]
        assert all(k in m for k in METRICS), name
        assert m["completed"] == 5, (name, m)
    assert set(result["ratios"]) == {g["name"] for g in result["goals"]}
    # censored density-matrix runs are charged 3x the cap in truth
    truth = measured_truth(RunHistory(tmp_path / "hist").read(), {case_id_of(GHZ, 1024)},
                           ["aer_density_matrix", "qpu_fez"], 2.0)
    assert truth[case_id_of(GHZ, 1024)] == {"aer_density_matrix": 6.0, "qpu_fez": 2.5}
    json.dumps(result, default=str)


def test_live_mode_replays_a_trace_through_the_real_allocator(tmp_path):
    """In its own process: live mode starts (and stops) a local Ray of its own."""
    import json
    import subprocess
    import sys

    trace = tmp_path / "t.jsonl"
    write_trace(trace)
    out = tmp_path / "live.json"
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # never the test session's Ray
    proc = subprocess.run([sys.executable, "-m", "benchmarks.placement", "--trace", str(trace), "--mode", "live",
                           "--speed", "4", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    row = result["policies"]["qalloc"]
    assert result["mode"] == "live" and row["completed"] >= 1
    for key in ("mean_jct_s", "p95_jct_s", "makespan_s", "deadline_miss_rate", "emergency_p99_wait_s",
                "mean_fidelity_quantum", "total_cost"):
        assert key in row
