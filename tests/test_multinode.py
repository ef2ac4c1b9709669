"""Multi-node on one machine: a Ray head and worker nodes as separate raylet processes.

The scenario (``tests/multinode_scenario.py``) runs once per module in its own Python process,
because this pytest process may already run a local Ray (the ``qa`` fixture): it starts a
``ray.cluster_utils.Cluster`` on loopback (token authentication passed on to every node), runs
ray-qalloc on it in the pool design (one simulator pool per node that offers
``qalloc_pool_cpu``), kills nodes, adds new ones, and writes what it saw as JSON. The tests
below check that record.

    head   qalloc_backend_qpu_fez      (the QPU's actor; the allocator is pinned here; no pool)
    A, B   qalloc_pool_cpu: 1, 2 CPUs  (A killed under a run; B removed later)
    C, D   qalloc_pool_cpu: 1, 2 CPUs  (join later; C killed under a run on the last pool)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(360)

SCRIPT = Path(__file__).with_name("multinode_scenario.py")
SCENARIO_TIMEOUT_S = 240
QPU = "qpu_fez"
LOST = ("unreachable", "actor_died", "lost")   # how an attempt on a lost node ends


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("multinode") / "report.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QALLOC_") and k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                        "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parent.parent), env.get("PYTHONPATH")]))
    t0 = time.monotonic()
    # Its own session: on a timeout the whole group (the script, its raylets, GCS, workers) goes.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out)], env=env, cwd=SCRIPT.parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        log, _ = proc.communicate()
        log += f"\n[test] scenario killed after {SCENARIO_TIMEOUT_S} s"
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    report = json.loads(out.read_text()) if out.exists() else {"phases": {}, "error": "no report written"}
    report["returncode"] = proc.returncode
    report["log_tail"] = "\n".join(line for line in log.splitlines() if line.startswith("[")
                                   and "Warning" not in line)[-6000:]
    report["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"multinode scenario: {report['wall_s']} s, timings {report.get('timings')}")
    return report


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def phase(report: dict[str, Any], name: str) -> dict[str, Any]:
    """One phase's record, or a failure that shows why the scenario did not get there."""
    if name not in report["phases"]:
        pytest.fail(f"the scenario never reached phase {name!r}: {report.get('error')}\n"
                    f"{report.get('traceback', '')}\n{report['log_tail']}")
    return report["phases"][name]


def completed_once(job: dict[str, Any]) -> None:
    """Completed, with exactly one completed attempt and one 'complete' transition."""
    assert job["state"] == "completed", job
    outcomes = [a["outcome"] for a in job["attempts"]]
    assert outcomes.count("completed") == 1, job
    assert outcomes[-1] == "completed", job
    assert job["transitions"].count("complete") == 1, job


def test_scenario_ran_to_its_end(scenario):
    assert scenario.get("error") is None, f"{scenario.get('error')}\n{scenario.get('traceback', '')}"
    assert scenario["returncode"] == 0, scenario["log_tail"]


def test_nodes_declare_pools_and_qpus_and_token_auth_is_passed_on(scenario):
    c = scenario.get("cluster") or pytest.fail(f"no cluster: {scenario.get('error')}")
    nodes = c["nodes"]
    assert len(set(nodes.values())) == 3
    assert sorted(c["alive_nodes"]) == sorted(nodes.values())
    assert c["driver_node"] == nodes["head"]
    assert c["resources"][nodes["head"]] == {f"qalloc_backend_{QPU}": 1.0}
    assert c["resources"][nodes["A"]] == c["resources"][nodes["B"]] == {"qalloc_pool_cpu": 1.0}
    assert c["pools"] == {"A": f"cpu-{nodes['A'][:8]}", "B": f"cpu-{nodes['B'][:8]}"}
    # token authentication is on, in the driver and in the worker processes of every node
    assert c["driver_token_mode"] is True
    assert c["worker_token_mode"] == {n: True for n in nodes.values()}


