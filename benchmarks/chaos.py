"""No accepted job is lost: a mixed workload through the HTTP API while things are killed.

    python -m benchmarks.chaos --jobs 300 --json OUT [--baseline-jobs 100] [--seed 0]

On this machine it starts a two-node Ray (a head and a worker, real raylet processes on
loopback) in the pool design: the head offers a simulator pool (``qalloc_pool_cpu``, 2 CPUs)
and the emulated QPUs (``qalloc_backend_qpu_*``), the worker offers a pool (1 CPU). Then the
allocator, and the API on Ray Serve with two replicas (kept on the head: the node kill must
not take the whole API with it). Then, in one run:

1. **baseline** — ``--baseline-jobs`` jobs through the API, nothing killed: jobs/s;
2. **chaos** — ``--jobs`` jobs of the same mix while, every few seconds, in turn: an executor
   actor (the head's pool actor, then a QPU's actor), the allocator actor, a Serve replica,
   and the worker node are killed (a new worker node is started a few seconds later). A
   prober GETs ``/healthz`` every 20 ms throughout.
3. **the head restarts** — ``benchmarks.head_restart`` in a process of its own (this
   process is a driver on the head, which a head kill would take with it): every process
   of the Ray head is SIGKILLed under HTTP load and a new head starts on the same GCS port,
   GCS fault tolerance on a real ``redis-server``; skipped, and said so, without one
   (``--no-head`` skips it too).

Recovery of a kill = time from the kill until a canary job submitted after it completes
end to end (for an executor kill, a canary pinned to that executor — the pool by its name,
or the QPU: the time until *it* works again; for the node kill, any backend: the time until
work is re-placed; ``node_back_s``: a canary pinned to the new node's pool, which the
allocator has to discover first). At the end every
accepted job is reconciled against the store: ``lost`` = accepted and not completed,
``duplicated_results`` = jobs with more than one recorded completion.

JSON ``summary``: ``accepted``, ``completed``, ``lost`` (goal 0), ``duplicated_results``
(goal 0), ``availability`` (goal ≥ 0.999), ``recovery_s_p50``, ``recovery_s_p99`` (all
kills), ``recovery_by_kind``, ``throughput_ratio`` (chaos jobs/s ÷ baseline jobs/s);
``head_restart``: that run's summary (``api_downtime_s``, its own ``lost`` and
``duplicated_results``, which are also added to the totals above, and
``recovery_by_kind["head"]`` is its API downtime).
The submitting client retries with its Idempotency-Key (as a real client should), so a
request cut by a kill never makes a second job.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks._common import make_console, write_json

KINDS = ("backend", "allocator", "replica", "node")   # in this process; "head" runs in its own
POOL = ["default"]           # the four Aer methods on every node's pool, and the three emulated QPUs
KILLED_QPU = "qpu_fez"       # the QPU whose actor the second executor kill takes
HEAD_CPUS, WORKER_CPUS = 2, 1
BELL = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\n'
        "measure q -> c;\n")


# ---- workload ----------------------------------------------------------------------------------
def workload(n: int, seed: int) -> list[dict[str, Any]]:
    """A mix that keeps two cores busy for about a minute per 300 jobs: entangling circuits of
    15–19 qubits (statevector work), wide Clifford circuits (stabilizer), small quantum-intent
    jobs (emulated QPUs), mixed priorities."""
    from qiskit import qasm2
    from qiskit.circuit.random import random_circuit

    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.55:
            width = rng.randint(15, 19)
            qc = random_circuit(width, rng.randint(12, 24), max_operands=2, measure=True, seed=rng.randrange(10**6))
            body = {"qasm": qasm2.dumps(qc), "shots": rng.choice((100, 500, 1000))}
        elif r < 0.8:
            width = rng.randint(20, 40)
            lines = ["OPENQASM 2.0;", 'include "qelib1.inc";', f"qreg q[{width}];", f"creg c[{width}];", "h q[0];"]
            lines += [f"cx q[{k}],q[{k + 1}];" for k in range(width - 1)] + ["measure q -> c;"]
            body = {"qasm": "\n".join(lines) + "\n", "shots": 1000}
        else:
            width = rng.randint(3, 6)
            lines = ["OPENQASM 2.0;", 'include "qelib1.inc";', f"qreg q[{width}];", f"creg c[{width}];", "h q[0];"]
            lines += [f"cx q[{k}],q[{k + 1}];" for k in range(width - 1)] + ["measure q -> c;"]
            body = {"qasm": "\n".join(lines) + "\n", "shots": 1000, "intent": "quantum"}
        body["priority"] = rng.choice(("high", "normal", "normal", "batch"))
        body["id"] = f"w{seed}-{i}"
        out.append(body)
    return out


# ---- the cluster -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    """A two-node Ray with the allocator and the API; knows how to kill each part."""

    def __init__(self, data_dir: Path, ray_tmp: str) -> None:
        import ray
        from ray.cluster_utils import Cluster

        from ray_qalloc import serving
        from ray_qalloc.backends.pools import POOL_RESOURCE_CPU
        from ray_qalloc.config import load_settings
        from ray_qalloc.resources import node_resources
        from ray_qalloc.session import connect
        from ray_qalloc.tenants import Quota, TenantStore

        self.settings = load_settings(
            data_dir=data_dir, pool=POOL, health_interval_s=0.5,
            health_timeout_s=3.0, run_timeout_floor_s=60.0, breaker_cooldown_s=1.0,
            api={"replicas": 2, "replica_resources": {"qalloc_head": 0.01}},
            placement={"foreign_cpu": False})   # both "nodes" share this machine's cores
        # the head: a pool, every QPU, and the API's replicas; the worker: a pool
        self.head_res = {**node_resources(self.settings), "qalloc_head": 1.0}
        self.worker_res = {POOL_RESOURCE_CPU: 1.0}
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": HEAD_CPUS, "resources": self.head_res, "temp_dir": ray_tmp, "include_dashboard": False})
        self.worker = self.cluster.add_node(num_cpus=WORKER_CPUS, resources=self.worker_res)
        ray.init(address=self.cluster.address, namespace=self.settings.namespace, logging_level=logging.ERROR,
                 log_to_driver=False)
        self.qa = connect(settings=self.settings)
        self.url = serving.start(self.settings, host="127.0.0.1", port=free_port())
        tenants = TenantStore(self.settings.resolved_store_url)
        tenants.set_quota("chaos", Quota(max_active_jobs=10**6, shots_per_day=10**12, qpu_seconds_per_day=10**9,
                                         priorities=["emergency", "high", "normal", "batch"]))
        self.token = tenants.create_token("chaos")
        tenants.close()
        self._backend_turn = 0

    @property
    def head_pool(self) -> str:
        from ray_qalloc.backends.pools import pool_name

        return pool_name(self.cluster.head_node.node_id)

    @property
    def worker_pool(self) -> str:
        from ray_qalloc.backends.pools import pool_name

        return pool_name(self.worker.node_id)

    def kill(self, kind: str) -> dict[str, Any]:
        """Kill one thing of ``kind``; returns what was killed and how a canary should run."""
        import ray
        import ray.util

        from ray_qalloc.backends.actor import actor_name
        from ray_qalloc.backends.pool_actor import pool_actor_name

        ns = self.settings.namespace
        if kind == "backend":
            # in turn: the head's pool actor (its runs die with it; Ray restarts it on the head),
            # then a QPU's actor; the canary is pinned to the executor that was killed
            turn = self._backend_turn
            self._backend_turn += 1
            if turn % 2 == 0:
                name, actor = self.head_pool, pool_actor_name(self.head_pool)
            else:
                name, actor = KILLED_QPU, actor_name(KILLED_QPU)
            ray.kill(ray.get_actor(actor, namespace=ns), no_restart=False)
            return {"what": name, "canary_backends": [name]}
        if kind == "allocator":
            ray.kill(ray.get_actor(self.settings.allocator_name, namespace=ns), no_restart=False)
            return {"what": self.settings.allocator_name, "canary_backends": None}
        if kind == "replica":
            replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["name"].startswith("SERVE_REPLICA::qalloc#")]
            victim = replicas[self._backend_turn % len(replicas)]
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
            return {"what": victim["name"].split("#")[-1], "canary_backends": None}
        if kind == "node":
            self.cluster.remove_node(self.worker, allow_graceful=False)
            return {"what": f"worker node ({self.worker_pool})", "canary_backends": None, "restore": True}
        raise ValueError(kind)

    def allocator_startup(self) -> dict[str, Any]:
        """How long the restarted allocator's start took, by step (its own account)."""
        import ray

        try:
            actor = ray.get_actor(self.settings.allocator_name, namespace=self.settings.namespace)
            return ray.get(actor.stats.remote(), timeout=30)["startup"]
        except Exception as exc:  # noqa: BLE001 - a figure, not a failure
            return {"error": type(exc).__name__}

    def restore_node(self) -> None:
        """A new worker node (a new node id, so a new pool name) that the allocator must find."""
        self.worker = self.cluster.add_node(num_cpus=WORKER_CPUS, resources=self.worker_res)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        for step in (serve.shutdown, ray.shutdown, self.cluster.shutdown):
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort: everything must go
                pass


