"""The Ray head restarts: GCS fault tolerance on a real Redis, measured through the HTTP API.

    python -m benchmarks.head_restart --json OUT [--down 5] [--submit-for 20]

On this machine it starts a real ``redis-server`` (Debian's) on loopback and a two-node Ray
(``ray.cluster_utils.Cluster``: real GCS and raylet processes) whose GCS keeps its tables in
that Redis (``RAY_REDIS_ADDRESS``, as KubeRay's ``gcsFaultToleranceOptions`` sets it):

* head    1 CPU, ``qalloc_head`` and ``qalloc_backend_qpu_fez``: the allocator (pinned here
          by ``qalloc_head``), the emulated QPU's actor, Serve's controller and a proxy;
* worker  2 CPUs, ``qalloc_pool_cpu``: the simulator pool (and Serve's other proxy).

A short-lived driver (its own process, as ``qalloc serve --detached`` would be) starts the
allocator and the API on Ray Serve, detached, and exits; from then on this process talks to
the service only as a user does, over HTTP, and reads the job store (SQLite) to reconcile.

While a client submits a job every ``--every`` seconds (retrying each with its
Idempotency-Key, as a real client does) and a prober GETs ``/readyz`` every 50 ms, every
process of the head node is SIGKILLed (GCS, raylet, the allocator, the QPU's actor, Serve's
controller): a crash, not a drain. ``--down`` seconds later a new head starts on the same GCS
port (a restarted head pod). Nothing else is done by hand: Ray restarts the detached actors
(``max_restarts=-1``), the allocator recovers its queue from the store and re-attaches to the
runs still going on the worker's pool, Serve's controller comes back and the API answers.

Figures: ``api_downtime_s`` (the longest stretch of failed ``/readyz`` probes, i.e. time
without a working submit path), ``ready_after_head_back_s`` (from the new head's start to the
first good probe), ``lost`` and ``duplicated_results`` over every job the API accepted
(goal 0 and 0), ``pool_survived`` (the pool actor's process is the one from before the crash),
``allocator_restarted`` (its pid changed), and whether a job pinned to the QPU (whose actor
died with the head) and one pinned to the pool complete afterwards.

``tests/test_head_restart.py`` runs this and asserts on its JSON; ``benchmarks.chaos``
runs it as its "head" fault.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from rich.table import Table

from benchmarks._common import make_console, write_json

QPU = "qpu_fez"
POOL = ["statevector", "mps", QPU]
HEAD_RESOURCE = "qalloc_head"
TENANT = "headfail"


# ---- a real Redis ------------------------------------------------------------------------------
def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)), None)


class RedisServer:
    """``redis-server`` on loopback in a folder of its own (no persistence: Ray's GCS
    tables live in its memory, which outlives the head; that is the point)."""

    def __init__(self, folder: Path) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server).")
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "redis.log"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {self.log.read_text()[-800:] if self.log.exists() else ''}")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the deploy step: a driver of its own that exits ------------------------------------------
def settings_overrides(data_dir: Path) -> dict[str, Any]:
    return {"data_dir": str(data_dir), "pool": POOL, "health_interval_s": 0.5, "health_timeout_s": 2.0,
            "history_flush_s": 1.0, "run_timeout_floor_s": 60.0, "breaker_cooldown_s": 1.0,
            "hedge": {"enabled": False, "probe_idle": False},
            "placement": {"foreign_cpu": False}}   # both "nodes" share this machine's cores


def deploy(gcs_address: str, overrides: dict[str, Any], port: int) -> dict[str, Any]:
    """What an operator's ``qalloc serve --detached`` does: allocator (on the head), pools,
    API on Serve, all detached; then this driver leaves."""
    import logging

    import ray

    from ray_qalloc import serving
    from ray_qalloc.allocator import RemoteAllocator, allocator_options
    from ray_qalloc.config import load_settings
    from ray_qalloc.tenants import Quota, TenantStore

    settings = load_settings(**overrides)
    ray.init(address=gcs_address, namespace=settings.namespace, logging_level=logging.WARNING, log_to_driver=False)
    RemoteAllocator.options(**allocator_options(settings), resources={HEAD_RESOURCE: 0.01}).remote(settings)
    url = serving.start(settings, host="127.0.0.1", port=port, detached=True)
    tenants = TenantStore(settings.resolved_store_url)
    tenants.set_quota(TENANT, Quota(max_active_jobs=10**6, shots_per_day=10**12, qpu_seconds_per_day=10**9))
    token = tenants.create_token(TENANT, admin=True)
    tenants.close()
    return {"url": url, "token": token}


def _deploy_main() -> None:
    args = json.loads(sys.argv[2])
    print("DEPLOYED " + json.dumps(deploy(args["gcs"], args["overrides"], args["port"])), flush=True)


# ---- client side -------------------------------------------------------------------------------
def circuits() -> tuple[str, str]:
    """A ~1 s statevector job (8 qubits, 1e6 shots, one thread) and a small QPU job, as QASM."""
    import numpy as np
    from qiskit import QuantumCircuit, qasm2

    rng = np.random.default_rng(7)
    brick = QuantumCircuit(8, 8)
    for layer in range(6):
        for q in range(8):
            brick.ry(float(rng.uniform(0.1, 3.0)), q)
        for q in range(layer % 2, 7, 2):
            brick.cx(q, q + 1)
    brick.measure(range(8), range(8))
    ghz = QuantumCircuit(3, 3)
    ghz.h(0)
    ghz.cx(0, 1)
    ghz.cx(1, 2)
    ghz.measure(range(3), range(3))
    return qasm2.dumps(brick), qasm2.dumps(ghz)


class Probe(threading.Thread):
    """GETs ``path`` every ``every`` s; keeps (time, ok) for every probe."""

    def __init__(self, url: str, path: str, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.every = url, path, every
        self.samples: list[tuple[float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=2.0) as c:
            while not self.stop.is_set():
                t = time.time()
                try:
                    ok = c.get(self.url + self.path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.samples.append((t, ok))
                self.stop.wait(self.every)

    def longest_outage(self) -> tuple[float, float | None, float | None]:
        """(seconds, start, end) of the longest run of failed probes: from the first failed
        probe to the first good one after it (an outage still going counts to the last probe)."""
        best, start, best_span = 0.0, None, (None, None)
        for t, ok in self.samples:
            if not ok and start is None:
                start = t
            elif ok and start is not None:
                if t - start > best:
                    best, best_span = t - start, (start, t)
                start = None
        if start is not None and self.samples and self.samples[-1][0] - start > best:
            best, best_span = self.samples[-1][0] - start, (start, None)
        return best, best_span[0], best_span[1]


class Submitter(threading.Thread):
    """One job every ``every`` s until stopped; each retried with its Idempotency-Key until the
    API accepts it (or ``retry_s`` passes), as a client that must not make a job twice does."""

    def __init__(self, url: str, token: str, bodies: Callable[[int], dict[str, Any]], every: float,
                 retry_s: float = 90.0) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.bodies, self.every, self.retry_s = url, token, bodies, every, retry_s
        self.accepted: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.retries = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        n = 0
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=10.0) as c:
            while not self.stop.is_set():
                body, key, t0 = self.bodies(n), f"head-{uuid.uuid4().hex}", time.time()
                while True:
                    try:
                        r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                        if r.status_code in (200, 201):
                            self.accepted.append({"id": r.json()["id"], "n": n, "asked_at": t0,
                                                  "accepted_at": time.time(), "shots": body["shots"]})
                            break
                        if r.status_code < 500 and r.status_code != 429:
                            self.refused.append({"n": n, "status": r.status_code, "body": r.text[:300]})
                            break
                    except httpx.HTTPError:
                        pass
                    self.retries += 1
                    if time.time() - t0 > self.retry_s:
                        self.refused.append({"n": n, "status": "gave up"})
                        break
                    time.sleep(0.2)
                n += 1
                self.stop.wait(max(self.every - (time.time() - t0), 0.0))


def get_json(url: str, token: str, path: str, timeout: float = 10.0) -> Any:
    import httpx

    r = httpx.get(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    r.raise_for_status()
    return r.json()


def wait_until(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < end:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the service may be coming back
            last_exc = exc
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {type(last_exc).__name__}: {last_exc})" if last_exc else ""))


def run_to_completion(url: str, token: str, body: dict[str, Any], limit_s: float = 120.0) -> dict[str, Any]:
    """Submit one job and wait for its result; where it ran and how long it took."""
    import httpx

    t0 = time.time()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=15.0) as c:
        r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"head-{uuid.uuid4().hex}"})
        r.raise_for_status()
        jid = r.json()["id"]
        while time.time() - t0 < limit_s:
            res = c.get(f"/v1/jobs/{jid}/result", params={"wait": 2})
            if res.status_code == 200:
                out = res.json()
                return {"id": jid, "backend": out.get("backend"), "s": round(time.time() - t0, 2)}
            if res.status_code not in (202, 503):
                return {"id": jid, "error": f"{res.status_code} {res.text[:300]}"}
    return {"id": jid, "error": f"no result in {limit_s:g} s"}


# ---- the run -----------------------------------------------------------------------------------
def run(down_s: float, submit_for_s: float, every_s: float, console: Any) -> dict[str, Any]:
    from benchmarks.chaos import _own_ray_environment

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="qh", dir="/tmp"))    # Ray's unix sockets need a short path
    _own_ray_environment(tmp)
    for key in [k for k in os.environ if k.startswith("QALLOC_")]:
        del os.environ[key]
    report: dict[str, Any] = {"benchmark": "head_restart", "timings": {}, "down_s": down_s}
    redis = None
    try:
        redis = RedisServer(tmp / "redis")
        # Read by every Ray node this process starts (ray._private.node.Node): the GCS keeps its
        # tables in this Redis, under a namespace of this run's own.
        os.environ["RAY_REDIS_ADDRESS"] = redis.address
        os.environ["RAY_external_storage_namespace"] = f"qalloc-{uuid.uuid4().hex[:8]}"
        report["redis"] = redis.address
        _run(tmp, report, down_s, submit_for_s, every_s, console, lambda c: _CLUSTER.append(c))
    except Exception as exc:  # noqa: BLE001 - recorded for the caller; cleanup below either way
        import traceback

        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        console.print(f"[red]FAILED: {report['error']}[/red]")
    finally:
        for c in _CLUSTER:
            try:
                c.shutdown()
            except Exception:  # noqa: BLE001 - best effort: everything must go
                pass
        _CLUSTER.clear()
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        report["wall_s"] = round(time.time() - t_start, 1)
    return report


_CLUSTER: list[Any] = []


def _run(tmp: Path, report: dict[str, Any], down_s: float, submit_for_s: float, every_s: float,
         console: Any, keep: Callable[[Any], None]) -> None:
    from ray.cluster_utils import Cluster

    from ray_qalloc.backends.pools import POOL_RESOURCE_CPU, pool_name
    from ray_qalloc.config import load_settings
    from ray_qalloc.resources import node_resources
    from ray_qalloc.store import JobStore

    from benchmarks.chaos import reconcile, wait_done

    timings = report["timings"]
    overrides = settings_overrides(tmp / "data")
    settings = load_settings(**overrides)
    res = node_resources(settings)
    head_args = {
        "temp_dir": str(tmp), "object_store_memory": 80 * 1024 * 1024, "num_cpus": 1, "include_dashboard": False,
        "resources": {**{k: v for k, v in res.items() if k != POOL_RESOURCE_CPU}, HEAD_RESOURCE: 1.0},
        # a dead node is noticed in ~1.5 s, not 15 s
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}}
    t = time.time()
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    keep(cluster)
    gcs_port = cluster.head_node._ray_params.gcs_server_port
    worker = cluster.add_node(temp_dir=str(tmp), object_store_memory=80 * 1024 * 1024, num_cpus=2,
                              resources={POOL_RESOURCE_CPU: res[POOL_RESOURCE_CPU]})
    cluster.wait_for_nodes()
    pool = pool_name(worker.node_id)
    report["cluster"] = {"gcs": cluster.address, "gcs_port": gcs_port, "head": cluster.head_node.node_id,
                         "worker": worker.node_id, "pool": pool}
    timings["cluster_start_s"] = round(time.time() - t, 2)
    console.print(f"2-node Ray up in {timings['cluster_start_s']} s; GCS {cluster.address} on Redis {report['redis']}")

    t = time.time()
    api_port = free_port()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.head_restart", "--deploy",
                           json.dumps({"gcs": cluster.address, "overrides": overrides, "port": api_port})],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DEPLOYED ")), None)
    if line is None:
        raise RuntimeError(f"deploy failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    dep = json.loads(line[len("DEPLOYED "):])
    url, token = dep["url"], dep["token"]
    timings["deploy_s"] = round(time.time() - t, 2)
    store = JobStore(settings.resolved_store_url)

    wait_until("the API ready", lambda: get_json(url, token, "/readyz").get("status") == "ready", 120)
    console.print(f"API at {url} ready {timings['deploy_s']} s after the deploy started (its driver has exited)")
    sv_qasm, qpu_qasm = circuits()

    def body(n: int) -> dict[str, Any]:
        if n % 4 == 3:
            return {"qasm": qpu_qasm, "shots": 200, "backends": [QPU]}
        return {"qasm": sv_qasm, "shots": 1_000_000, "backends": [f"{pool}/statevector"]}

    before = {"pool_job": run_to_completion(url, token, body(0)), "qpu_job": run_to_completion(url, token, body(3))}
    stats0 = get_json(url, token, "/v1/admin/stats")
    report["before"] = {**before, "allocator_pid": stats0.get("pid"),
                        "pool_pid": _pool_pid(url, token, pool)}

    # ---- the crash ---------------------------------------------------------------------------
    ready = Probe(url, "/readyz")
    alive = Probe(url, "/healthz")
    sub = Submitter(url, token, body, every_s)
    ready.start()
    alive.start()
    sub.start()
    try:
        wait_until("a job running on the pool", lambda: store.counts_by_state().get("running", 0) > 0, 60, 0.05)
        time.sleep(1.0)
    except TimeoutError:
        pass
    counts_at_kill = store.counts_by_state()
    t_kill = time.time()
    head = cluster.head_node
    head.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    cluster.head_node = None
    report["kill"] = {"at": t_kill, "took_s": round(time.time() - t_kill, 2), "store_counts": counts_at_kill,
                      "accepted_before": len(sub.accepted)}
    console.print(f"head SIGKILLed (GCS, raylet, allocator, QPU actor, Serve controller) with "
                  f"{counts_at_kill.get('running', 0)} running and {counts_at_kill.get('queued', 0)} queued")
    time.sleep(max(t_kill + down_s - time.time(), 0.0))
    t_back = time.time()
    cluster.add_node(**head_args, gcs_server_port=gcs_port)
    report["restart"] = {"at": t_back, "new_head": cluster.head_node.node_id,
                         "add_node_s": round(time.time() - t_back, 2)}
    console.print(f"new head started after {t_back - t_kill:.1f} s (add_node took {report['restart']['add_node_s']} s)")
    try:
        wait_until("the API ready again", lambda: ready.samples and ready.samples[-1][1] and
                   ready.samples[-1][0] > t_back, 180, 0.1)
        report["restart"]["ready_after_head_back_s"] = round(
            next(t for t, ok in ready.samples if ok and t > t_back) - t_back, 2)
    except TimeoutError as exc:
        report["restart"]["ready_error"] = str(exc)
    time.sleep(max(t_kill + submit_for_s - time.time(), 3.0))
    sub.stop.set()
    sub.join(timeout=120)
    ids = [a["id"] for a in sub.accepted]
    wait_done(store, ids, 240)
    ready.stop.set()
    alive.stop.set()
    ready.join()
    alive.join()

    # ---- what came back ----------------------------------------------------------------------
    down, d0, d1 = ready.longest_outage()
    h_down, _, _ = alive.longest_outage()
    rec = reconcile(store, ids)
    attempts = {jid: [(a["backend"], a["outcome"]) for a in store.attempts(jid)] for jid in ids}
    stats1 = _try(lambda: get_json(url, token, "/v1/admin/stats"))
    after = {"pool_job": _try(lambda: run_to_completion(url, token, body(0))),
             "qpu_job": _try(lambda: run_to_completion(url, token, body(3)))}
    backends = _try(lambda: get_json(url, token, "/v1/backends"))
    report["after"] = {
        **after, "allocator_pid": (stats1 or {}).get("pid"), "allocator_startup": (stats1 or {}).get("startup"),
        "pool_pid": _pool_pid(url, token, pool),
        "backends": [{k: b.get(k) for k in ("name", "pool", "healthy", "node_id")} for b in backends]
        if isinstance(backends, list) else backends}
    multi = {jid: a for jid, a in attempts.items() if len(a) > 1}
    report["jobs"] = {"accepted": len(ids), "refused": sub.refused, "client_retries": sub.retries,
                      "reconcile": rec, "with_more_than_one_attempt": multi,
                      "accepted_during_outage": sum(1 for a in sub.accepted if d0 and a["asked_at"] >= d0
                                                    and (d1 is None or a["asked_at"] <= d1))}
    report["summary"] = {
        "accepted": len(ids), "completed": rec["completed"], "lost": len(ids) - rec["completed"],
        "duplicated_results": rec["duplicated_results"], "api_downtime_s": round(down, 2),
        "healthz_downtime_s": round(h_down, 2), "head_down_s": round(t_back - t_kill, 2),
        "ready_after_head_back_s": report["restart"].get("ready_after_head_back_s"),
        "allocator_restarted": bool(stats1) and stats1.get("pid") != stats0.get("pid"),
        "recovered_jobs": ((stats1 or {}).get("startup") or {}).get("recovered_jobs"),
        "pool_survived": report["before"]["pool_pid"] is not None
        and report["before"]["pool_pid"] == report["after"]["pool_pid"],
        "qpu_job_after": "error" not in (after["qpu_job"] or {"error": 1}),
        "pool_job_after": "error" not in (after["pool_job"] or {"error": 1}),
        "goals": {"lost": 0, "duplicated_results": 0},
    }


def _pool_pid(url: str, token: str, pool: str) -> int | None:
    """The pool actor's process id, as the pool reports it (None if it does not answer)."""
    rows = _try(lambda: get_json(url, token, "/v1/admin/pools"))
    for p in (rows or []):
        if isinstance(p, dict) and p.get("name") == pool:
            return p.get("pid")
    return None


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded, the checks are the caller's
        return {"error": f"{type(exc).__name__}: {exc}"}