def test_a_pool_per_node_and_a_job_pinned_to_a_pool_runs_on_its_node(scenario):
    nodes, pools = scenario["cluster"]["nodes"], scenario["cluster"]["pools"]
    p1 = phase(scenario, "placement")
    seen = p1["pools_seen"]
    assert set(seen) == {pools["A"], pools["B"]}     # no pool on the head: it does not offer one
    for key in ("A", "B"):
        assert seen[pools[key]]["node_id"] == nodes[key] and seen[pools[key]]["healthy"], seen
        assert seen[pools[key]]["members"] >= 4       # every method (and multi-thread variants)
    assert p1["qpu"] == {"healthy": True, "node_id": nodes["head"]}
    for key in ("A", "B"):
        job = p1["jobs"][f"pool_{key.lower()}"]
        completed_once(job)
        assert len(job["attempts"]) == 1 and job["attempts"][0]["backend"].startswith(pools[key] + "/")
        assert job["node_id"] == nodes[key], job
        # the run was a Ray task holding the CPUs of its threads
        assert job["threads"] >= 1 and job["resources"].get("CPU") == job["threads"], job
        assert job["shots"] == 200
    qpu = p1["jobs"]["qpu"]
    completed_once(qpu)
    assert qpu["result_backend"] == QPU and qpu["node_id"] == nodes["head"], qpu


def test_each_pool_reports_its_nodes_memory(scenario):
    nodes = scenario["cluster"]["nodes"]
    rows = {r["name"]: r for r in phase(scenario, "placement")["pool_rows"]}
    for key in ("A", "B"):
        row = rows[f"cpu-{nodes[key][:8]}"]
        assert row["node_id"] == nodes[key] and row["cores"] == 2.0, row
        assert row["memory_bytes"] > 64 * 1024 * 1024, row


def test_two_single_threaded_jobs_of_different_methods_share_a_pool_at_once(scenario):
    pools = scenario["cluster"]["pools"]
    p1 = phase(scenario, "placement")
    mps, sv = p1["node_a_pair"]["mps"], p1["node_a_pair"]["sv"]
    completed_once(mps)
    completed_once(sv)
    assert mps["backend"] == f"{pools['A']}/mps" and sv["backend"] == f"{pools['A']}/statevector"
    assert mps["resources"].get("CPU") == sv["resources"].get("CPU") == 1.0
    a, b = mps["attempts"][-1], sv["attempts"][-1]
    assert b["started_at"] < a["finished_at"] and a["started_at"] < b["finished_at"], (a, b)


def test_losing_a_node_re_places_its_jobs_and_completes_each_exactly_once(scenario):
    nodes, pools = scenario["cluster"]["nodes"], scenario["cluster"]["pools"]
    p2 = phase(scenario, "node_loss")
    assert p2["in_flight_on_a"], "no job was running on pool A when node A was killed"
    jobs = {j["id"]: j for j in p2["jobs"]}
    assert sorted(jobs) == sorted(p2["submitted"])          # none lost
    for job in jobs.values():
        completed_once(job)                                 # none twice
        assert p2["results"][job["id"]]["shots"] == 1_000_000
        if job["attempts"][-1]["finished_at"] > p2["removed_at"]:   # nothing ran on A after the crash
            assert job["node_id"] != nodes["A"], job
    # the attempts that were running on pool A died with it and their jobs were re-placed on
    # pool B (so may one dispatched to A in the moment before the allocator noticed the loss)
    failed_over = [j for j in jobs.values() if any(a["outcome"] != "completed" for a in j["attempts"])]
    assert failed_over, f"no attempt died with node A (in flight when killed: {p2['in_flight_on_a']})"
    assert {j["id"] for j in failed_over} & set(p2["in_flight_on_a"])
    for job in failed_over:
        first, last = job["attempts"][0], job["attempts"][-1]
        assert first["backend"].startswith(pools["A"] + "/") and first["outcome"] in LOST, job
        assert first["finished_at"] > p2["removed_at"], job
        assert [a["outcome"] for a in job["attempts"]][1:] == ["completed"], job
        assert last["backend"].startswith(pools["B"] + "/") and job["node_id"] == nodes["B"], job
        assert job["transitions"] == ["accept", "dispatch", "failover", "dispatch", "complete"], job
    for job_id, history in p2["in_flight_history"].items():   # the public status shows it too
        if job_id in {j["id"] for j in failed_over}:
            assert [a["outcome"] for a in history][-1] == "completed" and history[0]["outcome"] in LOST