# ---- load, probes, canaries --------------------------------------------------------------------
class Prober(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.ok, self.total, self.stop = url, 0, 0, threading.Event()
        self.failures: list[float] = []

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=1.0) as c:
            while not self.stop.is_set():
                self.total += 1
                try:
                    if c.get(self.url + "/healthz").status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(time.time())
                except Exception:  # noqa: BLE001 - a failed probe is the measurement
                    self.failures.append(time.time())
                self.stop.wait(0.02)


def submit_all(url: str, token: str, jobs: list[dict[str, Any]], batch: int = 20) -> tuple[list[str], int]:
    """Submit in batches with per-batch Idempotency-Keys, retrying (same key) through outages.
    Returns the accepted job ids and the number of jobs that could not be submitted at all."""
    import httpx

    accepted: list[str] = []
    failed = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0) as c:
        for start in range(0, len(jobs), batch):
            part = jobs[start:start + batch]
            key = f"chaos-{uuid.uuid4().hex}"
            deadline = time.monotonic() + 120.0
            while True:
                try:
                    r = c.post("/v1/jobs:batch", json={"jobs": part}, headers={"Idempotency-Key": key})
                    if r.status_code == 200:
                        accepted += [j["id"] for j in r.json()["jobs"] if j.get("id")]
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    failed += len(part)
                    break
                time.sleep(0.25)
    return accepted, failed


