"""Security events in: ingest throughput per format (HTTP batch endpoint) and through the syslog listener.

What runs (loopback only, every part a real process):

* the API app (``create_app``) under **uvicorn** on 127.0.0.1 (``--workers`` processes sharing
  the port with SO_REUSEPORT, 1 by default; N stand for N Serve replicas) — not Ray Serve: this measures the event path
  (parse, store, answer), not Serve's proxy, which costs the same per request whatever the
  body (``benchmarks.serve_load`` measures that);
* the syslog listener (``integration.listener.start_in_thread``, TCP and UDP) in another process;
* this process: the client, generating realistic, varied records (vendors, products, signatures,
  severities, addresses, users, URLs, hashes; no two records alike, so none is a duplicate),
  then timing their delivery. Generation is not timed.

Per format, ``--batch`` records per ``POST /v1/events`` with ``--concurrency`` requests in
flight; throughput = records stored / wall time from the first request to the last answer
(every answer says "accepted" only after the commit). The tenant's rate limit is lifted
for the run (it would otherwise be what is measured). Listener: TCP with octet counting,
as fast as the socket takes it; UDP at an offered rate (``--udp-rate``, 10,000/s: UDP has no
back-pressure, so loss depends on the rate), then the store is polled until it stops
growing: throughput = events stored / time from the first send to the last commit, and UDP
loss = 1 − stored / sent.

    python -m benchmarks.events --json OUT [--records 40000] [--batch 2000] [--concurrency 2] [--workers 1]

JSON ``summary.events_per_s`` = {"cef", "leef", "syslog", "ocsf", "stix"} (goal ≥ 10,000/s for
cef and syslog); ``summary.server_cpu_us_per_event``, the same formats plus ``listener_tcp`` /
``listener_udp``: CPU of the API (listener) process per stored event, the figure that does not
move with the machine's other load (``summary.load_avg_1m`` says what that load was);
``syslog_listener_tcp_per_s``, ``syslog_listener_udp_per_s``,
``syslog_listener_udp_loss``; ``event_to_action_ms_p50`` (a real allocator acting on a rule) and
``sink_outage_lost`` / ``sink_outage_duplicated`` (a receiver down for ``--outage-s``), measured
by ``benchmarks/events_actions.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from benchmarks._common import make_console, write_json

TENANT = "bench"
GOALS = {"cef": 10_000.0, "syslog": 10_000.0}
CONTENT_TYPES = {"cef": "application/cef", "leef": "application/leef", "syslog": "application/syslog",
                 "ocsf": "application/ocsf+json", "stix": "application/stix+json"}


# ---- realistic records ---------------------------------------------------------------------------
_PRODUCTS = [("Palo Alto Networks", "PAN-OS", "10.2"), ("Fortinet", "FortiGate", "7.4"), ("Cisco", "ASA", "9.18"),
             ("CrowdStrike", "Falcon", "6.5"), ("Microsoft", "Defender", "4.18"), ("Suricata", "IDS", "7.0"),
             ("Zscaler", "ZIA", "6.2"), ("Check Point", "SmartDefense", "R81")]
_SIGS = [("4001", "Port scan detected"), ("5003", "SQL injection attempt"), ("6201", "Malware download blocked"),
         ("7104", "Brute force login"), ("8802", "C2 beacon"), ("1100", "Policy violation"),
         ("2301", "Suspicious PowerShell"), ("3307", "Data exfiltration suspected"), ("9001", "TLS anomaly")]
_USERS = ["alice", "bob", "carol", "dave", "eve", "mallory", "svc_backup", "admin", "j.smith", "k.lee"]
_HOSTS = ["web01", "web02", "db01", "fw-edge", "vpn-gw", "dc01", "mail", "k8s-node-3", "jump", "ids-sensor"]
_APPS = ["sshd", "sudo", "nginx", "postfix", "kernel", "systemd", "auditd", "openvpn", "named", "cron"]
_URLS = ["/admin/login.php", "/api/v1/users?id=1%27%20OR%201=1", "/wp-login.php", "/download/setup.exe",
         "/.env", "/cgi-bin/luci", "/index.html", "/owa/auth/logon.aspx"]
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _ip(rng: random.Random, private: bool) -> str:
    if private:
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    return f"{rng.choice((198, 203, 185, 45, 91))}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _hex(rng: random.Random, n: int) -> str:
    return "%0*x" % (n, rng.getrandbits(4 * n))


def _ts(rng: random.Random, i: int) -> tuple[str, float]:
    t = 1_748_736_000 + i * 0.013 + rng.random()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z", t


def gen_cef(rng: random.Random, i: int) -> str:
    vendor, product, version = rng.choice(_PRODUCTS)
    sig, name = rng.choice(_SIGS)
    _, t = _ts(rng, i)
    ext = [f"rt={int(t * 1000)}", f"src={_ip(rng, False)}", f"spt={rng.randrange(1024, 65535)}",
           f"dst={_ip(rng, True)}", f"dpt={rng.choice((22, 80, 443, 445, 3389, 8080))}",
           f"proto={rng.choice(('TCP', 'UDP'))}", f"act={rng.choice(('blocked', 'allowed', 'alert'))}"]
    if rng.random() < 0.6:
        ext.append(f"suser={rng.choice(_USERS)}")
    if rng.random() < 0.4:
        ext.append(f"request=https://{rng.choice(_HOSTS)}.example.com{rng.choice(_URLS)}")
    if rng.random() < 0.3:
        ext.append(f"fileHash={_hex(rng, 64)} fname=invoice_{i}.pdf.exe")
    ext.append(f"cnt={rng.randrange(1, 500)} externalId={i} msg={name} from {rng.choice(_HOSTS)} (seq {i})")
    return f"CEF:0|{vendor}|{product}|{version}|{sig}|{name}|{rng.randrange(0, 11)}|{' '.join(ext)}"


def gen_leef(rng: random.Random, i: int) -> str:
    vendor, product, version = rng.choice(_PRODUCTS)
    sig, name = rng.choice(_SIGS)
    attrs = [f"devTime={int(_ts(rng, i)[1] * 1000)}", f"src={_ip(rng, False)}",
             f"dst={_ip(rng, True)}", f"srcPort={rng.randrange(1024, 65535)}", f"dstPort={rng.choice((22, 443, 445))}",
             f"usrName={rng.choice(_USERS)}", f"sev={rng.randrange(1, 11)}", f"cat={name}", f"seq={i}"]
    if rng.random() < 0.5:
        return f"LEEF:1.0|{vendor}|{product}|{version}|{sig}|" + "\t".join(attrs)
    return f"LEEF:2.0|{vendor}|{product}|{version}|{sig}|^|" + "^".join(attrs)


def gen_syslog(rng: random.Random, i: int) -> str:
    iso, t = _ts(rng, i)
    host, app = rng.choice(_HOSTS), rng.choice(_APPS)
    pri = rng.randrange(4, 24) * 8 + rng.randrange(8)
    user, ip = rng.choice(_USERS), _ip(rng, False)
    msg = rng.choice([f"Failed password for {user} from {ip} port {rng.randrange(1024, 65535)} ssh2",
                      f"Accepted publickey for {user} from {ip} port {rng.randrange(1024, 65535)}",
                      f"{user} : TTY=pts/{rng.randrange(9)} ; PWD=/home/{user} ; USER=root ; COMMAND=/bin/bash",
                      f"{ip} - - \"GET {rng.choice(_URLS)} HTTP/1.1\" {rng.choice((200, 401, 403, 404))} "
                      f"{rng.randrange(100, 9000)}",
                      f"connection from {ip} refused: too many auth failures (seq {i})"])
    r = rng.random()
    if r < 0.5:   # RFC 5424, sometimes with structured data
        sd = (f'[origin ip="{_ip(rng, True)}"][meta sequenceId="{i}"]' if rng.random() < 0.5 else "-")
        return f"<{pri}>1 {iso} {host} {app} {rng.randrange(100, 60000)} {rng.choice(('AUTH', 'ACCESS', '-'))} {sd} {msg} #{i}"
    if r < 0.85:  # RFC 3164
        tm = time.gmtime(t)
        return (f"<{pri}>{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
                f"{host} {app}[{rng.randrange(100, 60000)}]: {msg} #{i}")
    return f"<{pri}>1 {iso} {host} arcsight - - - {gen_cef(rng, i)}"   # CEF inside syslog


def gen_ocsf(rng: random.Random, i: int) -> dict[str, Any]:
    vendor, product, version = rng.choice(_PRODUCTS)
    cls = rng.choice([(2004, 2, "Detection Finding"), (3002, 3, "Authentication"), (4001, 4, "Network Activity"),
                      (1007, 1, "Process Activity")])
    _, t = _ts(rng, i)
    ev: dict[str, Any] = {"class_uid": cls[0], "category_uid": cls[1], "class_name": cls[2],
                          "severity_id": rng.choice((1, 2, 3, 4, 5)), "time": int(t * 1000),
                          "activity_id": rng.randrange(1, 4), "message": f"{rng.choice(_SIGS)[1]} #{i}",
                          "metadata": {"version": "1.3.0", "uid": str(uuid.UUID(int=rng.getrandbits(128))),
                                       "product": {"vendor_name": vendor, "name": product, "version": version}},
                          "src_endpoint": {"ip": _ip(rng, False), "port": rng.randrange(1024, 65535)},
                          "dst_endpoint": {"ip": _ip(rng, True), "hostname": f"{rng.choice(_HOSTS)}.corp"}}
    if rng.random() < 0.5:
        ev["actor"] = {"user": {"name": rng.choice(_USERS)}}
    return ev


def gen_stix(rng: random.Random, i: int) -> dict[str, Any]:
    """One STIX object (bundled by the caller): indicators, sightings, malware, observed data."""
    def sid(kind: str) -> str:
        return f"{kind}--{uuid.UUID(int=rng.getrandbits(128), version=4)}"

    iso = _ts(rng, i)[0]
    iso = iso[:23] + "Z"
    kind = rng.choice(("indicator", "indicator", "malware", "sighting", "attack-pattern"))
    base = {"type": kind, "spec_version": "2.1", "id": sid(kind), "created": iso, "modified": iso}
    if kind == "indicator":
        return {**base, "name": f"Known bad {i}", "pattern_type": "stix", "valid_from": iso,
                "pattern": rng.choice([f"[ipv4-addr:value = '{_ip(rng, False)}']",
                                       f"[file:hashes.'SHA-256' = '{_hex(rng, 64)}']",
                                       f"[domain-name:value = 'c2-{i}.example.net']"])}
    if kind == "malware":
        return {**base, "name": f"Trojan.Gen.{i}", "is_family": False,
                "malware_types": [rng.choice(("trojan", "ransomware", "backdoor"))]}
    if kind == "sighting":
        return {**base, "sighting_of_ref": sid("indicator"), "count": rng.randrange(1, 50),
                "first_seen": iso, "last_seen": iso}
    return {**base, "name": f"T{1000 + rng.randrange(600)} technique {i}",
            "external_references": [{"source_name": "mitre-attack", "external_id": f"T{1000 + rng.randrange(600)}"}]}


def make_batches(fmt: str, records: int, batch: int, seed: int) -> list[tuple[bytes, int]]:
    """``(body, records)`` per request."""
    rng = random.Random(seed)
    out: list[tuple[bytes, int]] = []
    for start in range(0, records, batch):
        n = min(batch, records - start)
        idx = range(start, start + n)
        if fmt == "ocsf":
            body = json.dumps([gen_ocsf(rng, i) for i in idx]).encode()
        elif fmt == "stix":
            body = json.dumps({"type": "bundle", "id": f"bundle--{uuid.UUID(int=rng.getrandbits(128), version=4)}",
                               "objects": [gen_stix(rng, i) for i in idx]}).encode()
        else:
            gen: Callable[[random.Random, int], str] = {"cef": gen_cef, "leef": gen_leef, "syslog": gen_syslog}[fmt]
            body = "\n".join(gen(rng, i) for i in idx).encode()
        out.append((body, n))
    return out


# ---- the processes -------------------------------------------------------------------------------
def _settings(data_dir: str, **extra: Any) -> Any:
    from ray_qalloc.config import Settings

    events = {"rate_per_s": 1e9, "burst": 10**9, **extra}   # the rate limit lifted: throughput is measured
    return Settings(data_dir=data_dir, events=events)


def _serve_api(data_dir: str, port: int, profile: str | None) -> None:
    """One API process. Every process binds the port with SO_REUSEPORT and the kernel spreads
    connections over them: ``--workers N`` stands for N Serve replicas on one store."""
    import logging

    import uvicorn

    from ray_qalloc.api import create_app

    logging.getLogger("ray_qalloc").setLevel(logging.WARNING)
    app = create_app(_settings(data_dir), allocator=object())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if profile:
        import cProfile
        import signal

        prof = cProfile.Profile()
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
        prof.enable()
        server.run(sockets=[sock])
        prof.disable()
        prof.dump_stats(f"{profile}.{os.getpid()}")
    else:
        server.run(sockets=[sock])


def _serve_listener(data_dir: str, ports: Any, stop: Any) -> None:
    from ray_qalloc.integration.listener import start_in_thread

    settings = _settings(data_dir, syslog={"tcp_port": 0, "udp_port": 0, "tenant": TENANT,
                                           "max_message_bytes": 65536})
    running = start_in_thread(settings)
    assert running is not None
    _force_rcvbuf(running)
    ports.put((running.tcp_port, running.udp_port))
    stop.wait()
    running.stop()


def _force_rcvbuf(running: Any, size: int = 16 * 1024 * 1024) -> None:
    """As root, past net.core.rmem_max (SO_RCVBUFFORCE); otherwise the listener's own request stands."""
    udp = running.listener._udp
    sock = udp.get_extra_info("socket") if udp is not None else None
    if sock is not None and hasattr(socket, "SO_RCVBUFFORCE"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, size)
        except OSError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the API did not start")