def print_table(out: dict[str, Any], console: Any) -> None:
    s = out.get("summary") or {}
    t = Table(title=f"head restart: {s.get('accepted', 0)} accepted jobs, head down {s.get('head_down_s')} s")
    for col in ("figure", "value", "goal"):
        t.add_column(col)
    t.add_row("lost", str(s.get("lost")), "0")
    t.add_row("duplicated results", str(s.get("duplicated_results")), "0")
    t.add_row("API downtime (/readyz) s", str(s.get("api_downtime_s")), "")
    t.add_row("replica-up downtime (/healthz) s", str(s.get("healthz_downtime_s")), "")
    t.add_row("ready after the new head started s", str(s.get("ready_after_head_back_s")), "")
    t.add_row("allocator restarted / jobs it recovered", f"{s.get('allocator_restarted')} / {s.get('recovered_jobs')}", "")
    t.add_row("pool actor survived", str(s.get("pool_survived")), "")
    t.add_row("QPU job / pool job after", f"{s.get('qpu_job_after')} / {s.get('pool_job_after')}", "True / True")
    console.print(t)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--deploy":
        _deploy_main()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--down", type=float, default=5.0, help="seconds between the head's death and its restart")
    ap.add_argument("--submit-for", type=float, default=20.0, help="seconds after the kill the client keeps submitting")
    ap.add_argument("--every", type=float, default=0.5, help="seconds between submitted jobs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    console = make_console()
    out = run(args.down, args.submit_for, args.every, console)
    if "summary" in out:
        print_table(out, console)
    write_json(args.json, out, console)
    if "summary" not in out:
        sys.exit(1)


if __name__ == "__main__":
    main()