def canary(url: str, token: str, backends: list[str] | None, limit_s: float = 120.0) -> float | None:
    """Seconds until one tiny job submitted now completes end to end; None if it never does."""
    import httpx

    t0 = time.time()
    # emergency: the canary measures recovery, not the queue in front of it
    body: dict[str, Any] = {"qasm": BELL, "shots": 10, "priority": "emergency"}
    if backends:
        body["backends"] = backends
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10.0) as c:
        while time.time() - t0 < limit_s:
            try:
                r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"canary-{uuid.uuid4().hex}"})
                if r.status_code in (200, 201):
                    jid = r.json()["id"]
                    while time.time() - t0 < limit_s:
                        res = c.get(f"/v1/jobs/{jid}/result", params={"wait": 2})
                        if res.status_code == 200:
                            return time.time() - t0
                        if res.status_code not in (202, 503):
                            break    # failed over to death: submit another
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    return None


def wait_done(store: Any, ids: list[str], limit_s: float) -> float:
    """Wait until every id is terminal (or ``limit_s`` passes); returns the last update time."""
    import sqlalchemy as sa

    from ray_qalloc.store import jobs_table as j

    deadline = time.time() + limit_s
    pending = set(ids)
    last = 0.0
    while pending and time.time() < deadline:
        for start in range(0, len(ids), 900):
            chunk = [i for i in ids[start:start + 900] if i in pending]
            if not chunk:
                continue
            with store.engine.connect() as conn:
                rows = conn.execute(sa.select(j.c.id, j.c.state, j.c.updated_at).where(j.c.id.in_(chunk))).all()
            for row in rows:
                if row.state in ("completed", "failed", "cancelled"):
                    pending.discard(row.id)
                    last = max(last, row.updated_at)
        if pending:
            time.sleep(0.25)
    return last or time.time()


