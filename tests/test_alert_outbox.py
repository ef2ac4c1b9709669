"""The alert outbox: commit before delivery, crash survival, retry with backoff, exactly once after dedup.

The receiver is a real HTTP server on loopback (``http.server`` in a thread) that checks each
request's HMAC signature, can be down (nothing listening), failing (503, 429, 400), or "lose"
its answers (it processes the event, then drops the connection), and dedups by idempotency key
the way a real receiver should.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import sqlalchemy as sa

from ray_qalloc.alerts import (
    AlertEngine, Dispatcher, MemoryUsage, Observations, Outbox, RetryPolicy, WebhookConfig, WebhookSink, load_rules,
    verify_signature,
)
from ray_qalloc.alerts.outbox import events_table
from ray_qalloc.alerts.sinks import SIGNATURE_HEADER, TIMESTAMP_HEADER, canonical_body, sign

SECRET = "s3cret-for-tests-only-0123456789"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class FakeClock:
    t: float = 2_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1:``port`` that can go down and come back on the same port."""

    port: int = field(default_factory=_free_port)
    mode: str = "ok"                        # ok | 503 | lose | 429
    refuse_keys: set[str] = field(default_factory=set)  # answered 400
    check: Callable[[dict[str, Any]], None] | None = None   # called on each verified event
    requests: list[dict[str, Any]] = field(default_factory=list)   # every verified request, duplicates included
    received_at: dict[str, float] = field(default_factory=dict)    # first arrival per key (perf_counter)
    bad_signatures: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def unique(self) -> list[dict[str, Any]]:
        """Events after dedup by idempotency key, in first-arrival order."""
        seen: dict[str, dict[str, Any]] = {}
        for r in self.requests:
            seen.setdefault(r["key"], r)
        return list(seen.values())

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not verify_signature(SECRET, body, self.headers.get(TIMESTAMP_HEADER),
                                        self.headers.get(SIGNATURE_HEADER), now=time.time(), tolerance_s=10 ** 10):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                event = json.loads(body)
                assert event["key"] == self.headers["Idempotency-Key"]
                if receiver.mode == "503":
                    self.send_response(503)
                    self.end_headers()
                    return
                if receiver.mode == "429":
                    self.send_response(429)
                    self.send_header("Retry-After", "30")
                    self.end_headers()
                    return
                if event["key"] in receiver.refuse_keys:
                    self.send_response(400)
                    self.end_headers()
                    return
                if receiver.check is not None:
                    receiver.check(event)
                with receiver._lock:
                    receiver.requests.append(event)
                    receiver.received_at.setdefault(event["key"], time.perf_counter())
                if receiver.mode == "lose":  # processed, but the answer never arrives
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
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


@pytest.fixture()
def receiver() -> Any:
    r = Receiver()
    yield r
    r.down()


def mem_engine(clock: FakeClock, **limit: Any) -> AlertEngine:
    rules = {"rules": [{"name": "mem", "kind": "node_memory", "params": {"threshold": 0.9}}],
             "rate_limit": {"max_notifications": 1000, "window_s": 60, **limit}}
    return AlertEngine(load_rules(rules), clock=clock)


def mem(**nodes: float) -> Observations:
    return Observations(node_memory={n: MemoryUsage(int(f * 1000), 1000) for n, f in nodes.items()})


def webhook(receiver: Receiver, clock: Callable[[], float] = time.time) -> WebhookSink:
    return WebhookSink("hook", WebhookConfig(url=receiver.url, secret=SECRET, timeout_s=2), clock=clock)


# ---- signing -------------------------------------------------------------------------------------
def test_signature_verifies_only_the_signed_body_secret_and_a_fresh_timestamp() -> None:
    body = canonical_body({"key": "k1", "status": "firing", "summary": "Zürich ∑"})
    ts = "1700000000"
    sig = sign(SECRET, body, ts)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify_signature(SECRET, body, ts, sig, now=1700000100)
    assert not verify_signature(SECRET, body.replace(b"firing", b"resolv"), ts, sig, now=1700000100)
    assert not verify_signature("another-secret-0123456789", body, ts, sig, now=1700000100)
    assert not verify_signature(SECRET, body, "1700000001", sig, now=1700000100)   # timestamp is signed
    assert not verify_signature(SECRET, body, ts, sig, now=1700000000 + 301)        # a replay, too late
    assert not verify_signature(SECRET, body, None, sig) and not verify_signature(SECRET, body, ts, None)


