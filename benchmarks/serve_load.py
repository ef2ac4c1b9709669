"""HTTP API under load: POST /v1/jobs against a trivial Serve endpoint, on the same Ray.

Why a trivial endpoint beside the API: Serve's own HTTP proxy and router cost a fixed
amount per request on this machine (~200 req/s at concurrency 8 on 2 cores); the question
is how much of the remaining budget the submit path (auth, quota check, intake, allocator
call, store read) spends. Both are driven by the same client with the same concurrency, in
alternating rounds, so background load (the submitted jobs running on the simulators, which
compete for the same 2 cores — the honest condition) falls on both alike.

One run, loopback only:

* local Ray (num_cpus=2), ray-qalloc's allocator and pool, the API on Serve (app ``qalloc``,
  route ``/``) and a trivial FastAPI app (app ``trivial``, route ``/trivial``, 0 CPUs, the
  API's ``max_ongoing_requests``) that parses the same JSON body and answers a small JSON;
* warm-up, then ``--rounds`` alternating phases of trivial POST and submit POST (a Bell job,
  16 shots, priority ``batch``) at ``--concurrency`` for ``--seconds`` in all per kind;
* the batch path: ``--batch-requests`` POST /v1/jobs:batch of ``--batch-size`` jobs each.

    python -m benchmarks.serve_load --json OUT [--seconds 16] [--concurrency 8] [--batch-size 500]

JSON ``summary``: ``submit_rps``, ``trivial_rps``, ``submit_vs_trivial`` (goal ≥ 0.7),
``submit_p50_ms``, ``submit_p99_ms``, ``batch_jobs_per_s`` (goal ≥ 2,000), ``errors``
(every non-2xx answer, exception and refused batch item; goal 0). Beside them, CPU time per
answered request of every process of the run, by role (proxy, replicas, allocator, simulator
actors, this client; read with psutil around each phase), and its totals in ``summary``: on
one machine the ratio is set by CPU, and this says which process spends it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from benchmarks._common import make_console, write_json

BELL = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\n'
        "measure q -> c;\n")
TENANT = "bench"
INGRESS = "QAllocIngress"   # the deployment name in ray_qalloc.serving
GOALS = {"submit_vs_trivial": 0.7, "batch_jobs_per_s": 2_000.0, "errors": 0}


@dataclass
class Phase:
    """What one kind of request gave over all of its rounds."""

    name: str
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ok: int = 0
    errors: Counter = field(default_factory=Counter)   # "HTTP 503" / "ReadTimeout" -> count
    cpu_s: Counter = field(default_factory=Counter)    # role -> CPU seconds during this kind's rounds

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {"requests": len(lat), "ok": self.ok, "errors": self.n_errors, "error_kinds": dict(self.errors),
                "seconds": self.seconds, "rps": self.ok / self.seconds if self.seconds else 0.0,
                "p50_ms": _pct(lat, 50) * 1e3, "p90_ms": _pct(lat, 90) * 1e3, "p99_ms": _pct(lat, 99) * 1e3,
                "mean_ms": statistics.fmean(lat) * 1e3 if lat else 0.0,
                "cpu_ms_per_ok_request": {k: v * 1e3 / self.ok for k, v in self.cpu_s.most_common() if self.ok},
                "cpu_util_cores": sum(self.cpu_s.values()) / self.seconds if self.seconds else 0.0}


def _pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def free_port() -> int:
    """A port nobody listens on now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _label(proc: "psutil.Process") -> str:
    """A process's role: Ray workers set their title to ``ray::Class.method``; keep the class."""
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return "?"
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    if proc.pid == os.getpid():
        return "client (this process)"
    return Path(title).name if "python" not in Path(title).name else " ".join(Path(c).name for c in cmd[:3])


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and everything under it (the local Ray's processes)."""
    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = (_label(proc), t.user + t.system)
        except (psutil.Error, OSError):
            continue
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> Counter:
    """CPU seconds spent between two snapshots, summed per role (processes born in between count whole)."""
    out: Counter = Counter()
    for pid, (label, t) in after.items():
        out[label] += t - before.get(pid, (label, 0.0))[1]
    return out


def _trivial_app(max_ongoing: int) -> Any:
    """A Serve FastAPI ingress doing nothing but parse the body: Serve's own cost per request."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @app.post("/")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "fields": len(body)}

    @app.get("/")
    async def ping() -> dict[str, str]:
        return {"status": "ok"}

    @serve.deployment(name="Trivial", num_replicas=1, max_ongoing_requests=max_ongoing,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Trivial:
        """Same replica shape as the API's ingress (no CPU reserved, same request limit)."""

    return Trivial.bind()


async def _drive(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str],
                 concurrency: int, seconds: float, phase: Phase | None) -> None:
    """``concurrency`` closed-loop workers POST ``body`` until ``seconds`` pass; ``phase=None`` is warm-up."""
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                r = await client.post(url, json=body, headers=headers)
                ok, kind = 200 <= r.status_code < 300, f"HTTP {r.status_code}"
            except Exception as exc:  # every failure counts, whatever it is
                ok, kind = False, type(exc).__name__
            if phase is not None:
                phase.latencies_s.append(time.perf_counter() - t)
                if ok:
                    phase.ok += 1
                else:
                    phase.errors[kind] += 1

    cpu0, t0 = cpu_snapshot(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if phase is not None:
        phase.seconds += time.perf_counter() - t0
        phase.cpu_s.update(cpu_delta(cpu0, cpu_snapshot()))


async def _batches(client: httpx.AsyncClient, url: str, headers: dict[str, str], size: int, requests: int,
                   shots: int, console: Console) -> dict[str, Any]:
    """Sequential batch POSTs: jobs accepted per second of wall time, and per-request times."""
    body = {"jobs": [{"qasm": BELL, "shots": shots, "priority": "batch", "id": f"b{i}"} for i in range(size)]}
    times: list[float] = []
    accepted = refused = 0
    errors: Counter = Counter()
    for k in range(requests):
        t = time.perf_counter()
        try:
            r = await client.post(url, json=body, headers=headers, timeout=180.0)
            dt = time.perf_counter() - t
            if 200 <= r.status_code < 300:
                out = r.json()
                accepted += out["accepted"]
                refused += out["refused"]
                for item in out["jobs"]:
                    if item.get("error"):
                        errors[f"refused {item['error']['code']}"] += 1
            else:
                errors[f"HTTP {r.status_code}"] += 1
        except Exception as exc:
            dt = time.perf_counter() - t
            errors[type(exc).__name__] += 1
        times.append(dt)
        console.print(f"  batch {k + 1}/{requests}: {size} jobs in {dt * 1e3:.0f} ms")
    total = sum(times)
    return {"batch_size": size, "requests": requests, "accepted": accepted, "refused": refused,
            "errors": sum(errors.values()), "error_kinds": dict(errors), "seconds": total,
            "request_ms": [t * 1e3 for t in times],
            "jobs_per_s": accepted / total if total else 0.0}


async def _load(api_url: str, trivial_url: str, headers: dict[str, str], args: argparse.Namespace,
                console: Console) -> dict[str, Any]:
    job = {"qasm": BELL, "shots": args.shots, "priority": "batch"}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)) as client:
        console.print(f"warm-up: {args.warmup:g} s per endpoint")
        await _drive(client, trivial_url, job, {}, args.concurrency, args.warmup, None)
        await _drive(client, f"{api_url}/v1/jobs", job, headers, args.concurrency, args.warmup, None)
        trivial, submit = Phase("trivial"), Phase("submit")
        per_round = args.seconds / args.rounds
        for r in range(args.rounds):
            # alternate which goes first so a drift in background load falls on both alike
            order = [(trivial, trivial_url, {}), (submit, f"{api_url}/v1/jobs", headers)]
            if r % 2:
                order.reverse()
            for phase, url, hdrs in order:
                n0, e0 = phase.ok, phase.n_errors
                await _drive(client, url, job, hdrs, args.concurrency, per_round, phase)
                console.print(f"round {r + 1}/{args.rounds} {phase.name:>7}: {(phase.ok - n0) / per_round:7.1f} req/s"
                              f", {phase.n_errors - e0} errors")
        console.print(f"batch path: {args.batch_requests} × {args.batch_size} jobs")
        batch = await _batches(client, f"{api_url}/v1/jobs:batch", headers, args.batch_size, args.batch_requests,
                               args.shots, console)
    return {"trivial": trivial.summary(), "submit": submit.summary(), "batch": batch}


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    import ray
    from ray import serve

    from ray_qalloc import connect, serving
    from ray_qalloc.tenants import Quota, TenantStore

    data_dir = Path(tempfile.mkdtemp(prefix="qalloc-serve-bench-"))
    ray_tmp = tempfile.mkdtemp(prefix="qr", dir="/tmp")   # Ray's unix sockets need a short path
    t0 = time.perf_counter()
    console.print("starting Ray, the allocator and Serve …")
    qa = connect(data_dir=data_dir, num_cpus=2, ray_temp_dir=ray_tmp)
    tenants: TenantStore | None = None
    try:
        settings = qa.settings
        api_url = serving.start(settings, host="127.0.0.1", port=free_port())
        serve.run(_trivial_app(settings.api.max_ongoing_requests), name="trivial", route_prefix="/trivial",
                  blocking=False)
        startup_s = time.perf_counter() - t0
        console.print(f"up in {startup_s:.1f} s: API {api_url}/, trivial {api_url}/trivial")
        tenants = TenantStore(settings.resolved_store_url)
        tenants.set_quota(TENANT, Quota(max_active_jobs=10**7, shots_per_day=10**12))
        headers = {"Authorization": f"Bearer {tenants.create_token(TENANT)}"}
        t_load = time.perf_counter()
        out = asyncio.run(_load(api_url, f"{api_url}/trivial/", headers, args, console))
        load_s = time.perf_counter() - t_load
        counts = qa.stats()   # queue and job counts after the load: how far the simulators lagged
    finally:
        if tenants is not None:
            tenants.close()
        try:
            serve.delete("trivial")
        except Exception:
            pass
        serving.stop()
        qa.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    tr, sb, bt = out["trivial"], out["submit"], out["batch"]
    summary = {
        "submit_rps": sb["rps"], "trivial_rps": tr["rps"],
        "submit_vs_trivial": sb["rps"] / tr["rps"] if tr["rps"] else 0.0,
        "submit_p50_ms": sb["p50_ms"], "submit_p99_ms": sb["p99_ms"],
        "trivial_p50_ms": tr["p50_ms"], "trivial_p99_ms": tr["p99_ms"],
        "batch_jobs_per_s": bt["jobs_per_s"],
        # where the gap comes from: CPU per answered request over all processes, and the share of
        # a submit that goes to running the job (allocator and simulator actors), not to the API
        "trivial_cpu_ms_per_request": sum(tr["cpu_ms_per_ok_request"].values()),
        "submit_cpu_ms_per_request": sum(sb["cpu_ms_per_ok_request"].values()),
        "submit_cpu_ms_running_jobs": sum(v for k, v in sb["cpu_ms_per_ok_request"].items()
                                          if k in ("ray::Allocator", "ray::BackendActor")),
        "submit_cpu_ms_api_replica": sb["cpu_ms_per_ok_request"].get(f"ray::ServeReplica:qalloc:{INGRESS}", 0.0),
        "trivial_cpu_ms_replica": tr["cpu_ms_per_ok_request"].get("ray::ServeReplica:trivial:Trivial", 0.0),
        "errors": sb["errors"] + tr["errors"] + bt["errors"],
        "concurrency": args.concurrency, "seconds_per_kind": args.seconds, "rounds": args.rounds,
        "batch_size": args.batch_size, "shots": args.shots, "startup_s": startup_s, "load_s": load_s,
    }
    return {"benchmark": "serve_load",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "conditions": "client, Serve proxy, replicas, allocator and simulators share this machine's cores; "
                          "submitted jobs run in the background during the measurement",
            "goals": {"submit_vs_trivial_min": GOALS["submit_vs_trivial"],
                      "batch_jobs_per_s_min": GOALS["batch_jobs_per_s"], "errors_max": GOALS["errors"]},
            "phases": out, "allocator_stats": counts, "summary": summary}