def reconcile(store: Any, ids: list[str]) -> dict[str, int]:
    import sqlalchemy as sa

    from ray_qalloc.store import attempts_table as a
    from ray_qalloc.store import jobs_table as j
    from ray_qalloc.store import transitions_table as t

    out = {"completed": 0, "failed": 0, "not_finished": 0, "missing": 0, "duplicated_results": 0}
    for start in range(0, len(ids), 900):
        chunk = ids[start:start + 900]
        with store.engine.connect() as conn:
            states = dict(conn.execute(sa.select(j.c.id, j.c.state).where(j.c.id.in_(chunk))).all())
            done_attempts = dict(conn.execute(
                sa.select(a.c.job_id, sa.func.count()).where(a.c.job_id.in_(chunk), a.c.outcome == "completed")
                .group_by(a.c.job_id)).all())
            completes = dict(conn.execute(
                sa.select(t.c.job_id, sa.func.count()).where(t.c.job_id.in_(chunk), t.c.name == "complete")
                .group_by(t.c.job_id)).all())
        for jid in chunk:
            st = states.get(jid)
            if st is None:
                out["missing"] += 1
            elif st == "completed":
                out["completed"] += 1
            elif st == "failed":
                out["failed"] += 1
            else:
                out["not_finished"] += 1
            if done_attempts.get(jid, 0) > 1 or completes.get(jid, 0) > 1:
                out["duplicated_results"] += 1
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


# ---- the run -----------------------------------------------------------------------------------
def _own_ray_environment(tmp: Path) -> None:
    """This run's Ray talks to nobody else's: token authentication with a fresh token of its
    own (passed on to every node it starts), and Ray's "current cluster" address file under
    ``tmp`` rather than ``/tmp/ray`` (where another ``ray.init()`` on this machine would find
    this cluster, and which may not exist). Set before Ray starts anything in this process."""
    import secrets

    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": str(tmp)})
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.pop("RAY_ADDRESS", None)
    (tmp / "ray").mkdir(exist_ok=True)