# ---- durability ------------------------------------------------------------------------------------
CRASHING_WRITER = """
import os, sys
from ray_qalloc.alerts import AlertEngine, MemoryUsage, Observations, Outbox, load_rules
outbox = Outbox(sys.argv[1], ["hook"])
engine = AlertEngine(load_rules([{"name": "mem", "kind": "node_memory"}]), clock=lambda: 1e9)
d = engine.step(Observations(node_memory={n: MemoryUsage(95, 100) for n in ("n1", "n2", "n3")}),
                commit=outbox.enqueue)
print(",".join(e.key for e in d.events), flush=True)
os._exit(137)   # dies right after the commit: no delivery attempted, nothing closed or flushed
"""


def test_an_event_committed_before_a_crash_is_delivered_after_restart(tmp_path: Path, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, url], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 137, proc.stderr
    keys = proc.stdout.strip().split(",")
    assert len(keys) == 3
    receiver.up()
    outbox = Outbox(url, ["hook"])            # a new process's view: a new engine on the same file
    try:
        report = Dispatcher(outbox, {"hook": webhook(receiver)}).deliver_due()
        assert report.delivered == {"hook": 3}
        assert [e["key"] for e in receiver.unique()] == keys and receiver.bad_signatures == 0
        assert {e["labels"]["node"] for e in receiver.requests} == {"n1", "n2", "n3"}
        assert outbox.counts() == {"hook": {"pending": 0, "delivered": 3, "dead": 0}}
    finally:
        outbox.close()


def test_every_delivered_event_was_committed_before_it_was_sent(tmp_path: Path, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    outbox = Outbox(url, ["hook"])
    peek = sa.create_engine(url)              # the receiver looks into the file on its own connection
    committed_when_seen: list[bool] = []

    def check(event: dict[str, Any]) -> None:
        with peek.connect() as conn:
            committed_when_seen.append(conn.execute(sa.select(sa.func.count()).where(
                events_table.c.key == event["key"])).scalar() == 1)

    receiver.check = check
    receiver.up()
    clock = FakeClock()
    engine = mem_engine(clock)
    dispatcher = Dispatcher(outbox, {"hook": webhook(receiver)})
    try:
        for frac in (0.95, 0.5, 0.95):
            engine.step(mem(a=frac, b=frac), commit=outbox.enqueue)
            clock.advance(1)
            dispatcher.deliver_due()
        assert len(committed_when_seen) == 6 and all(committed_when_seen)
    finally:
        outbox.close()
        peek.dispose()


def test_enqueue_is_idempotent_and_restart_restores_firing_alerts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    clock = FakeClock()
    outbox = Outbox(url, ["a", "b"])
    engine = mem_engine(clock)
    d = engine.step(mem(n1=0.95, n2=0.95), commit=outbox.enqueue)
    assert outbox.enqueue(d.events) == []     # the same events again: nothing new
    assert len(outbox.events()) == 2 and outbox.counts()["b"]["pending"] == 2
    clock.advance(5)
    engine.step(mem(n1=0.95, n2=0.5), commit=outbox.enqueue)   # n2 resolved
    outbox.close()

    clock.advance(5)
    reopened = Outbox(url, ["a", "b"])        # restart
    again = mem_engine(clock)
    again.restore(reopened.firing_events())
    assert [a.labels["node"] for a in again.firing()] == ["n1"]
    assert again.step(mem(n1=0.95, n2=0.5), commit=reopened.enqueue).events == ()   # no second announcement
    (resolved,) = again.step(mem(n1=0.2), commit=reopened.enqueue).events
    assert resolved.fingerprint == d.events[0].fingerprint and resolved.active_since == d.events[0].active_since
    assert [e.status for e in reopened.events()] == ["firing", "firing", "resolved", "resolved"]
    reopened.close()


def test_prune_keeps_pending_rows_and_each_alerts_newest_firing(tmp_path: Path, receiver: Receiver) -> None:
    clock = FakeClock()
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["hook"], clock=clock)
    engine = mem_engine(clock)
    for frac in (0.95, 0.5, 0.95):            # a: fire, resolve, fire
        engine.step(mem(a=frac), commit=outbox.enqueue)
        clock.advance(1)
    receiver.up()
    Dispatcher(outbox, {"hook": webhook(receiver)}, clock=clock).deliver_due()
    engine.step(mem(a=0.95, b=0.95), commit=outbox.enqueue)   # b fires: pending delivery
    clock.advance(1)
    assert outbox.prune(before=clock.t) == 2                   # the old fire and its resolve
    left = [(e.status, e.labels["node"]) for e in outbox.events()]
    assert left == [("firing", "a"), ("firing", "b")]
    assert [e.labels["node"] for e in outbox.firing_events()] == ["a", "b"]
    outbox.close()