def print_table(result: dict[str, Any], console: Console) -> None:
    s, ph = result["summary"], result["phases"]
    t = Table(title=f"Serve load: concurrency {s['concurrency']}, {s['seconds_per_kind']:g} s per kind "
                    f"in {s['rounds']} rounds")
    for col in ("path", "req/s", "ratio", "p50 ms", "p90 ms", "p99 ms", "requests", "errors"):
        t.add_column(col, justify="right")
    tr = ph["trivial"]
    for name, p in (("trivial POST", tr), ("POST /v1/jobs", ph["submit"])):
        t.add_row(name, f"{p['rps']:.1f}", f"{p['rps'] / tr['rps']:.2f}" if tr["rps"] else "-",
                  f"{p['p50_ms']:.1f}", f"{p['p90_ms']:.1f}", f"{p['p99_ms']:.1f}", str(p["requests"]),
                  str(p["errors"]))
    b = ph["batch"]
    t.add_row(f"POST /v1/jobs:batch ×{b['batch_size']}", f"{b['requests'] / b['seconds']:.2f}" if b["seconds"] else "-",
              "", f"{statistics.median(b['request_ms']):.0f}" if b["request_ms"] else "-", "", "",
              str(b["requests"]), str(b["errors"]))
    console.print(t)
    c = Table(title="CPU ms per answered request, by process role (all roles share 2 cores)")
    for col in ("role", "trivial", "submit", "submit − trivial"):
        c.add_column(col, justify="right")
    tc, sc = tr["cpu_ms_per_ok_request"], ph["submit"]["cpu_ms_per_ok_request"]
    for role in sorted(set(tc) | set(sc), key=lambda k: -sc.get(k, 0.0)):
        triv, sub = tc.get(role, 0.0), sc.get(role, 0.0)
        if max(triv, sub) >= 0.05:
            c.add_row(role, f"{triv:.2f}", f"{sub:.2f}", f"{sub - triv:+.2f}")
    c.add_row("[b]total[/]", f"{sum(tc.values()):.2f}", f"{sum(sc.values()):.2f}",
              f"{sum(sc.values()) - sum(tc.values()):+.2f}")
    console.print(c)
    console.print(f"cores busy: trivial {tr['cpu_util_cores']:.2f}, submit {ph['submit']['cpu_util_cores']:.2f} "
                  f"(of {os.cpu_count()})")

    def mark(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]missed[/]"

    console.print(f"submit_vs_trivial = {s['submit_vs_trivial']:.2f} (goal ≥ {GOALS['submit_vs_trivial']}) "
                  f"{mark(s['submit_vs_trivial'] >= GOALS['submit_vs_trivial'])}")
    console.print(f"batch_jobs_per_s  = {s['batch_jobs_per_s']:.0f} (goal ≥ {GOALS['batch_jobs_per_s']:.0f}) "
                  f"{mark(s['batch_jobs_per_s'] >= GOALS['batch_jobs_per_s'])}")
    console.print(f"errors            = {s['errors']} (goal {GOALS['errors']}) {mark(s['errors'] <= GOALS['errors'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--seconds", type=float, default=16.0, help="measured seconds per kind (trivial, submit)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds the seconds are split into")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per endpoint")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--batch-size", type=int, default=500, help="jobs per POST /v1/jobs:batch")
    ap.add_argument("--batch-requests", type=int, default=4, help="batch POSTs to time")
    ap.add_argument("--shots", type=int, default=16, help="shots per job")
    args = ap.parse_args()
    console = make_console()
    result = run(args, console)
    print_table(result, console)
    write_json(args.json, result, console)


if __name__ == "__main__":
    main()