def test_the_lost_pools_members_become_unhealthy_and_the_others_stay(scenario):
    pools = scenario["cluster"]["pools"]
    p2 = phase(scenario, "node_loss")
    assert "a_unhealthy_error" not in p2, p2.get("a_unhealthy_error")
    after = p2["backends_after"]
    a_members = [n for n in after if n.startswith(pools["A"] + "/")]
    b_members = [n for n in after if n.startswith(pools["B"] + "/")]
    assert a_members and b_members
    assert not any(after[n]["healthy"] for n in a_members), after
    assert all(after[n]["healthy"] for n in b_members) and after[QPU]["healthy"], after


def test_a_node_that_joins_is_discovered_and_queued_jobs_are_re_planned_onto_it(scenario):
    nodes = scenario["cluster"]["nodes"]
    p3 = phase(scenario, "node_joins")
    new, pool_c = p3["new_node"], p3["new_pool"]
    assert new not in nodes.values() and pool_c == f"cpu-{new[:8]}"
    assert "discovery_error" not in p3, p3.get("discovery_error")
    assert p3["pools_seen"][pool_c]["node_id"] == new and p3["pools_seen"][pool_c]["healthy"]
    assert {r["name"]: r for r in p3["pool_rows"]}[pool_c]["memory_bytes"] > 0
    # the jobs were queued (the queue held) before C existed, and some ran on C afterwards
    assert set(p3["queued_states"]) == {"queued"}, p3["queued_states"]
    assert "queued_error" not in p3, p3.get("queued_error")
    for job in p3["queued_final"]:
        completed_once(job)
        assert len(job["attempts"]) == 1, job
    on_c = [j for j in p3["queued_final"] if j["node_id"] == new]
    assert on_c, [(j["backend"], j["node_id"]) for j in p3["queued_final"]]
    assert all(j["backend"].startswith(pool_c + "/") for j in on_c)
    # and a new job allowed only on the new pool runs there
    assert p3.get("new_result", {}).get("node_id") == new, p3.get("new_error")
    assert p3["new_result"]["backend"].startswith(pool_c + "/")
    completed_once(p3["new_job"])


def test_a_job_running_on_the_last_pool_waits_queued_and_completes_when_a_node_comes_back(scenario):
    p4 = phase(scenario, "last_pool_lost")
    assert "requeue_error" not in p4, p4.get("requeue_error")
    gone = p4["while_gone"]
    # with no pool left the job waits: queued, not failed; its attempt on C ended as lost
    assert gone["state"] == "queued", gone
    assert len(gone["attempts"]) == 1 and gone["attempts"][0]["outcome"] in LOST, gone
    assert not any(p["healthy"] for p in p4["pools_while_gone"].values()), p4["pools_while_gone"]
    # a node came back: the job completed there, exactly once
    final = p4["final"]
    completed_once(final)
    assert p4.get("result", {}).get("node_id") == p4["new_node"], p4.get("error")
    assert p4["result"]["backend"] == f"{p4['new_pool']}/mps"
    assert [a["outcome"] for a in final["attempts"]][1:] == ["completed"], final
    assert final["transitions"].count("complete") == 1
    assert p4["store_counts"].get("failed", 0) == 0, p4["store_counts"]
