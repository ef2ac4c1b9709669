"""Multi-node scenario on one machine: a Ray head and two worker nodes as separate raylets.

Run by ``tests/test_multinode.py`` in its own Python process (the pytest process may already
run a local Ray for the ``qa`` fixture), or by hand::

    .venv/bin/python tests/multinode_scenario.py /tmp/out.json

It writes what it saw as JSON to the given path after every phase (so a crash still leaves
the phases before it), and exits 0 when the scenario ran to its end (the checks themselves
are the test's; this script only records).

The cluster (``ray.cluster_utils.Cluster``: real GCS and raylet processes on loopback,
token authentication on, as Ray 2.60 does for local clusters):

* head    1 CPU, ``qalloc_backend_aer_stabilizer``         (the allocator is pinned here)
* node A  2 CPUs, ``qalloc_backend_aer_statevector``, ``qalloc_backend_aer_mps``
* node B  2 CPUs, ``qalloc_backend_aer_statevector``, ``qalloc_backend_aer_density_matrix``

B also offers the statevector resource, so Ray has somewhere to restart that backend when A
goes; ``aer_mps`` exists only on A, so its actor waits (restarting) until a node with A's
resources comes back. While the pool starts, a placeholder actor holds B's statevector slot,
so the statevector backend starts on A every time (Ray would otherwise pick A or B).

Phases:

1. placement: every backend runs on the node that holds its resource; a job allowed only on
   one backend completes there (its result names that node). Also recorded: whether a ~3 s
   aer_mps job and a ~1 s aer_statevector job, both on 2-CPU node A, run side by side.
2. node loss: jobs that run ~1 s each on statevector or density matrix are submitted, and
   node A is killed (SIGKILL, all its processes) while one runs on A's statevector; every
   job must complete exactly once, the one that died re-placed elsewhere (attempt history:
   actor_died, then completed). Ray restarts the statevector backend on B and the allocator
   uses it there; a job allowed only on ``aer_mps`` (A only) waits, queued, not failed.
3. node back: a node with A's resources is added; Ray restarts ``aer_mps`` there, the
   allocator marks it healthy on the new node, and the waiting job and a new one complete.
4. pinned loss: a job allowed only on ``aer_mps`` is running when that node is killed too;
   a third node with A's resources is added; the job should complete there.
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

SV, MPS, DM, STAB = "aer_statevector", "aer_mps", "aer_density_matrix", "aer_stabilizer"
POOL = [SV, MPS, STAB, DM]
HEAD_BACKENDS = [STAB]
A_BACKENDS = [SV, MPS]
B_BACKENDS = [SV, DM]

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
    from ray_qalloc.config import load_settings
    from ray_qalloc.session import node_resources
    from ray_qalloc.store import JobStore

    ghz, brick = circuits()
    timings = report["timings"]
    settings = load_settings(data_dir=tmp / "data", pool=POOL, health_interval_s=0.5, health_timeout_s=2.0,
                             history_flush_s=1.0)
    slots = node_resources(settings)          # qalloc_backend_<name> -> slots, for this pool

    def res(names: list[str]) -> dict[str, float]:
        return {f"qalloc_backend_{n}": slots[f"qalloc_backend_{n}"] for n in names}

    # ---- cluster ---------------------------------------------------------------------------
    t = time.monotonic()
    node_args = {"temp_dir": str(tmp), "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node_args, "num_cpus": 1, "resources": res(HEAD_BACKENDS), "include_dashboard": False,
        # a node that dies without a word is noticed in ~1.5 s, not 15 s
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    _CLUSTER.append(cluster)
    node_a = cluster.add_node(**node_args, num_cpus=2, resources=res(A_BACKENDS))
    node_b = cluster.add_node(**node_args, num_cpus=2, resources=res(B_BACKENDS))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=settings.namespace, logging_level=logging.WARNING,
             log_to_driver=False)
    head_id, a_id, b_id = cluster.head_node.node_id, node_a.node_id, node_b.node_id
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
        "driver_node": ray.get_runtime_context().get_node_id(),
        "driver_token_mode": get_authentication_mode() == AuthenticationMode.TOKEN,
        "worker_token_mode": {c["node_id"]: c["token_mode"] for c in remote_checks},
        "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "resources": {n["NodeID"]: {k: v for k, v in n["Resources"].items() if k.startswith("qalloc_")}
                      for n in ray.nodes() if n["Alive"]},
    }
    save()

    # ---- pool ------------------------------------------------------------------------------
    t = time.monotonic()

    @ray.remote(num_cpus=0)
    class Placeholder:
        def ok(self) -> bool:
            return True

    holder = Placeholder.options(resources=res([SV]),
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(b_id, soft=False)).remote()
    ray.get(holder.ok.remote(), timeout=60)
    # The allocator lives on the head (which is never removed here): this test is about
    # backends and their nodes; losing the allocator is test_integration's subject.
    RemoteAllocator.options(**allocator_options(settings),
                            scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote(settings)
    qa = connect(settings=settings)   # finds the allocator by name, waits until its pool is up
    ray.kill(holder)
    timings["pool_start_s"] = round(time.monotonic() - t, 2)
    store = JobStore(settings.resolved_store_url)
    expected = {STAB: head_id, SV: a_id, MPS: a_id, DM: b_id}

    def backends() -> dict[str, dict[str, Any]]:
        return {b["name"]: {"healthy": b["healthy"], "node_id": b["node_id"]} for b in qa.backends()}

    def job_record(job_id: str) -> dict[str, Any]:
        rec = store.get(job_id)
        res_ = rec.result or {}
        return {
            "id": job_id, "state": rec.state.value, "backend": rec.backend,
            "node_id": (res_.get("metadata") or {}).get("node_id"),
            "attempts": [{"n": a["n"], "backend": a["backend"], "outcome": a["outcome"],
                          "started_at": a["started_at"], "finished_at": a["finished_at"], "error": a["error"]}
                         for a in store.attempts(job_id)],
            "transitions": [tr["name"] for tr in store.transitions(job_id)],
        }

    # ---- phase 1: each backend on the node that holds its resource -------------------------
    t = time.monotonic()
    wait_for("every backend healthy", lambda: all(b["healthy"] for b in backends().values()), 60)
    p1: dict[str, Any] = {"expected_node": expected, "backends": backends(), "jobs": {}}
    handles = {STAB: qa.submit(ghz(4), shots=200, backends=[STAB]),
               SV: qa.submit(brick(6, 4, 1), shots=200, backends=[SV]),
               MPS: qa.submit(ghz(12), shots=200, backends=[MPS]),
               DM: qa.submit(brick(4, 3, 2), shots=200, backends=[DM])}
    for name, h in handles.items():
        r = h.result(timeout=60)
        p1["jobs"][name] = {**job_record(h.id), "result_backend": r.backend,
                            "resources": r.metadata.get("resources"), "shots": sum(r.counts.values())}
    # Node A declares 2 CPUs and hosts two single-threaded simulators: a ~3 s job on aer_mps
    # and a ~1 s job on aer_statevector, submitted together, should run side by side there.
    slow_mps = qa.submit(brick(8, 6, 9), shots=100_000, backends=[MPS])
    fast_sv = qa.submit(brick(8, 6, 8), shots=1_000_000, backends=[SV])
    slow_mps.result(timeout=60)
    fast_sv.result(timeout=60)
    p1["node_a_pair"] = {"mps": job_record(slow_mps.id), "sv": job_record(fast_sv.id)}
    try:  # what the allocator's scheduler believes about each node's cores
        p1["scheduler_node_cpus"] = ray.get(qa.allocator.__ray_call__.remote(
            lambda self: {"allocator": dict(self.node_cpus), "scheduler": dict(self.sched.node_cpus)}), timeout=10)
    except Exception as exc:  # noqa: BLE001 - only evidence for the report
        p1["scheduler_node_cpus"] = f"{type(exc).__name__}: {exc}"
    timings["phase1_s"] = round(time.monotonic() - t, 2)
    report["phases"]["placement"] = p1
    save()
    say("phase 1 done")

    # ---- phase 2: lose node A while jobs run on it ----------------------------------------
    t = time.monotonic()
    p2: dict[str, Any] = {}
    report["phases"]["node_loss"] = p2
    # Jobs of ~1 s each on statevector or density matrix (1M samples of 8 qubits), so one is in
    # flight on A's statevector at any moment until the queue drains.
    loss_jobs = [qa.submit(brick(8, 6, 10 + i), shots=1_000_000, backends=[SV, DM]) for i in range(8)]
    p2["submitted"] = [h.id for h in loss_jobs]

    def running_on_a() -> list[str]:
        return [h.id for h in loss_jobs if (s := h.status())["state"] == "running" and s["backend"] == SV]

    try:
        in_flight = wait_for("a job running on A's statevector", running_on_a, 60, every=0.05)
    except TimeoutError:
        p2["statuses"] = [job_record(h.id) for h in loss_jobs]
        raise
    removed_at = time.time()
    # A crash, not a drain: every process of node A is SIGKILLed at once.
    cluster.remove_node(node_a, allow_graceful=False)
    p2["remove_s"] = round(time.time() - removed_at, 2)
    p2["in_flight_on_a"] = in_flight
    p2["removed_at"] = removed_at
    say(f"node A killed ({p2['remove_s']} s) with {len(in_flight)} job(s) running on it")
    p2["alive_after"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

    done = {}
    for h in loss_jobs:
        r = h.result(timeout=120)
        done[h.id] = {"backend": r.backend, "node_id": r.metadata.get("node_id"), "shots": sum(r.counts.values())}
    p2["results"] = done
    p2["jobs"] = [job_record(h.id) for h in loss_jobs]
    p2["all_done_after_s"] = round(time.time() - removed_at, 2)
    p2["in_flight_history"] = {i: loss_jobs[p2["submitted"].index(i)].status()["attempt_history"] for i in in_flight}
    save()
    say(f"all {len(loss_jobs)} jobs done {p2['all_done_after_s']} s after the crash")

    # Ray restarts the statevector actor on B (B holds that resource too); the allocator
    # pings it there and uses it again.
    t_sv = time.monotonic()
    try:
        wait_for("statevector healthy on B", lambda: (b := backends()[SV])["healthy"] and b["node_id"] == b_id, 60)
        p2["sv_back_on_b_s"] = round(time.monotonic() - t_sv, 2)
        r = qa.submit(brick(6, 4, 3), shots=200, backends=[SV]).result(timeout=60)
        p2["sv_after"] = {"backend": r.backend, "node_id": r.metadata.get("node_id")}
    except Exception as exc:  # noqa: BLE001 - recorded; the test asserts it
        p2["sv_error"] = f"{type(exc).__name__}: {exc}"

    # aer_mps has nowhere to go: its actor waits (restarting) for a node with its resource.
    # A job allowed only there, submitted once the allocator knows, must wait, not fail.
    try:
        wait_for("aer_mps marked unhealthy", lambda: not backends()[MPS]["healthy"], 30)
    except Exception as exc:  # noqa: BLE001
        p2["mps_unhealthy_error"] = f"{type(exc).__name__}: {exc}"
    waiting = qa.submit(ghz(10), shots=300, backends=[MPS])
    p2["waiting_job"] = waiting.id
    time.sleep(2.0)   # four health rounds: it must still be queued, not failed
    p2["backends_while_a_gone"] = backends()
    p2["waiting_while_a_gone"] = job_record(waiting.id)
    timings["phase2_s"] = round(time.monotonic() - t, 2)
    save()
    say("phase 2 done")

    # ---- phase 3: a node with A's resources comes back --------------------------------------
    t = time.monotonic()
    p3: dict[str, Any] = {}
    report["phases"]["node_back"] = p3
    node_a2 = cluster.add_node(**node_args, num_cpus=2, resources=res(A_BACKENDS))
    a2_id = node_a2.node_id
    p3["new_node"] = a2_id
    p3["add_node_s"] = round(time.monotonic() - t, 2)
    say(f"node A' {a2_id[:8]} added")
    try:
        wait_for("mps healthy on the new node",
                 lambda: (b := backends()[MPS])["healthy"] and b["node_id"] == a2_id, 60)
        p3["mps_healthy_after_s"] = round(time.monotonic() - t, 2)
    except Exception as exc:  # noqa: BLE001
        p3["mps_health_error"] = f"{type(exc).__name__}: {exc}"
    p3["backends"] = backends()
    try:
        r = waiting.result(timeout=60)
        p3["waiting_result"] = {"backend": r.backend, "node_id": r.metadata.get("node_id")}
    except Exception as exc:  # noqa: BLE001
        p3["waiting_error"] = f"{type(exc).__name__}: {exc}"
    p3["waiting_job"] = job_record(waiting.id)
    try:
        h = qa.submit(ghz(12), shots=300, backends=[MPS])
        r = h.result(timeout=60)
        p3["new_result"] = {"backend": r.backend, "node_id": r.metadata.get("node_id")}
        p3["new_job"] = job_record(h.id)
    except Exception as exc:  # noqa: BLE001
        p3["new_error"] = f"{type(exc).__name__}: {exc}"
    # how the actors see themselves (pid and node from the actor, not the allocator)
    from ray_qalloc.backends.actor import actor_name

    p3["actor_pings"] = {}
    for name in POOL:
        try:
            info = ray.get(ray.get_actor(actor_name(name), namespace=settings.namespace).ping.remote(), timeout=10)
            p3["actor_pings"][name] = {"node_id": info["node_id"], "pid": info["pid"]}
        except Exception as exc:  # noqa: BLE001
            p3["actor_pings"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    timings["phase3_s"] = round(time.monotonic() - t, 2)
    save()
    say("phase 3 done")

    # ---- phase 4: a job allowed only on the lost node's backend ------------------------------
    # Running on aer_mps when its node crashes; aer_mps will be back (max_restarts=-1) as soon
    # as a node with its resource is. Required: the job waits for it and completes once.
    t = time.monotonic()
    p4: dict[str, Any] = {}
    report["phases"]["pinned_loss"] = p4
    pinned = qa.submit(brick(8, 6, 9), shots=100_000, backends=[MPS])
    p4["job"] = pinned.id
    wait_for("the mps-only job running", lambda: pinned.status()["state"] == "running", 30, every=0.05)
    cluster.remove_node(node_a2, allow_graceful=False)
    say("node A' killed with an mps-only job running on it")
    time.sleep(2.0)
    p4["while_gone"] = job_record(pinned.id)
    node_a3 = cluster.add_node(**node_args, num_cpus=2, resources=res(A_BACKENDS))
    p4["new_node"] = node_a3.node_id
    try:
        wait_for("mps healthy on the third A", lambda: (b := backends()[MPS])["healthy"]
                 and b["node_id"] == node_a3.node_id, 60)
    except Exception as exc:  # noqa: BLE001
        p4["mps_health_error"] = f"{type(exc).__name__}: {exc}"
    try:
        r = pinned.result(timeout=30)
        p4["result"] = {"backend": r.backend, "node_id": r.metadata.get("node_id")}
    except Exception as exc:  # noqa: BLE001
        p4["error"] = f"{type(exc).__name__}: {exc}"
    p4["final"] = job_record(pinned.id)
    p4["store_counts"] = store.counts_by_state()
    timings["phase4_s"] = round(time.monotonic() - t, 2)
    save()
    say("phase 4 done")


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("multinode.json")))