def run(jobs: int, baseline_jobs: int, seed: int, gap_s: float, console: Any,
        node_down_s: float = 8.0) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="qalloc-chaos-"))
    ray_tmp = tempfile.mkdtemp(prefix="qc", dir="/tmp")
    _own_ray_environment(Path(ray_tmp))

    from ray_qalloc.store import JobStore

    h = None
    try:
        console.print("starting a 2-node Ray, the allocator and the API (2 replicas) ...")
        t0 = time.time()
        h = Harness(data_dir, ray_tmp)
        store = JobStore(h.settings.resolved_store_url)
        console.print(f"  up in {time.time() - t0:.1f} s at {h.url}")
        warm = canary(h.url, h.token, None)
        console.print(f"  first job end to end: {warm:.2f} s" if warm else "  [red]first job never completed[/red]")

        # 1. baseline
        console.print(f"baseline: {baseline_jobs} jobs, nothing killed ...")
        base_jobs = workload(baseline_jobs, seed + 1)
        b0 = time.time()
        base_ids, base_fail = submit_all(h.url, h.token, base_jobs)
        b_end = wait_done(store, base_ids, 600)
        base_rate = len(base_ids) / max(b_end - b0, 1e-9)
        console.print(f"  {len(base_ids)} jobs in {b_end - b0:.1f} s: {base_rate:.2f} jobs/s")

        # 2. chaos
        console.print(f"chaos: {jobs} jobs; a kill every {gap_s:g} s in turn: {', '.join(KINDS)} (twice) ...")
        prober = Prober(h.url)
        prober.start()
        chaos_jobs = workload(jobs, seed + 2)
        result: dict[str, Any] = {}
        submitter = threading.Thread(target=lambda: result.update(zip(("ids", "failed"), submit_all(
            h.url, h.token, chaos_jobs))), daemon=True)
        c0 = time.time()
        submitter.start()
        recoveries: list[dict[str, Any]] = []
        for k, kind in enumerate(KINDS * 2):
            time.sleep(max(c0 + (k + 1) * gap_s - time.time(), 0.0))
            t_kill = time.time()
            try:
                info = h.kill(kind)
            except Exception as exc:  # noqa: BLE001 - report it, go on
                console.print(f"  [red]could not kill {kind}: {exc}[/red]")
                continue
            got: dict[str, float | None] = {}
            probe = threading.Thread(target=lambda: got.update(
                rec=canary(h.url, h.token, info["canary_backends"])), daemon=True)
            probe.start()
            if info.get("restore"):
                # the node comes back after a while, whatever the canary does (Ray starts nodes
                # from the main thread only)
                time.sleep(max(t_kill + node_down_s - time.time(), 0.0))
                h.restore_node()
            probe.join()
            rec = got.get("rec")
            row = {"kind": kind, "what": info["what"], "at_s": t_kill - c0, "recovery_s": rec}
            if kind == "allocator":
                row["allocator_startup"] = h.allocator_startup()
            if info.get("restore"):
                # pinned to the new node's pool: refused as unknown until the allocator has found
                # it (the canary keeps submitting), then it must run there
                back = canary(h.url, h.token, [h.worker_pool])
                row["node_back_s"] = back
                row["new_pool"] = h.worker_pool
                console.print(f"  node restarted after {node_down_s:g} s; its pool {h.worker_pool} works "
                              + (f"{back:.2f} s later" if back is not None else "[red]never[/red]"))
            recoveries.append(row)
            console.print(f"  t={row['at_s']:5.1f}s killed {kind:9s} ({info['what']}): "
                          + (f"work flows again after {rec:.2f} s" if rec is not None else "[red]no recovery[/red]")
                          + (f" (allocator start: {row['allocator_startup']})" if "allocator_startup" in row else ""))
        submitter.join()
        ids: list[str] = result.get("ids", [])
        c_end = wait_done(store, ids, 900)
        prober.stop.set()
        prober.join()
        chaos_rate = len(ids) / max(c_end - c0, 1e-9)
        rec_counts = reconcile(store, ids)
        lost = len(ids) - rec_counts["completed"]
        times = [r["recovery_s"] for r in recoveries if r["recovery_s"] is not None]
        by_kind = {kind: {"p50": pct([r["recovery_s"] for r in recoveries if r["kind"] == kind
                                      and r["recovery_s"] is not None], 50),
                          "max": pct([r["recovery_s"] for r in recoveries if r["kind"] == kind
                                      and r["recovery_s"] is not None], 100),
                          "kills": sum(1 for r in recoveries if r["kind"] == kind),
                          "unrecovered": sum(1 for r in recoveries if r["kind"] == kind and r["recovery_s"] is None)}
                   for kind in KINDS}
        summary = {
            "accepted": len(ids), "submit_failed": result.get("failed", 0), "completed": rec_counts["completed"],
            "failed": rec_counts["failed"], "not_finished": rec_counts["not_finished"],
            "missing": rec_counts["missing"], "lost": lost, "duplicated_results": rec_counts["duplicated_results"],
            "availability": prober.ok / max(prober.total, 1), "probes": prober.total,
            "recovery_s_p50": statistics.median(times) if times else None, "recovery_s_p99": pct(times, 99),
            "recovery_by_kind": by_kind, "throughput_ratio": chaos_rate / base_rate if base_rate else None,
            "jobs_per_s_baseline": base_rate, "jobs_per_s_chaos": chaos_rate,
            "baseline_accepted": len(base_ids), "baseline_submit_failed": base_fail,
            "goals": {"lost": 0, "duplicated_results": 0, "availability": 0.999},
        }
        return {"benchmark": "chaos", "summary": summary, "kills": recoveries,
                "wall_s": time.time() - t0}
    finally:
        if h is not None:
            h.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def head_restart_fault(console: Any, down_s: float = 5.0) -> dict[str, Any]:
    """The head-restart fault, run by ``benchmarks.head_restart`` in its own process."""
    import json
    import subprocess
    import sys

    from benchmarks.head_restart import redis_binary

    if redis_binary() is None:
        return {"skipped": "redis-server is not installed (Debian: apt-get install redis-server)"}
    console.print(f"the head restarts: every head process SIGKILLed, a new head after {down_s:g} s "
                  "(GCS on a real Redis) ...")
    out = Path(tempfile.mkdtemp(prefix="qalloc-head-")) / "head.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QALLOC_", "RAY_"))}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.head_restart", "--down", str(down_s),
                               "--json", str(out)], env=env, cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, timeout=600)
        rec = json.loads(out.read_text()) if out.exists() else {}
        if "summary" not in rec:
            return {"error": rec.get("error") or f"exit {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"}
        return rec
    except subprocess.TimeoutExpired:
        return {"error": "benchmarks.head_restart did not finish in 600 s"}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def add_head_restart(out: dict[str, Any], rec: dict[str, Any]) -> None:
    """Fold the head-restart run into the chaos figures: its jobs count in lost/duplicated."""
    s = out["summary"]
    hs = rec.get("summary")
    if hs is None:
        s["head_restart"] = {k: rec[k] for k in ("skipped", "error") if k in rec}
        return
    s["head_restart"] = hs
    for key in ("accepted", "completed", "lost", "duplicated_results"):
        s[key] += hs[key]
    s["recovery_by_kind"]["head"] = {"p50": hs["api_downtime_s"], "max": hs["api_downtime_s"], "kills": 1,
                                     "unrecovered": 0 if hs["ready_after_head_back_s"] is not None else 1,
                                     "head_down_s": hs["head_down_s"]}
    out["kills"].append({"kind": "head", "what": "every process of the Ray head", "recovery_s": hs["api_downtime_s"],
                         "ready_after_head_back_s": hs["ready_after_head_back_s"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--baseline-jobs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap", type=float, default=6.0, help="seconds between kills")
    ap.add_argument("--no-head", action="store_true", help="skip the head-restart fault")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    console = make_console()
    out = run(args.jobs, args.baseline_jobs, args.seed, args.gap, console)
    if not args.no_head:
        add_head_restart(out, head_restart_fault(console))
    s = out["summary"]
    t = Table(title=f"chaos: {s['accepted']} accepted jobs, {len(out['kills'])} kills")
    for col in ("figure", "value", "goal"):
        t.add_column(col)
    t.add_row("lost", str(s["lost"]), "0")
    t.add_row("duplicated results", str(s["duplicated_results"]), "0")
    t.add_row("availability (/healthz)", f"{s['availability']:.5f} of {s['probes']}", "≥ 0.999")
    for kind, r in s["recovery_by_kind"].items():
        t.add_row(f"recovery after {kind} kill (p50 / max s)",
                  f"{r['p50']:.2f} / {r['max']:.2f}" if r["p50"] is not None else "none", "")
    hr = s.get("head_restart") or {}
    t.add_row("head restart: API downtime s / lost / duplicated",
              f"{hr['api_downtime_s']} / {hr['lost']} / {hr['duplicated_results']}" if "api_downtime_s" in hr
              else str(hr.get("skipped") or hr.get("error") or "not run"), "")
    t.add_row("throughput under chaos / without",
              f"{s['throughput_ratio']:.3f}" if s["throughput_ratio"] else "n/a", "")
    console.print(t)
    write_json(args.json, out, console)


if __name__ == "__main__":
    main()