# ---- retries -----------------------------------------------------------------------------------------
def test_receiver_down_then_up_gets_every_event_exactly_once_after_dedup(tmp_path: Path, receiver: Receiver) -> None:
    clock = FakeClock()
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["hook"], clock=clock)
    retry = RetryPolicy(base_s=1, multiplier=2, max_s=8, jitter=0.5)
    dispatcher = Dispatcher(outbox, {"hook": webhook(receiver, clock)}, retry=retry, clock=clock)
    engine = mem_engine(clock)
    phases = [("down", 20), ("503", 15), ("lose", 15), ("ok", 40)]
    committed: list[str] = []
    step = 0
    for mode, seconds in phases:
        if mode == "down":
            receiver.down()
        else:
            receiver.mode = mode
            if receiver._server is None:
                receiver.up()
        for _ in range(seconds):
            if step < 40:  # alerts keep happening while the receiver is away: 6 nodes going hot and cool
                nodes = {f"n{i}": 0.95 if (step // (i + 2)) % 2 == 0 else 0.3 for i in range(6)}
                committed += [e.key for e in engine.step(mem(**nodes), commit=outbox.enqueue).events]
            dispatcher.deliver_due()
            clock.advance(1)
            step += 1
    assert len(committed) > 30
    unique = receiver.unique()
    assert [e["key"] for e in unique] == committed          # every event, once, in commit order
    assert len(receiver.requests) > len(unique)             # answers were lost: duplicates arrived and were dropped
    assert receiver.bad_signatures == 0
    assert outbox.counts() == {"hook": {"pending": 0, "delivered": len(committed), "dead": 0}}
    by_alert: dict[str, list[str]] = {}
    for e in unique:                                        # a resolve never overtakes its firing
        by_alert.setdefault(e["fingerprint"], []).append(e["status"])
    for statuses in by_alert.values():
        assert statuses == ["firing", "resolved"] * (len(statuses) // 2) + ["firing"] * (len(statuses) % 2)
    outbox.close()


def test_backoff_is_exponential_per_sink_capped_and_other_sinks_go_on(tmp_path: Path, receiver: Receiver) -> None:
    clock = FakeClock()
    down = Receiver()                                       # nothing listens on its port yet
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["live", "down"], clock=clock)
    retry = RetryPolicy(base_s=1, multiplier=2, max_s=8, jitter=0)
    receiver.up()
    dispatcher = Dispatcher(outbox, {"live": webhook(receiver, clock), "down": webhook(down, clock)},
                            retry=retry, clock=clock)
    ids = outbox.enqueue(mem_engine(clock).step(mem(a=0.95, b=0.95, c=0.95)).events)
    waits = []
    for _ in range(6):
        report = dispatcher.deliver_due()
        head = outbox.deliveries(ids[0])["down"]
        waits.append(head["next_attempt_at"] - clock.t)
        assert [outbox.deliveries(i)["down"]["attempts"] for i in ids[1:]] == [0, 0]   # the sink backs off as one
        assert report.next_due_at == head["next_attempt_at"]
        clock.t = head["next_attempt_at"]
    assert waits == [1, 2, 4, 8, 8, 8]
    assert outbox.counts()["live"]["delivered"] == 3 and len(receiver.requests) == 3
    assert "ConnectError" in outbox.deliveries(ids[0])["down"]["last_error"]
    down.up()
    try:
        assert dispatcher.deliver_due().delivered == {"down": 3}
        assert outbox.deliveries(ids[0])["down"]["attempts"] == 7
    finally:
        down.down()
        outbox.close()


def test_refusal_is_dead_at_once_retry_after_is_honoured_and_old_events_expire(tmp_path: Path,
                                                                                receiver: Receiver) -> None:
    clock = FakeClock()
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["hook"], clock=clock)
    retry = RetryPolicy(base_s=1, max_s=60, jitter=0, give_up_after_s=100)
    dispatcher = Dispatcher(outbox, {"hook": webhook(receiver, clock)}, retry=retry, clock=clock)
    engine = mem_engine(clock)
    ids = outbox.enqueue(engine.step(mem(a=0.95, b=0.95)).events)
    first_key = outbox.events()[0].key
    receiver.refuse_keys.add(first_key)
    receiver.up()
    report = dispatcher.deliver_due()
    assert report.dead == {"hook": 1} and report.delivered == {"hook": 1}   # a refusal does not block the next
    row = outbox.deliveries(ids[0])["hook"]
    assert row["state"] == "dead" and row["attempts"] == 1 and "HTTP 400" in row["last_error"]

    receiver.mode = "429"
    (later,) = outbox.enqueue(engine.step(mem(a=0.95, b=0.95, c=0.95)).events)
    dispatcher.deliver_due()
    assert outbox.deliveries(later)["hook"]["next_attempt_at"] == clock.t + 30   # Retry-After: 30 > base 1 s
    clock.advance(101)
    assert dispatcher.deliver_due().dead == {"hook": 1}
    assert "gave up after 1 attempts" in outbox.deliveries(later)["hook"]["last_error"]
    outbox.close()


# ---- the background dispatcher ----------------------------------------------------------------------
def test_background_dispatcher_delivers_single_events_and_a_committed_backlog(tmp_path: Path,
                                                                             receiver: Receiver) -> None:
    """Events committed one at a time, then a backlog of 300 committed in one transaction,
    all reach the receiver, each once. (How fast: ``python -m benchmarks.operations``.)"""
    receiver.up()
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["hook"])
    dispatcher = Dispatcher(outbox, {"hook": webhook(receiver)})
    engine = AlertEngine(load_rules({"rules": [{"name": "mem", "kind": "node_memory"}],
                                     "rate_limit": {"max_notifications": 10_000}}))
    dispatcher.start(interval_s=0.5)

    def wait_for(n: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(receiver.received_at) < n and time.monotonic() < deadline:
            time.sleep(0.002)

    keys: list[str] = []
    try:
        for i in range(10):   # one alert fires, then resolves (it vanishes from the next snapshot)
            for frac in (0.95, 0.5):
                d = engine.step(mem(**{f"n{i}": frac}), commit=outbox.enqueue)
                keys.append(d.events[0].key)
                dispatcher.wake()
                wait_for(len(keys), 10)
        backlog = 300
        burst = engine.step(mem(**{f"b{i}": 0.95 for i in range(backlog)}), commit=outbox.enqueue)
        dispatcher.wake()
        wait_for(len(keys) + backlog)
    finally:
        dispatcher.stop()
        outbox.close()
    assert len(burst.events) == backlog
    assert set(receiver.received_at) == set(keys) | {e.key for e in burst.events}
    assert len(receiver.received_at) == len(keys) + backlog


def test_a_background_dispatcher_reaches_a_receiver_that_comes_back(tmp_path: Path, receiver: Receiver) -> None:
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["hook"])
    dispatcher = Dispatcher(outbox, {"hook": webhook(receiver)},
                            retry=RetryPolicy(base_s=0.05, max_s=0.2, jitter=0.2))
    dispatcher.start(interval_s=5)
    try:
        outbox.enqueue(mem_engine(FakeClock()).step(mem(a=0.95)).events)
        dispatcher.wake()
        time.sleep(0.5)                          # receiver down: a few refused connections
        receiver.up()
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(receiver.unique()) == 1
        row = outbox.deliveries(1)["hook"]
        deadline = time.monotonic() + 5
        while row["state"] != "delivered" and time.monotonic() < deadline:
            time.sleep(0.01)
            row = outbox.deliveries(1)["hook"]
        assert row["state"] == "delivered" and row["attempts"] >= 3
    finally:
        dispatcher.stop()
        outbox.close()