# ---- measuring -----------------------------------------------------------------------------------
async def _post_all(url: str, headers: dict[str, str], fmt: str, batches: list[tuple[bytes, int]],
                    concurrency: int) -> dict[str, Any]:
    queue = list(enumerate(batches))
    stored = dups = rejected = 0
    errors: dict[str, int] = {}
    latencies: list[float] = []
    h = {**headers, "Content-Type": CONTENT_TYPES[fmt]}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal stored, dups, rejected
        while queue:
            _, (body, _n) = queue.pop(0)
            t = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/events", content=body, headers=h)
                latencies.append(time.perf_counter() - t)
                if r.status_code in (200, 207):
                    out = r.json()
                    stored += out["accepted"]
                    dups += out["duplicates"]
                    rejected += out["rejected"]
                else:
                    errors[f"HTTP {r.status_code}"] = errors.get(f"HTTP {r.status_code}", 0) + 1
            except Exception as exc:  # every failure counts
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    records = sum(n for _, n in batches)
    lat = sorted(latencies)
    return {"format": fmt, "records": records, "requests": len(batches), "stored": stored, "duplicates": dups,
            "rejected": rejected, "errors": errors, "seconds": seconds,
            "events_per_s": stored / seconds if seconds else 0.0,
            "request_p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
            "request_max_ms": lat[-1] * 1e3 if lat else None}


