"""The two measurements of ``benchmarks.events`` beyond ingest: event → action latency on a
real allocator, and delivery to a SIEM sink that is down for a while.

* **event → action**: a local Ray with the real allocator actor (``ray_qalloc.connect``), a
  threat rule set live (boost the sending tenant); each event is committed to the event store as
  the API commits it, and the clock runs until the allocator's view (``threat_actions``, one Ray
  call) shows the action in force. One new tenant per event, so each event makes a new action.
  What it measures: the rules' poll (``threat.poll_s``), the read, the decision, the audited
  commit and the apply.
* **sink outage**: a signed webhook sink subscribed to alerts, jobs and audit; the receiver is
  down for ``down_s`` while job transitions, configuration changes and alerts are committed,
  then comes back. ``lost`` = records committed and never received; ``duplicated`` = one record
  received under two keys (what dedup by key cannot remove); redeliveries (the same key again,
  which the receiver's dedup drops) are reported beside.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SECRET = "bench-secret-0123456789"
CEF = "CEF:0|Acme|EDR|3.1|77|ransom note written by svc.exe|10|src=10.2.3.{i} dhost=lab-{i}"


def event_to_action(folder: Path, n: int = 30) -> dict[str, Any]:
    import ray

    from ray_qalloc import connect
    from ray_qalloc.integration import parse_records
    from ray_qalloc.integration.eventstore import EventStore

    qa = connect(data_dir=folder / "qalloc", num_cpus=2, ray_temp_dir=str(folder / "ray"))
    try:
        rule = {"name": "ransomware", "match": {"severity_min": 5, "message_contains": "ransom"},
                "action": {"kind": "boost", "to": "high", "for_s": 600}}
        ray.get(qa.allocator.set_config.remote({"threat.rules": [rule]}, "bench", []))
        store = EventStore(qa.settings.resolved_store_url)
        time.sleep(1.0)                  # the rule engine's first read sets its position to now
        lat = []
        for i in range(n):
            tenant = f"site{i:03d}"
            ev = parse_records(CEF.format(i=i % 250), "application/cef", tenant=tenant)
            t0 = time.perf_counter()
            store.add_many(ev)           # committed: what POST /v1/events does before answering
            want = f"rule:ransomware:{tenant}"
            deadline = t0 + 30
            while time.perf_counter() < deadline:
                view = ray.get(qa.allocator.threat_actions.remote())
                if any(a["id"] == want for a in view["actions"]):
                    lat.append((time.perf_counter() - t0) * 1e3)
                    break
                time.sleep(0.002)
            time.sleep(0.05)
        poll = qa.settings.threat.poll_s
        store.close()
    finally:
        qa.shutdown()
        ray.shutdown()
    lat.sort()
    return {"events": n, "acted": len(lat), "poll_s": poll,
            "p50_ms": statistics.median(lat) if lat else None,
            "p95_ms": lat[int(0.95 * (len(lat) - 1))] if lat else None, "max_ms": max(lat) if lat else None}


class _Receiver:
    """A webhook receiver on loopback that can be down; records every request's key and body."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.got: list[tuple[str, str, dict[str, Any]]] = []     # (key, record kind, body)
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/siem"

    def up(self) -> None:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Idempotency-Key") or body.get("key", "")
                with rx._lock:
                    rx.got.append((key, self.headers.get("X-Qalloc-Record", "alert"), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def sink_outage(folder: Path, down_s: float = 60.0) -> dict[str, Any]:
    import sqlalchemy as sa

    from ray_qalloc.adminstate import AdminState, admin_audit
    from ray_qalloc.alerts.engine import MemoryUsage, Observations
    from ray_qalloc.alerts.service import AlertService
    from ray_qalloc.config import AlertSettings
    from ray_qalloc.jobs import Intent, Priority, PreparedJob, new_job_id
    from ray_qalloc.store import JobStore, transitions_table

    rx = _Receiver()                 # down from the start
    store = JobStore(f"sqlite:///{folder / 'outage.db'}")
    admin = AdminState(store.engine)
    settings = AlertSettings(
        rules=[{"name": "mem", "kind": "node_memory", "params": {"threshold": 0.9},
                "rate_limit": {"max_notifications": 10_000, "window_s": 60}}],
        sinks={"siem": {"type": "webhook", "url": rx.url, "secret": SECRET, "timeout_s": 2.0,
                        "records": ["alerts", "jobs", "audit"]}},
        retry={"base_s": 0.5, "multiplier": 2.0, "max_s": 5.0, "jitter": 0.1})
    with store.engine.connect() as conn:
        j0 = conn.execute(sa.select(sa.func.coalesce(sa.func.max(transitions_table.c.id), 0))).scalar_one()
    svc = AlertService(settings, store.engine)
    committed_alerts: list[str] = []
    start = time.monotonic()
    high: set[int] = set()
    i = 0
    try:
        while time.monotonic() - start < down_s:
            for _ in range(5):           # five jobs a second: accept, dispatch, complete
                job = PreparedJob(id=new_job_id(), tenant="lab", priority=Priority.NORMAL, intent=Intent.AUTO,
                                  shots=10, deadline_s=None, fidelity_min=None, idempotency_key=None,
                                  payload=b"x", source_format="qasm2", num_qubits=2, num_clbits=2,
                                  ops=frozenset({"h", "cx"}), features={"size": 2.0})
                store.add_job(job)
                attempt = store.dispatch(job.id, "cpu-x/statevector", predicted_s=0.01, queued_at=None)
                store.complete(job.id, attempt or 1, {"counts": {"00": 10}, "shots": 10, "backend": "cpu-x/statevector",
                                                      "wall_s": 0.01, "metadata": {}})
            admin.put("bench.setting", {"i": i}, actor="bench", action="config.set")
            high ^= {i % 10, (i * 7) % 10}
            obs = Observations(node_memory={f"node{k}": MemoryUsage(950 if k in high else 100, 1000) for k in range(10)})
            committed_alerts += [e.key for e in svc.evaluate(obs).events]
            i += 1
            time.sleep(1.0)
        with store.engine.connect() as conn:
            jobs = [f"j:{r}" for r in conn.execute(sa.select(transitions_table.c.id)
                                                   .where(transitions_table.c.id > j0)).scalars()]
            audits = [f"c:{r}" for r in conn.execute(sa.select(admin_audit.c.id)
                                                     .where(admin_audit.c.key == "bench.setting")).scalars()]
        expected = set(jobs) | set(audits) | set(committed_alerts)
        rx.up()
        back = time.monotonic()
        deadline = back + 300
        while time.monotonic() < deadline and not expected <= {k for k, _, _ in rx.got}:
            time.sleep(0.1)
        caught_up_s = time.monotonic() - back
    finally:
        svc.close()
        rx.down()
    keys = [k for k, _, _ in rx.got]
    received = set(keys)
    # one record under two keys: dedup by key cannot remove it
    contents: dict[str, set[str]] = {}
    for key, kind, body in rx.got:
        ident = json.dumps({k: v for k, v in body.items() if k not in ("id",)}, sort_keys=True, default=str)
        contents.setdefault(f"{kind}:{ident}", set()).add(key)
    duplicated = sum(len(v) - 1 for v in contents.values())
    return {"down_s": down_s, "committed": {"jobs": len(jobs), "audit": len(audits), "alerts": len(committed_alerts)},
            "lost": len(expected - received), "duplicated": duplicated,
            "redeliveries": len(keys) - len(received), "received_requests": len(keys), "caught_up_s": caught_up_s}
