"""Multi-node scenario on one machine: a Ray head and worker nodes as separate raylets.

Run by ``tests/test_multinode.py`` in its own Python process (the pytest process may already
run a local Ray for the ``qa`` fixture), or by hand::

    .venv/bin/python tests/multinode_scenario.py /tmp/out.json

It writes what it saw as JSON to the given path after every phase (so a crash still leaves
the phases before it), and exits 0 when the scenario ran to its end (the checks themselves
are the test's; this script only records).

The cluster (``ray.cluster_utils.Cluster``: real GCS and raylet processes on loopback,
token authentication on, as Ray 2.60 does for local clusters), in the pool design (one
simulator pool per node that offers ``qalloc_pool_cpu``, one actor per QPU):

* head    1 CPU, ``qalloc_backend_qpu_fez``: the cluster *declares* its qalloc resources, so
          pools run only where ``qalloc_pool_cpu`` is; the allocator is pinned here; no pool
* node A  2 CPUs, ``qalloc_pool_cpu: 1``   (killed in phase 2)
* node B  2 CPUs, ``qalloc_pool_cpu: 1``   (removed in phase 4)
* node C, D: joined later, the same as A and B

``settings.pool``: the four default Aer methods and ``qpu_fez``. Hedging is off: the attempt
histories checked here must be those of failover alone (hedging has its own live test).

Phases:

1. placement: a pool on each of A and B (named ``cpu-<first 8 hex of the node id>``); a job
   allowed only on pool A's name runs on node A and holds the Ray CPUs of its threads; two
   1-thread jobs of different methods on pool A run side by side (one pool, one core
   budget: a free core is free for any method); each pool reports its node's memory.
2. node loss: ~1 s jobs allowed on pools A and B; node A is SIGKILLed while one runs on pool
   A. Every job completes exactly once; the lost one is re-placed on pool B; pool A's
   members become unhealthy.
3. node joins: with the queue held (``drain``), jobs are queued, then node C joins; the
   allocator's health tick discovers it and starts a pool there; once its members are
   healthy the queue resumes: jobs queued before C existed (re-planned when its members
   appeared) and a job allowed only on pool C run on C.
4. last pool lost: B is removed; a job allowed only on MPS runs on pool C when C is killed
   too: with no pool left it waits, queued (not failed); node D joins and it completes there.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

METHODS = ["statevector", "mps", "stabilizer", "density_matrix"]
QPU = "qpu_fez"
POOL = METHODS + [QPU]

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[multinode {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def wait_for(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def circuits():
    import numpy as np
    from qiskit import QuantumCircuit

    def ghz(n: int) -> QuantumCircuit:
        qc = QuantumCircuit(n, n)
        qc.h(0)
        for i in range(n - 1):
            qc.cx(i, i + 1)
        qc.measure(range(n), range(n))
        return qc

    def brick(n: int, layers: int, seed: int) -> QuantumCircuit:
        rng = np.random.default_rng(seed)
        qc = QuantumCircuit(n, n)
        for layer in range(layers):
            for q in range(n):
                qc.ry(float(rng.uniform(0.1, 3.0)), q)
            for q in range(layer % 2, n - 1, 2):
                qc.cx(q, q + 1)
        qc.measure(range(n), range(n))
        return qc

    return ghz, brick


def main(out_path: Path) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="qr", dir="/tmp"))  # Ray's unix sockets need a short path
    # Token authentication, passed on to every node: each raylet, GCS and worker process this
    # script starts inherits these (a fresh token, so nothing depends on ~/.ray).
    token_path = tmp / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.pop("RAY_ADDRESS", None)
    # Ray's "current cluster" address file goes here, not to /tmp/ray, so that no other
    # ray.init() on this machine attaches to this cluster by accident.
    os.environ["RAY_TMPDIR"] = str(tmp)
    (tmp / "ray").mkdir()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for key in [k for k in os.environ if k.startswith("QALLOC_")]:
        del os.environ[key]

    report: dict[str, Any] = {"phases": {}, "timings": {}}

    def save() -> None:
        report["timings"]["total_s"] = round(time.monotonic() - T0, 2)
        out_path.write_text(json.dumps(report, indent=1, default=str))

    try:
        _run(tmp, report, save)
    except BaseException as exc:  # recorded for the test; cleanup below either way
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        say("FAILED: " + report["error"])
    finally:
        save()
        _cleanup(tmp)
        save()
    return 0 if "error" not in report else 1


_CLUSTER: list[Any] = []


def _cleanup(tmp: Path) -> None:
    import ray

    t = time.monotonic()
    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001
        say(f"ray.shutdown: {exc}")
    for cluster in _CLUSTER:
        try:
            cluster.shutdown()
        except Exception as exc:  # noqa: BLE001
            say(f"cluster.shutdown: {exc}")
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"cleaned up in {time.monotonic() - t:.1f} s")


def _run(tmp: Path, report: dict[str, Any], save: Callable[[], None]) -> None:
    import logging

    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_qalloc import connect
    from ray_qalloc.allocator import RemoteAllocator, allocator_options
    from ray_qalloc.backends.pools import POOL_RESOURCE_CPU, pool_name
    from ray_qalloc.config import load_settings
    from ray_qalloc.resources import node_resources
    from ray_qalloc.store import JobStore

    ghz, brick = circuits()
    timings = report["timings"]
    settings = load_settings(data_dir=tmp / "data", pool=POOL, health_interval_s=0.5, health_timeout_s=2.0,
                             history_flush_s=1.0, hedge={"enabled": False, "probe_idle": False},
                             # every "node" shares this machine's cores: the others' runs would count
                             # as foreign load on each pool's node
                             placement={"foreign_cpu": False})
    res = node_resources(settings)            # {"qalloc_pool_cpu": 1, "qalloc_backend_qpu_fez": 1}
    head_res = {k: v for k, v in res.items() if k != POOL_RESOURCE_CPU}
    pool_res = {POOL_RESOURCE_CPU: res[POOL_RESOURCE_CPU]}

    # ---- cluster ---------------------------------------------------------------------------
    t = time.monotonic()
    node_args = {"temp_dir": str(tmp), "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node_args, "num_cpus": 1, "resources": head_res, "include_dashboard": False,
        # a node that dies without a word is noticed in ~1.5 s, not 15 s
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    _CLUSTER.append(cluster)
    node_a = cluster.add_node(**node_args, num_cpus=2, resources=pool_res)
    node_b = cluster.add_node(**node_args, num_cpus=2, resources=pool_res)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=settings.namespace, logging_level=logging.WARNING,
             log_to_driver=False)
    head_id, a_id, b_id = cluster.head_node.node_id, node_a.node_id, node_b.node_id
    pool_a, pool_b = pool_name(a_id), pool_name(b_id)
    timings["cluster_start_s"] = round(time.monotonic() - t, 2)
    say(f"cluster up: head {head_id[:8]} A {a_id[:8]} B {b_id[:8]}")

    @ray.remote(num_cpus=0)
    def where() -> dict[str, Any]:
        import ray as r

        return {"node_id": r.get_runtime_context().get_node_id(),
                "token_mode": get_authentication_mode() == AuthenticationMode.TOKEN}

    remote_checks = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                             .remote() for n in (head_id, a_id, b_id)], timeout=60)
    report["cluster"] = {
        "nodes": {"head": head_id, "A": a_id, "B": b_id},
        "pools": {"A": pool_a, "B": pool_b},
        "driver_node": ray.get_runtime_context().get_node_id(),
        "driver_token_mode": get_authentication_mode() == AuthenticationMode.TOKEN,
        "worker_token_mode": {c["node_id"]: c["token_mode"] for c in remote_checks},
        "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "resources": {n["NodeID"]: {k: v for k, v in n["Resources"].items() if k.startswith("qalloc_")}
                      for n in ray.nodes() if n["Alive"]},
    }
    save()

    # ---- the allocator and its fleet ----------------------------------------------------------
    t = time.monotonic()
    # The allocator lives on the head (which is never removed here): this test is about
    # executors and their nodes; losing the allocator is test_integration's subject.
    RemoteAllocator.options(**allocator_options(settings),
                            scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote(settings)
    qa = connect(settings=settings)   # finds the allocator by name, waits until its pools answered
    timings["fleet_start_s"] = round(time.monotonic() - t, 2)
    store = JobStore(settings.resolved_store_url)

    def rows() -> list[dict[str, Any]]:
        return qa.backends()

    def pools_seen() -> dict[str, dict[str, Any]]:
        """Per pool: its node, whether every member is healthy, and how many members it has."""
        out: dict[str, dict[str, Any]] = {}
        for b in rows():
            if b["pool"] is None:
                continue
            p = out.setdefault(b["pool"], {"node_id": b["node_id"], "healthy": True, "members": 0,
                                           "memory_bytes": b["memory_bytes"]})
            p["healthy"] = p["healthy"] and b["healthy"]
            p["members"] += 1
        return out

    def pool_rows() -> list[dict[str, Any]]:
        return ray.get(qa.allocator.pools.remote(), timeout=30)

    def job_record(job_id: str) -> dict[str, Any]:
        rec = store.get(job_id)
        res_ = rec.result or {}
        meta = res_.get("metadata") or {}
        return {
            "id": job_id, "state": rec.state.value, "backend": rec.backend,
            "node_id": meta.get("node_id"), "threads": meta.get("threads"), "resources": meta.get("resources"),
            "attempts": [{"n": a["n"], "backend": a["backend"], "outcome": a["outcome"],
                          "started_at": a["started_at"], "finished_at": a["finished_at"], "error": a["error"]}
                         for a in store.attempts(job_id)],
            "transitions": [tr["name"] for tr in store.transitions(job_id)],
        }

    def on_pool(h: Any, pool: str) -> bool:
        s_ = h.status()
        return s_["state"] == "running" and (s_.get("backend") or "").startswith(pool + "/")

    # ---- phase 1: a pool per node --------------------------------------------------------------
    t = time.monotonic()
    wait_for("every member healthy", lambda: all(b["healthy"] for b in rows()), 60)
    p1: dict[str, Any] = {"pools_seen": pools_seen(), "pool_rows": pool_rows(), "jobs": {},
                          "qpu": next(({"healthy": b["healthy"], "node_id": b["node_id"]} for b in rows()
                                       if b["name"] == QPU), None)}
    report["phases"]["placement"] = p1
    handles = {"pool_a": qa.submit(ghz(6), shots=200, backends=[pool_a]),
               "pool_b": qa.submit(ghz(6), shots=200, backends=[pool_b]),
               "qpu": qa.submit(ghz(3), shots=200, backends=[QPU])}
    for key, h in handles.items():
        r = h.result(timeout=60)
        p1["jobs"][key] = {**job_record(h.id), "result_backend": r.backend, "shots": sum(r.counts.values())}
    # Two 1-thread runs of different methods on pool A (2 CPUs): side by side, because the
    # pool's two cores are free for any method. (~3 s of MPS, ~1 s of statevector sampling.)
    slow_mps = qa.submit(brick(8, 6, 9), shots=100_000, backends=[f"{pool_a}/mps"])
    fast_sv = qa.submit(brick(8, 6, 8), shots=1_000_000, backends=[f"{pool_a}/statevector"])
    slow_mps.result(timeout=60)
    fast_sv.result(timeout=60)
    p1["node_a_pair"] = {"mps": job_record(slow_mps.id), "sv": job_record(fast_sv.id)}
    timings["phase1_s"] = round(time.monotonic() - t, 2)
    save()
    say("phase 1 done")

    # ---- phase 2: lose node A while a job runs on its pool -----------------------------------------
    t = time.monotonic()
    p2: dict[str, Any] = {}
    report["phases"]["node_loss"] = p2
    loss_jobs = [qa.submit(brick(8, 6, 10 + i), shots=1_000_000, backends=[pool_a, pool_b]) for i in range(6)]
    p2["submitted"] = [h.id for h in loss_jobs]
    try:
        in_flight = wait_for("a job running on pool A",
                             lambda: [h.id for h in loss_jobs if on_pool(h, pool_a)], 60, every=0.05)
    except TimeoutError:
        p2["statuses"] = [job_record(h.id) for h in loss_jobs]
        raise
    removed_at = time.time()
    # A crash, not a drain: every process of node A is SIGKILLed at once.
    cluster.remove_node(node_a, allow_graceful=False)
    p2["remove_s"] = round(time.time() - removed_at, 2)
    p2["in_flight_on_a"] = in_flight
    p2["removed_at"] = removed_at
    say(f"node A killed ({p2['remove_s']} s) with {len(in_flight)} job(s) running on its pool")
    done = {}
    for h in loss_jobs:
        r = h.result(timeout=120)
        done[h.id] = {"backend": r.backend, "node_id": r.metadata.get("node_id"), "shots": sum(r.counts.values())}
    p2["results"] = done
    p2["jobs"] = [job_record(h.id) for h in loss_jobs]
    p2["all_done_after_s"] = round(time.time() - removed_at, 2)
    p2["in_flight_history"] = {i: loss_jobs[p2["submitted"].index(i)].status()["attempt_history"] for i in in_flight}
    try:
        wait_for("pool A's members unhealthy", lambda: not pools_seen()[pool_a]["healthy"], 30)
        p2["a_unhealthy_after_s"] = round(time.time() - removed_at, 2)
    except Exception as exc:  # noqa: BLE001 - recorded; the test asserts it
        p2["a_unhealthy_error"] = f"{type(exc).__name__}: {exc}"
    p2["backends_after"] = {b["name"]: {"healthy": b["healthy"], "node_id": b["node_id"]} for b in rows()}
    timings["phase2_s"] = round(time.monotonic() - t, 2)
    save()
    say(f"phase 2 done: all {len(loss_jobs)} jobs completed {p2['all_done_after_s']} s after the crash")

    # ---- phase 3: a node joins; the allocator finds it by itself ----------------------------------
    t = time.monotonic()
    p3: dict[str, Any] = {}
    report["phases"]["node_joins"] = p3
    # The queue is held (no new runs) so that the jobs below are queued, planned over A and B
    # only, when C joins: what they run on afterwards shows that they were re-planned.
    p3["drain"] = ray.get(qa.allocator.drain.remote(30.0), timeout=60)
    queued = [qa.submit(brick(8, 6, 30 + i), shots=1_000_000, intent="classical") for i in range(6)]
    p3["queued_jobs"] = [h.id for h in queued]
    p3["queued_states"] = [h.status()["state"] for h in queued]
    joined_at = time.monotonic()
    node_c = cluster.add_node(**node_args, num_cpus=2, resources=pool_res)
    c_id = node_c.node_id
    pool_c = pool_name(c_id)
    p3.update(new_node=c_id, new_pool=pool_c, add_node_s=round(time.monotonic() - joined_at, 2))
    say(f"node C {c_id[:8]} added")
    try:
        wait_for("pool C discovered", lambda: pool_c in pools_seen(), 60)
        p3["discovered_after_s"] = round(time.monotonic() - joined_at, 2)
        wait_for("pool C healthy", lambda: pools_seen()[pool_c]["healthy"], 60)
        p3["healthy_after_s"] = round(time.monotonic() - joined_at, 2)
    except Exception as exc:  # noqa: BLE001
        p3["discovery_error"] = f"{type(exc).__name__}: {exc}"
    p3["pools_seen"] = pools_seen()
    p3["pool_rows"] = pool_rows()
    ray.get(qa.allocator.resume.remote(), timeout=30)
    try:
        for h in queued:
            h.result(timeout=90)
    except Exception as exc:  # noqa: BLE001
        p3["queued_error"] = f"{type(exc).__name__}: {exc}"
    p3["queued_final"] = [job_record(h.id) for h in queued]
    try:
        h = qa.submit(ghz(8), shots=300, backends=[pool_c])
        r = h.result(timeout=60)
        p3["new_result"] = {"backend": r.backend, "node_id": r.metadata.get("node_id")}
        p3["new_job"] = job_record(h.id)
    except Exception as exc:  # noqa: BLE001
        p3["new_error"] = f"{type(exc).__name__}: {exc}"
    timings["phase3_s"] = round(time.monotonic() - t, 2)
    save()
    say("phase 3 done")

    # ---- phase 4: the last pool is lost while a job runs on it --------------------------------
    t = time.monotonic()
    p4: dict[str, Any] = {}
    report["phases"]["last_pool_lost"] = p4
    cluster.remove_node(node_b, allow_graceful=False)   # idle: only pool C is left
    try:
        wait_for("pool B unhealthy", lambda: not pools_seen()[pool_b]["healthy"], 30)
    except Exception as exc:  # noqa: BLE001
        p4["b_unhealthy_error"] = f"{type(exc).__name__}: {exc}"
    pinned = qa.submit(brick(8, 6, 9), shots=100_000, backends=["mps"])   # MPS on any pool, ~3 s
    p4["job"] = pinned.id
    wait_for("the MPS job running on pool C", lambda: on_pool(pinned, pool_c), 30, every=0.05)
    lost_at = time.time()
    cluster.remove_node(node_c, allow_graceful=False)
    p4["lost_at"] = lost_at
    say("node C killed with a job running on the last pool")
    try:
        wait_for("the job back in the queue", lambda: pinned.status()["state"] == "queued", 30)
        time.sleep(2.0)   # four health rounds: it must still be queued, not failed
    except Exception as exc:  # noqa: BLE001
        p4["requeue_error"] = f"{type(exc).__name__}: {exc}"
    p4["while_gone"] = job_record(pinned.id)
    p4["pools_while_gone"] = pools_seen()
    node_d = cluster.add_node(**node_args, num_cpus=2, resources=pool_res)
    back_at = time.monotonic()
    p4.update(new_node=node_d.node_id, new_pool=pool_name(node_d.node_id))
    try:
        r = pinned.result(timeout=90)
        p4["result"] = {"backend": r.backend, "node_id": r.metadata.get("node_id")}
        p4["completed_after_node_s"] = round(time.monotonic() - back_at, 2)
    except Exception as exc:  # noqa: BLE001
        p4["error"] = f"{type(exc).__name__}: {exc}"
    p4["final"] = job_record(pinned.id)
    p4["store_counts"] = store.counts_by_state()
    timings["phase4_s"] = round(time.monotonic() - t, 2)
    save()
    say("phase 4 done")


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("multinode.json")))