def _cpu(pid: int) -> float:
    """CPU seconds of a process and its children (uvicorn's workers)."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _per_event(cpu_s: float, events: int) -> float | None:
    """Server CPU µs per stored event: the figure that does not move with the machine's other load
    (events/s does: client and server share the cores with whatever else runs)."""
    return cpu_s / events * 1e6 if events else None


def _count(store: Any) -> int:
    return store.count(TENANT)


def _wait_stored(store: Any, target: int, t0: float, settle_s: float, timeout: float) -> tuple[int, float]:
    """Poll until ``target`` events are stored or the count stops growing for ``settle_s``;
    returns (count, seconds from t0 to when the count last grew)."""
    last, last_change = _count(store), time.perf_counter()
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if last >= target:
            break
        time.sleep(0.02)
        n = _count(store)
        if n != last:
            last, last_change = n, time.perf_counter()
        elif time.perf_counter() - last_change > settle_s:
            break
    return last, last_change - t0


def _listener_tcp(port: int, store: Any, messages: list[bytes]) -> dict[str, Any]:
    base = _count(store)
    frames = b"".join(str(len(m)).encode() + b" " + m for m in messages)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(frames)
    sent_s = time.perf_counter() - t0
    n, seconds = _wait_stored(store, base + len(messages), t0, settle_s=5.0, timeout=300.0)
    stored = n - base
    return {"sent": len(messages), "stored": stored, "send_s": sent_s, "seconds": seconds,
            "events_per_s": stored / seconds if seconds > 0 else 0.0}


def _listener_udp(port: int, store: Any, messages: list[bytes], rate: float) -> dict[str, Any]:
    """Datagrams at an offered ``rate`` a second (in 5 ms slices), as a busy forwarder sends."""
    base = _count(store)
    t0 = time.perf_counter()
    per_slice = max(1, int(rate * 0.005))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for k in range(0, len(messages), per_slice):
            for m in messages[k:k + per_slice]:
                s.sendto(m, ("127.0.0.1", port))
            ahead = t0 + (k + per_slice) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    sent_s = time.perf_counter() - t0
    n, seconds = _wait_stored(store, base + len(messages), t0, settle_s=2.0, timeout=300.0)
    stored = n - base
    return {"sent": len(messages), "stored": stored, "send_s": sent_s, "seconds": seconds,
            "send_rate_per_s": len(messages) / sent_s if sent_s else 0.0,
            "events_per_s": stored / seconds if seconds > 0 else 0.0,
            "loss": 1.0 - stored / len(messages) if messages else 0.0}


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from ray_qalloc.integration.eventstore import EventStore
    from ray_qalloc.tenants import TenantStore

    load_before = os.getloadavg()
    data_dir = tempfile.mkdtemp(prefix="qalloc-events-bench-")
    ctx = mp.get_context("spawn")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[Any] = []
    results: dict[str, Any] = {}
    try:
        tenants = TenantStore(_settings(data_dir).resolved_store_url)
        headers = {"Authorization": f"Bearer {tenants.create_token(TENANT)}"}
        tenants.close()
        apis = [ctx.Process(target=_serve_api, args=(data_dir, port, args.profile), daemon=True)
                for _ in range(args.workers)]
        for api in apis:
            api.start()
        procs += apis
        _wait_http(url)
        console.print(f"API (uvicorn, {args.workers} worker process(es)) on {url}; data in {data_dir}")
        sizes = {"cef": args.records, "leef": args.records, "syslog": args.records,
                 "ocsf": args.json_records, "stix": args.stix_records}
        for k, fmt in enumerate(args.formats):
            batches = make_batches(fmt, sizes[fmt], args.batch if fmt != "stix" else args.stix_batch, seed=k + 1)
            warm = make_batches(fmt, min(args.batch, 500), min(args.batch, 500), seed=100 + k)
            asyncio.run(_post_all(url, headers, fmt, warm, 1))   # imports, caches, the first store write
            cpu0 = sum(_cpu(a.pid) for a in apis)
            res = asyncio.run(_post_all(url, headers, fmt, batches, args.concurrency))
            res["server_cpu_s"] = sum(_cpu(a.pid) for a in apis) - cpu0
            res["server_cpu_us_per_event"] = _per_event(res["server_cpu_s"], res["stored"])
            results[fmt] = res
            console.print(f"  {fmt:>6}: {res['stored']:>7} stored in {res['seconds']:6.2f} s = "
                          f"{res['events_per_s']:8.0f}/s ({res['rejected']} rejected, errors {res['errors'] or 0})")
        for api in apis:
            api.terminate()
            api.join(30)

        ports_q, stop = ctx.Queue(), ctx.Event()
        lp = ctx.Process(target=_serve_listener, args=(data_dir, ports_q, stop), daemon=True)
        lp.start()
        procs.append(lp)
        tcp_port, udp_port = ports_q.get(timeout=60)
        console.print(f"syslog listener (1 process) on tcp {tcp_port}, udp {udp_port}")
        store = EventStore(_settings(data_dir).resolved_store_url)
        rng = random.Random(7)
        tcp_msgs = [gen_syslog(rng, 10_000_000 + i).encode() for i in range(args.listener_records)]
        udp_msgs = [gen_syslog(rng, 20_000_000 + i).encode() for i in range(args.udp_records)]
        _listener_tcp(tcp_port, store, [gen_syslog(rng, 30_000_000 + i).encode() for i in range(500)])   # warm-up
        cpu0 = _cpu(lp.pid)
        results["listener_tcp"] = _listener_tcp(tcp_port, store, tcp_msgs)
        cpu1 = _cpu(lp.pid)
        results["listener_tcp"]["server_cpu_us_per_event"] = _per_event(cpu1 - cpu0, results["listener_tcp"]["stored"])
        console.print(f"  listener tcp: {results['listener_tcp']['stored']} stored, "
                      f"{results['listener_tcp']['events_per_s']:.0f}/s")
        results["listener_udp"] = _listener_udp(udp_port, store, udp_msgs, args.udp_rate)
        results["listener_udp"]["server_cpu_us_per_event"] = _per_event(_cpu(lp.pid) - cpu1,
                                                                        results["listener_udp"]["stored"])
        console.print(f"  listener udp: {results['listener_udp']['stored']}/{len(udp_msgs)} stored, "
                      f"{results['listener_udp']['events_per_s']:.0f}/s, loss {results['listener_udp']['loss']:.2%}")
        store.close()
        stop.set()
        lp.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
        shutil.rmtree(data_dir, ignore_errors=True)
    load_after = os.getloadavg()
    from benchmarks.events_actions import event_to_action, sink_outage

    folder = Path(tempfile.mkdtemp(prefix="qalloc-events-act-"))
    try:
        console.print(f"event → action: {args.actions} events on a real allocator (local Ray), one rule")
        results["event_to_action"] = event_to_action(folder, args.actions)
        console.print(f"sink outage: a webhook receiver down for {args.outage_s:.0f} s (jobs, audit, alerts)")
        results["sink_outage"] = sink_outage(folder, args.outage_s)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    eps = {fmt: results[fmt]["events_per_s"] if fmt in results else None for fmt in CONTENT_TYPES}
    summary = {
        "events_per_s": eps,
        "server_cpu_us_per_event": {**{fmt: results[fmt]["server_cpu_us_per_event"] if fmt in results else None
                                       for fmt in CONTENT_TYPES},
                                    "listener_tcp": results["listener_tcp"]["server_cpu_us_per_event"],
                                    "listener_udp": results["listener_udp"]["server_cpu_us_per_event"]},
        "load_avg_1m": {"before": load_before[0], "after_ingest": load_after[0]},
        "syslog_listener_tcp_per_s": results["listener_tcp"]["events_per_s"],
        "syslog_listener_udp_per_s": results["listener_udp"]["events_per_s"],
        "syslog_listener_udp_loss": results["listener_udp"]["loss"],
        "goals_met": {fmt: (eps[fmt] or 0.0) >= goal for fmt, goal in GOALS.items()},
        "event_to_action_ms_p50": results["event_to_action"]["p50_ms"],
        "event_to_action_ms_p95": results["event_to_action"]["p95_ms"],
        "sink_outage_lost": results["sink_outage"]["lost"],
        "sink_outage_duplicated": results["sink_outage"]["duplicated"],
        "sink_outage_redeliveries": results["sink_outage"]["redeliveries"],
        "sink_outage_caught_up_s": results["sink_outage"]["caught_up_s"],
        "syslog_listener_udp_offered_per_s": args.udp_rate,
        "batch": args.batch, "concurrency": args.concurrency, "api_workers": args.workers,
    }
    return {"benchmark": "events",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "conditions": "client, API server (uvicorn, one process, SQLite WAL store on local disk) and the "
                          "syslog listener share this machine's cores; records are generated, all distinct",
            "server": "the app from ray_qalloc.api.create_app under uvicorn on 127.0.0.1 (not Ray Serve)",
            "goals": {f"{fmt}_events_per_s_min": g for fmt, g in GOALS.items()},
            "notes": {"event_to_action": "a committed event until the allocator shows the action in force "
                                         "(benchmarks/events_actions.py); threat.poll_s bounds it from below",
                      "sink_outage": "lost = committed records never received; duplicated = one record under two "
                                     "keys; redeliveries = the same key again (dropped by the receiver's dedup)"},
            "results": results, "summary": summary}


def print_table(result: dict[str, Any], console: Console) -> None:
    r, s = result["results"], result["summary"]
    t = Table(title=f"Security events in: POST /v1/events ×{s['batch']} records, {s['concurrency']} in flight, "
                    f"{s['api_workers']} API process(es); syslog listener (1 process)")
    for col in ("path", "records", "stored", "rejected", "seconds", "events/s", "goal", "server CPU µs/event",
                "p50 ms/request"):
        t.add_column(col, justify="right")

    def mark(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]missed[/]"

    for fmt in CONTENT_TYPES:
        if fmt not in r:
            continue
        x = r[fmt]
        goal = GOALS.get(fmt)
        t.add_row(f"HTTP {fmt}", str(x["records"]), str(x["stored"]), str(x["rejected"]), f"{x['seconds']:.2f}",
                  f"{x['events_per_s']:.0f}", f"≥ {goal:,.0f} {mark(x['events_per_s'] >= goal)}" if goal else "",
                  f"{x['server_cpu_us_per_event']:.0f}" if x["server_cpu_us_per_event"] else "-",
                  f"{x['request_p50_ms']:.0f}" if x["request_p50_ms"] else "-")
    for name in ("listener_tcp", "listener_udp"):
        x = r[name]
        loss = f" at {s['syslog_listener_udp_offered_per_s']:,.0f}/s offered (loss {x['loss']:.1%})" if "loss" in x else ""
        t.add_row(f"syslog {name.split('_')[1].upper()}{loss}", str(x["sent"]), str(x["stored"]), "",
                  f"{x['seconds']:.2f}", f"{x['events_per_s']:.0f}", "",
                  f"{x['server_cpu_us_per_event']:.0f}" if x.get("server_cpu_us_per_event") else "-", "")
    console.print(t)
    a, o = r["event_to_action"], r["sink_outage"]
    console.print(f"event → action: p50 {a['p50_ms']:.0f} ms, p95 {a['p95_ms']:.0f} ms over {a['acted']}/{a['events']} "
                  f"events (rules read every {a['poll_s']} s)" if a["p50_ms"] is not None else "event → action: none acted")
    console.print(f"sink down {o['down_s']:.0f} s: committed {o['committed']}, lost {o['lost']} (goal 0 "
                  f"{mark(o['lost'] == 0)}), duplicated {o['duplicated']} (goal 0 {mark(o['duplicated'] == 0)}), "
                  f"{o['redeliveries']} redelivered (same key), caught up {o['caught_up_s']:.1f} s after it came back")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--records", type=int, default=40_000, help="records per line format (cef, leef, syslog)")
    ap.add_argument("--json-records", type=int, default=20_000, help="OCSF records")
    ap.add_argument("--stix-records", type=int, default=5_000, help="STIX objects")
    ap.add_argument("--batch", type=int, default=2_000, help="records per POST")
    ap.add_argument("--stix-batch", type=int, default=500, help="objects per STIX bundle")
    ap.add_argument("--concurrency", type=int, default=2, help="POSTs in flight")
    ap.add_argument("--listener-records", type=int, default=40_000, help="syslog messages over TCP")
    ap.add_argument("--udp-records", type=int, default=30_000, help="syslog datagrams over UDP")
    ap.add_argument("--udp-rate", type=float, default=10_000.0, help="datagrams a second offered over UDP")
    ap.add_argument("--workers", type=int, default=1, help="API processes on the port (as Serve replicas)")
    ap.add_argument("--formats", nargs="+", default=list(CONTENT_TYPES), choices=list(CONTENT_TYPES))
    ap.add_argument("--profile", help="cProfile the API server into this file")
    ap.add_argument("--actions", type=int, default=30, help="events for the event → action latency")
    ap.add_argument("--outage-s", type=float, default=60.0, help="how long the SIEM receiver is down")
    args = ap.parse_args()
    console = make_console()
    result = run(args, console)
    print_table(result, console)
    write_json(args.json, result, console)


if __name__ == "__main__":
    main()
