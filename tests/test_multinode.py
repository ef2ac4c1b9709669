"""Multi-node on one machine: a Ray head and worker nodes as separate raylet processes.

The scenario (``tests/multinode_scenario.py``) runs once per module in its own Python process,
because this pytest process may already run a local Ray (the ``qa`` fixture): it starts a
``ray.cluster_utils.Cluster`` on loopback (token authentication passed on to every node),
each node declaring its own ``qalloc_backend_<name>`` resources, runs ray-qalloc on it, kills
a node, adds it back, and writes what it saw as JSON. The tests below check that record.

    head   qalloc_backend_aer_stabilizer                          (allocator pinned here)
    A      qalloc_backend_aer_statevector, qalloc_backend_aer_mps  (killed, then added back)
    B      qalloc_backend_aer_statevector, qalloc_backend_aer_density_matrix
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

pytestmark = pytest.mark.timeout(400)

SCRIPT = Path(__file__).with_name("multinode_scenario.py")
SCENARIO_TIMEOUT_S = 240
SV, MPS, DM, STAB = "aer_statevector", "aer_mps", "aer_density_matrix", "aer_stabilizer"


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


def test_every_node_declares_its_own_resources_and_token_auth_is_passed_on(scenario):
    c = scenario.get("cluster") or pytest.fail(f"no cluster: {scenario.get('error')}")
    nodes = c["nodes"]
    assert len(set(nodes.values())) == 3
    assert sorted(c["alive_nodes"]) == sorted(nodes.values())
    assert c["driver_node"] == nodes["head"]
    assert c["resources"][nodes["head"]] == {f"qalloc_backend_{STAB}": 1.0}
    assert c["resources"][nodes["A"]] == {f"qalloc_backend_{SV}": 1.0, f"qalloc_backend_{MPS}": 1.0}
    assert c["resources"][nodes["B"]] == {f"qalloc_backend_{SV}": 1.0, f"qalloc_backend_{DM}": 1.0}
    # token authentication is on, in the driver and in the worker processes of every node
    assert c["driver_token_mode"] is True
    assert c["worker_token_mode"] == {n: True for n in nodes.values()}


def test_each_backend_runs_on_the_node_that_holds_its_resource(scenario):
    p1 = phase(scenario, "placement")
    expected = p1["expected_node"]
    for name, node in expected.items():
        assert p1["backends"][name] == {"healthy": True, "node_id": node}, name
        job = p1["jobs"][name]
        completed_once(job)
        assert len(job["attempts"]) == 1 and job["attempts"][0]["backend"] == name
        assert job["result_backend"] == name and job["node_id"] == node, name
        assert job["resources"].get(f"qalloc_backend_{name}", 0) >= 1, job["resources"]
        assert job["shots"] == 200


def test_losing_a_node_re_places_its_jobs_and_completes_each_exactly_once(scenario):
    nodes = scenario["cluster"]["nodes"]
    p2 = phase(scenario, "node_loss")
    assert p2["in_flight_on_a"], "no job was running on node A when it was killed"
    jobs = {j["id"]: j for j in p2["jobs"]}
    assert sorted(jobs) == sorted(p2["submitted"])          # none lost
    for job in jobs.values():
        completed_once(job)                                 # none twice
        assert p2["results"][job["id"]]["shots"] == 1_000_000
        done = job["attempts"][-1]
        if done["finished_at"] > p2["removed_at"]:          # nothing ran on A after the crash
            assert job["node_id"] != nodes["A"], job
    # the attempt that was running on A's statevector died with it and the job was re-placed
    failed_over = [j for j in jobs.values() if any(a["outcome"] != "completed" for a in j["attempts"])]
    assert failed_over, f"no attempt died with node A (in flight when killed: {p2['in_flight_on_a']})"
    assert {j["id"] for j in failed_over} <= set(p2["in_flight_on_a"]) | set(jobs)
    for job in failed_over:
        first, last = job["attempts"][0], job["attempts"][-1]
        assert (first["backend"], first["outcome"]) == (SV, "actor_died"), job
        assert first["started_at"] < p2["removed_at"] < first["finished_at"], job
        assert last["backend"] != SV and job["node_id"] == nodes["B"], job   # elsewhere, on B
        assert job["transitions"] == ["accept", "dispatch", "failover", "dispatch", "complete"]
    for job_id, history in p2["in_flight_history"].items():   # the public status shows it too
        if job_id in {j["id"] for j in failed_over}:
            assert [a["outcome"] for a in history] == ["actor_died", "completed"]


def test_ray_restarts_the_lost_statevector_on_the_other_node_and_the_allocator_uses_it(scenario):
    nodes = scenario["cluster"]["nodes"]
    p2 = phase(scenario, "node_loss")
    assert "sv_error" not in p2, p2.get("sv_error")
    gone = p2["backends_while_a_gone"]
    assert gone[SV] == {"healthy": True, "node_id": nodes["B"]}
    assert p2["sv_after"] == {"backend": SV, "node_id": nodes["B"]}
    # aer_mps lived only on A: unhealthy while A is gone, and a job allowed only there waits
    assert gone[MPS]["healthy"] is False
    assert gone[STAB]["healthy"] and gone[DM]["healthy"]
    waiting = p2["waiting_while_a_gone"]
    assert waiting["state"] == "queued" and waiting["attempts"] == [], waiting


def test_a_node_that_comes_back_is_used_again(scenario):
    nodes = scenario["cluster"]["nodes"]
    p3 = phase(scenario, "node_back")
    new = p3["new_node"]
    assert new not in nodes.values()
    assert "mps_health_error" not in p3, p3.get("mps_health_error")
    # Ray restarted aer_mps on the new node; the allocator pinged it there and marks it healthy
    assert p3["backends"][MPS] == {"healthy": True, "node_id": new}
    assert p3["actor_pings"][MPS]["node_id"] == new
    # the statevector stays where Ray restarted it (B); nothing else moved
    assert p3["backends"][SV]["node_id"] == nodes["B"]
    assert p3["backends"][STAB]["node_id"] == nodes["head"] and p3["backends"][DM]["node_id"] == nodes["B"]
    # the job that waited while A was gone, and a new one, ran there
    assert p3.get("waiting_result") == {"backend": MPS, "node_id": new}, p3.get("waiting_error")
    completed_once(p3["waiting_job"])
    assert len(p3["waiting_job"]["attempts"]) == 1
    assert p3.get("new_result") == {"backend": MPS, "node_id": new}, p3.get("new_error")
    completed_once(p3["new_job"])


def test_a_job_running_on_a_lost_node_is_never_completed_twice(scenario):
    """Phase 4's job (allowed only on aer_mps) was running when its node died."""
    p4 = phase(scenario, "pinned_loss")
    final = p4["final"]
    assert final["attempts"][0]["backend"] == MPS
    assert final["attempts"][0]["outcome"] == "actor_died", final
    assert [a["outcome"] for a in final["attempts"]].count("completed") <= 1
    assert final["transitions"].count("complete") <= 1
    assert "mps_health_error" not in p4, p4.get("mps_health_error")


def test_a_job_allowed_only_on_the_lost_nodes_backend_waits_for_it(scenario):
    p4 = phase(scenario, "pinned_loss")
    final = p4["final"]
    assert final["state"] == "completed", p4.get("error")
    assert p4["result"] == {"backend": MPS, "node_id": p4["new_node"]}
    assert [a["outcome"] for a in final["attempts"]] == ["actor_died", "completed"]
    assert final["transitions"].count("complete") == 1


def test_a_node_with_two_cpus_runs_two_single_threaded_simulator_jobs_at_once(scenario):
    p1 = phase(scenario, "placement")
    mps = p1["node_a_pair"]["mps"]["attempts"][-1]
    sv = p1["node_a_pair"]["sv"]["attempts"][-1]
    assert mps["outcome"] == sv["outcome"] == "completed"
    assert sv["started_at"] < mps["finished_at"] and mps["started_at"] < sv["finished_at"], (mps, sv)
