"""Job transitions and audit changes to SIEM sinks, forwarded from the change feed at least once.

Real job transitions (``JobStore``) and audit changes (``AdminState``) on a SQLite store,
real HTTP receivers on 127.0.0.1 (the HEC-compatible one of ``test_siem_hec`` and a webhook
receiver here), a real rsyslog for syslog; time is a fake clock, so "an hour down" takes no
time. What is asserted is what the receivers got, deduplicated by the key each sink sends,
against one full read of the feed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ray_qalloc.adminstate import AdminState
from ray_qalloc.alerts import MemoryUsage, Observations, RetryPolicy
from ray_qalloc.alerts.outbox import Outbox
from ray_qalloc.alerts.engine import AlertEvent
from ray_qalloc.alerts.rules import Severity
from ray_qalloc.alerts.service import AlertService
from ray_qalloc.alerts.sinks import (
    IDEMPOTENCY_HEADER, RECORD_HEADER, SplunkHecConfig, SplunkHecSink, SyslogConfig, SyslogSink, WebhookConfig,
    WebhookSink, verify_signature,
)
from ray_qalloc.backendlog import BackendLog
from ray_qalloc.changefeed import ChangeFeed, Cursor
from ray_qalloc.config import load_settings
from ray_qalloc.integration.forwarder import Forwarder
from ray_qalloc.jobs import new_job_id
from ray_qalloc.store import JobStore
from tests.helpers import prepared
from tests.test_siem_hec import TOKEN, FakeClock, Hec
from tests.test_siem_out import read_cef

pytest.register_assert_rewrite("tests.rsyslog")
from tests.rsyslog import Rsyslog  # noqa: E402

pytest_plugins = ["tests.rsyslog"]

SECRET = "s" * 32
NO_JITTER = RetryPolicy(base_s=1, multiplier=2, max_s=300, jitter=0, give_up_after_s=None, batch=4)


def now_clock() -> FakeClock:
    """A fake clock that starts now: the store stamps some transitions with the real time, and the
    feed merges its sources by time, so the two must not be years apart."""
    return FakeClock(time.time())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Hook:
    """A webhook receiver: keeps every request (key, kind, body); ``refuse`` answers 400 to
    those keys, ``mode`` busy answers 503."""

    port: int = field(default_factory=_free_port)
    got: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    mode: str = "ok"
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def keys(self) -> list[str]:
        return [k for k, *_ in self.got]

    def unique(self) -> list[tuple[str, str, bytes, str]]:
        seen: dict[str, tuple[str, str, bytes, str]] = {}
        for g in self.got:
            seen.setdefault(g[0], g)
        return list(seen.values())

    def up(self) -> None:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get(IDEMPOTENCY_HEADER, "")
                assert verify_signature(SECRET, body, self.headers.get("X-Qalloc-Timestamp"),
                                        self.headers.get("X-Qalloc-Signature"), now=float(
                                            self.headers.get("X-Qalloc-Timestamp") or 0))
                status = 503 if hook.mode == "busy" else 400 if key in hook.refuse else 200
                if status == 200:
                    hook.got.append((key, self.headers.get(RECORD_HEADER, ""), body,
                                     self.headers.get("Content-Type", "")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture()
def hook() -> Any:
    h = Hook()
    h.up()
    yield h
    h.down()


@pytest.fixture()
def hec() -> Any:
    h = Hec()
    h.up()
    yield h
    h.down()


class World:
    """A store with jobs, audit changes, backend changes and alerts (the four sources)."""

    def __init__(self, tmp_path: Path, clock: FakeClock) -> None:
        self.store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
        self.engine = self.store.engine
        self.admin = AdminState(self.engine)
        self.backends = BackendLog(self.engine)
        self.outbox = Outbox(self.engine, ["log"], clock=clock)
        self.feed = ChangeFeed(self.engine)
        self.clock = clock
        self.n = 0

    def job_life(self, tenant: str = "acme", *, fail: bool = False) -> str:
        """accept → dispatch → complete (or fail): three transitions."""
        job = prepared(id=new_job_id(), tenant=tenant)
        self.store.add_job(job, now=self.clock.advance(1))
        self.store.dispatch(job.id, "qpu_fez", predicted_s=1.0, queued_at=None)
        if fail:
            self.store.fail(job.id, "backend error: boom")
        else:
            self.store.complete(job.id, 1, {"counts": {"000": 100}})
        return job.id

    def config(self, value: Any) -> None:
        self.admin.put("alerts.interval_s", value, actor="alice", action="config.set", now=self.clock.advance(1))

    def noise(self) -> None:
        """A backend change and an alert: in the feed, never forwarded."""
        self.n += 1
        self.backends.note("qpu_fez", "down" if self.n % 2 else "up", "", self.clock.advance(1))
        self.backends.flush()
        self.outbox.enqueue([AlertEvent(key=f"alert-{self.n}", status="firing", rule="queue_wait",
                                        kind="queue_wait", severity=Severity("warning"), fingerprint=f"f{self.n}",
                                        labels={}, summary="queue wait", at=self.clock.t)])

    def expected(self, start: Cursor, kinds: tuple[str, ...] = ("job", "config")) -> list[str]:
        """The dedupe keys of every forwarded change after ``start``, in feed order (one full read)."""
        changes, _ = self.feed.read(start, tenant=None, admin=True, limit=100_000)
        out = []
        for c in changes:
            if c.kind in kinds:
                src = "j" if c.kind == "job" else "c"
                out.append(f"{src}:{c.cursor.get(src)}")
        return out


def webhook(h: Hook, clock: FakeClock, **cfg: Any) -> WebhookSink:
    return WebhookSink("hook", WebhookConfig(url=h.url, secret=SECRET, timeout_s=2, **cfg), clock=clock)


def hec_sink(h: Hec, clock: FakeClock, **cfg: Any) -> SplunkHecSink:
    return SplunkHecSink("splunk", SplunkHecConfig(url=h.url, token=TOKEN, timeout_s=2, host="qalloc-head", **cfg),
                         clock=clock)


def forwarder(w: World, sinks: dict[str, Any], records: dict[str, set[str]] | None = None,
              retry: RetryPolicy = NO_JITTER) -> Forwarder:
    return Forwarder(w.engine, sinks, records or {n: {"jobs", "audit"} for n in sinks}, retry, clock=w.clock,
                     rand=lambda: 0.0)


# ---- (a) every record once, in order, in each format ---------------------------------------------
def test_every_transition_and_audit_change_arrives_once_in_order_as_ocsf(tmp_path: Path, hec: Hec) -> None:
    clock = now_clock()
    w = World(tmp_path, clock)
    w.job_life()                                    # before the sink existed: not sent
    start = w.feed.head()
    fwd = forwarder(w, {"splunk": hec_sink(hec, clock, format="ocsf", index="qalloc")})
    jobs = [w.job_life("acme"), w.job_life("beta", fail=True)]
    w.noise()
    w.config(10)
    w.noise()
    w.config(15)
    report = fwd.pump(clock.t)
    keys = w.expected(start)
    assert len(keys) == 8 and report["delivered"] == {"splunk": 8} and report["dead"] == {}
    assert hec.keys() == keys                       # once each, in feed order
    events = [e["event"] for e in hec.indexed]
    assert [e["class_uid"] for e in events] == [1006] * 6 + [6003] * 2
    assert [e["activity_id"] for e in events[:3]] == [1, 6, 2]        # Create, Start, Update
    assert [e["metadata"]["uid"] for e in events] == keys
    assert events[0]["job"]["uid"] == jobs[0] and events[0]["metadata"]["tenant_uid"] == "acme"
    assert events[5]["status_id"] == 2 and events[5]["job"]["run_state"] == "Stopped"   # beta's job failed
    assert events[6]["api"]["operation"] == "config.set" and events[6]["actor"]["user"]["name"] == "alice"
    assert events[7]["resources"][0]["data"] == {"old": 10, "new": 15}
    assert [e["sourcetype"] for e in hec.indexed] == ["ocsf:scheduled_job_activity"] * 6 + ["ocsf:api_activity"] * 2
    assert all(e["fields"]["idempotency_key"] == e["event"]["metadata"]["uid"] for e in hec.indexed)
    assert fwd.pump(clock.t)["delivered"] == {}     # nothing new: nothing sent again
    [status] = fwd.status()
    assert (status["delivered"], status["dead"], status["lag"], status["attempts"]) == (8, 0, 0, 0)


@pytest.mark.parametrize("fmt", ["cef", "json"])
def test_webhook_gets_jobs_and_audit_as_cef_or_json(tmp_path: Path, hook: Hook, fmt: str) -> None:
    clock = now_clock()
    w = World(tmp_path, clock)
    start = w.feed.head()
    fwd = forwarder(w, {"hook": webhook(hook, clock, format=fmt)})
    job = w.job_life()
    w.noise()
    w.config({"a": "x=y|z"})
    fwd.pump(clock.t)
    keys = w.expected(start)
    assert hook.keys() == keys and len(keys) == 4
    assert [g[1] for g in hook.got] == ["job"] * 3 + ["config"]
    if fmt == "json":
        bodies = [json.loads(g[2]) for g in hook.got]
        assert [b["key"] for b in bodies] == keys
        assert [b["data"]["event"] for b in bodies[:3]] == ["accept", "dispatch", "complete"]
        assert bodies[3]["kind"] == "config" and bodies[3]["data"]["new"] == {"a": "x=y|z"}
        return
    assert all(g[3].startswith("text/plain") for g in hook.got)
    lines = [read_cef(g[2].decode()) for g in hook.got]
    assert [h[3] for h, _ in lines] == ["job.accept", "job.dispatch", "job.complete", "config.set"]
    assert [e["externalId"] for _, e in lines] == keys
    header, ext = lines[1]
    assert header[4] == f"job {job}: queued -> running" and header[5] == "1"
    assert (ext["cs1"], ext["cs2"], ext["cs4"], ext["cs5"], ext["act"]) == (job, "queued", "acme", "running",
                                                                             "dispatch")
    header, ext = lines[3]
    assert header[4] == "alice config.set alerts.interval_s" and header[5] == "3"
    assert (ext["suser"], ext["cs1"], json.loads(ext["cs3"])) == ("alice", "alerts.interval_s", {"a": "x=y|z"})


# ---- (b) a receiver down for an hour -----------------------------------------------------------------
def test_an_hour_down_loses_nothing_and_keeps_order(tmp_path: Path, hec: Hec) -> None:
    clock = now_clock()
    w = World(tmp_path, clock)
    start = w.feed.head()
    fwd = forwarder(w, {"splunk": hec_sink(hec, clock, format="cef")})
    w.job_life()
    assert fwd.pump(clock.t)["delivered"] == {"splunk": 3}

    hec.down()                                      # an hour: jobs go on, the receiver is gone
    failed = 0
    end = clock.t + 3600
    while clock.t < end:
        w.job_life()
        if clock.t % 120 < 1:
            w.config(clock.t)
        clock.advance(28)
        report = fwd.pump(clock.t)
        failed += report["failed"].get("splunk", 0)
        assert report["delivered"] == {}
    [st] = fwd.status()
    assert st["lag"] > 300 and st["attempts"] == failed and "ConnectError" in st["last_error"]
    assert 10 <= failed <= 30                        # probed with backoff (up to 300 s), not flooded
    assert st["next_attempt_at"] > clock.t - 300

    hec.mode = "lose"                               # back; its first answer is lost (indexed, then 503)
    hec.up()
    clock.advance(300)
    assert fwd.pump(clock.t)["failed"] == {"splunk": 1}
    hec.mode = "ok"
    clock.advance(300)
    report = fwd.pump(clock.t)
    keys = w.expected(start)
    assert report["delivered"]["splunk"] == len(keys) - 3
    got = hec.keys()
    assert [e["fields"]["idempotency_key"] for e in hec.unique()] == keys       # nothing lost, in order
    assert len(got) == len(keys) + 1 and got[3] == got[4] == keys[3]          # one duplicate: the lost answer
    [st] = fwd.status()
    assert (st["lag"], st["attempts"], st["delivered"]) == (0, 0, len(keys))


# ---- (c) a crash mid-way -------------------------------------------------------------------------------
class Crash(BaseException):
    """The process dies: nothing after it runs (not an Exception, so nothing catches it)."""


class CrashingSink:
    """Passes records on to ``inner``; after ``after`` sends, the next one reaches the receiver
    and then the process "dies" before the forwarder can write its position."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.after, self.name = inner, after, inner.name

    def send_record(self, record: Any) -> None:
        self.inner.send_record(record)
        self.after -= 1
        if self.after < 0:
            raise Crash()

    def send(self, event: Any) -> None:
        self.inner.send(event)

    def close(self) -> None:
        self.inner.close()


def test_a_new_forwarder_resumes_from_the_durable_position(tmp_path: Path, hook: Hook) -> None:
    clock = now_clock()
    w = World(tmp_path, clock)
    start = w.feed.head()
    first = forwarder(w, {"hook": CrashingSink(webhook(hook, clock), after=4)})
    for _ in range(3):
        w.job_life()
        w.config(clock.t)
    with pytest.raises(Crash):
        first.pump(clock.t)
    keys = w.expected(start)
    assert hook.keys() == keys[:5]                  # the fifth reached the receiver, its position was not saved
    assert Forwarder(w.engine, {"hook": webhook(hook, clock)}, {"hook": {"jobs", "audit"}}, NO_JITTER,
                     clock=clock).status()[0]["delivered"] == 4

    w.job_life()                                    # more while it was down
    again = forwarder(w, {"hook": webhook(hook, clock)})       # a new process, the same database
    again.pump(clock.t)
    keys = w.expected(start)
    assert [k for k, *_ in hook.unique()] == keys
    assert hook.keys() == keys[:5] + keys[4:]       # the only duplicate: the record in flight at the crash


# ---- (d) a refusal dead-letters one record ---------------------------------------------------------------
def test_a_permanent_refusal_dead_letters_one_record_and_the_rest_go_through(tmp_path: Path, hook: Hook,
                                                                           caplog: Any, monkeypatch: Any) -> None:
    from ray_qalloc.integration import forwarder as forwarder_module
    from ray_qalloc.metrics.facade import Metrics

    recorded = Metrics(enabled=True, flush_s=None, require_ray=False)
    monkeypatch.setattr(forwarder_module, "metrics", recorded)
    clock = now_clock()
    w = World(tmp_path, clock)
    start = w.feed.head()
    fwd = forwarder(w, {"hook": webhook(hook, clock)})
    w.job_life()
    w.config(1)
    w.job_life()
    keys = w.expected(start)
    hook.refuse = {keys[1]}
    report = fwd.pump(clock.t)
    assert report["dead"] == {"hook": 1} and report["delivered"] == {"hook": len(keys) - 1}
    assert hook.keys() == [k for k in keys if k != keys[1]]
    [st] = fwd.status()
    assert (st["dead"], st["delivered"], st["lag"], st["attempts"]) == (1, len(keys) - 1, 0, 0)
    assert "HTTP 400" in st["last_error"] and st["next_attempt_at"] is None
    assert any(keys[1] in r.getMessage() and "dead-lettered" in r.getMessage() for r in caplog.records)
    counted = {(x.tags["record"], x.tags["outcome"]): x.value for x in recorded.pending()
               if x.name == "qalloc_sink_records_total" and x.tags["sink"] == "hook"}
    assert keys[1].startswith("j:") and len(keys) == 7      # 6 transitions, 1 audit change
    assert counted == {("jobs", "dead"): 1, ("jobs", "delivered"): 5, ("audit", "delivered"): 1}
    [lag] = [x.value for x in recorded.pending() if x.name == "qalloc_sink_lag_records"]
    assert lag == 0


def test_a_busy_receiver_is_retried_with_backoff_in_order(tmp_path: Path, hook: Hook) -> None:
    clock = now_clock()
    w = World(tmp_path, clock)
    start = w.feed.head()
    fwd = forwarder(w, {"hook": webhook(hook, clock)})
    w.job_life()
    hook.mode = "busy"
    assert fwd.pump(clock.t)["failed"] == {"hook": 1}
    assert fwd.pump(clock.t + 0.5)["waiting"] == ["hook"]           # 1 s backoff after the first failure
    assert fwd.pump(clock.t + 1)["failed"] == {"hook": 1}           # then 2 s
    [st] = fwd.status()
    assert st["attempts"] == 2 and st["next_attempt_at"] == clock.t + 1 + 2 and "503" in st["last_error"]
    hook.mode = "ok"
    assert fwd.pump(clock.t + 3)["delivered"] == {"hook": 3}
    assert hook.keys() == w.expected(start)


# ---- (e) alerts-only sinks: nothing from the forwarder; alerts through the outbox ------------------------
def test_alerts_only_sinks_get_no_records_and_alerts_still_go_through_the_outbox(tmp_path: Path) -> None:
    clock = now_clock()
    alerts_hook, jobs_hook = Hook(), Hook()
    alerts_hook.up()
    jobs_hook.up()
    settings = load_settings({"QALLOC_ALERTS": json.dumps({
        "rules": [{"name": "mem", "kind": "node_memory", "params": {"threshold": 0.9}}],
        "sinks": {"pager": {"type": "webhook", "url": alerts_hook.url, "secret": SECRET},
                  "siem": {"type": "webhook", "url": jobs_hook.url, "secret": SECRET, "records": ["jobs", "audit"]},
                  "both": {"type": "webhook", "url": jobs_hook.url, "secret": SECRET,
                           "records": ["alerts", "audit"]}}})})
    w = World(tmp_path, clock)
    service = AlertService(settings.alerts, w.engine, clock=clock, start_delivery=False)
    try:
        assert service.outbox.sinks == ("log", "pager", "both")
        assert service.subscriptions == {"siem": {"jobs", "audit"}, "both": {"audit"}}
        w.job_life()
        w.config(3)
        service.forward(clock.t)
        assert alerts_hook.got == []                                  # alerts only: nothing forwarded
        assert sorted(k for k, *_ in jobs_hook.got) == sorted(["j:1", "j:2", "j:3", "c:1", "c:1"])
        decision = service.evaluate(Observations(node_memory={"n1": MemoryUsage(950, 1000)}))
        assert len(decision.events) == 1
        report = service.delivery.deliver_due()
        assert report.delivered == {"log": 1, "pager": 1, "both": 1}
        assert alerts_hook.keys() == [decision.events[0].key]
        assert [s["sink"] for s in service.sink_status()] == ["siem", "both"]
    finally:
        service.close()
        alerts_hook.down()
        jobs_hook.down()


def test_records_option_is_validated_and_defaults_to_alerts() -> None:
    assert WebhookConfig(url="http://h", secret=SECRET).records == ["alerts"]
    assert SyslogConfig(records=["jobs", "audit", "jobs"]).records == ["jobs", "audit"]
    assert SyslogConfig(records=["jobs", "audit"]).forwarded() == {"jobs", "audit"}
    for bad, needle in [(["alerts", "metrics"], "'metrics' is not a kind of record"), ([], "empty")]:
        with pytest.raises(Exception) as err:
            load_settings({"QALLOC_ALERTS": json.dumps({"sinks": {"x": {"type": "syslog", "records": bad}}})})
        assert "records" in str(err.value) and needle in str(err.value) and "To fix" in str(err.value)


# ---- (f) the CLI ------------------------------------------------------------------------------------------
def test_qalloc_sinks_shows_position_lag_and_deliveries(tmp_path: Path, hook: Hook, monkeypatch: Any) -> None:
    from ray_qalloc.cli import app

    clock = now_clock()
    w = World(tmp_path, clock)
    fwd = forwarder(w, {"siem": webhook(hook, clock)})
    w.job_life()
    w.config(1)
    hook.refuse = {"j:2"}
    fwd.pump(clock.t)
    w.job_life()                                    # not forwarded yet: lag 3
    monkeypatch.setenv("QALLOC_ALERTS", json.dumps({"sinks": {
        "siem": {"type": "webhook", "url": hook.url, "secret": SECRET, "format": "cef", "records": ["jobs", "audit"]},
        "pager": {"type": "syslog", "port": 5514}}}))
    runner = CliRunner()
    out = runner.invoke(app, ["--data-dir", str(tmp_path), "-o", "json", "sinks"])
    assert out.exit_code == 0, out.output
    view = {r["sink"]: r for r in json.loads(out.stdout)}
    siem = view["siem"]
    assert (siem["type"], siem["format"], siem["records"]) == ("webhook", "cef", ["jobs", "audit"])
    assert (siem["delivered"], siem["dead"], siem["lag"], siem["alerts"]) == (3, 1, 3, None)
    assert Cursor.parse(siem["position"]).get("c") == 1 and "HTTP 400" in siem["last_error"]
    pager = view["pager"]
    assert (pager["records"], pager["position"], pager["lag"], pager["alerts"]) == (
        ["alerts"], None, None, {"pending": 0, "delivered": 0, "dead": 0})
    out = runner.invoke(app, ["--data-dir", str(tmp_path), "sinks"])
    assert out.exit_code == 0, out.output
    assert "siem" in out.stdout and "jobs,audit" in out.stdout and "HTTP 400" in out.stdout
    assert "pager" in out.stdout and "0/0/0" in out.stdout


# ---- a real rsyslog: jobs as CEF over TCP ------------------------------------------------------------------
def test_rsyslog_receives_jobs_and_audit_as_cef_over_tcp(tmp_path: Path, rsyslog: Rsyslog) -> None:
    clock = now_clock()
    w = World(tmp_path, clock)
    start = w.feed.head()
    sink = SyslogSink("arcsight", SyslogConfig(host="127.0.0.1", port=rsyslog.tcp_port, transport="tcp",
                                                hostname="qalloc-head", format="cef", facility="local4",
                                                records=["jobs", "audit"]))
    fwd = forwarder(w, {"arcsight": sink})
    try:
        job = w.job_life(fail=True)
        w.config("über = | x")
        assert fwd.pump(clock.t)["delivered"] == {"arcsight": 4}
    finally:
        sink.close()
    keys = w.expected(start)
    msgs = rsyslog.wait_for(lambda m: (m.sd.get("job@32473") or m.sd.get("audit@32473") or {}).get("key") in keys,
                            count=4)
    by_key = {(m.sd.get("job@32473") or m.sd.get("audit@32473"))["key"]: m for m in msgs}
    assert sorted(by_key) == sorted(keys)
    cef = [read_cef(by_key[k].msg) for k in keys]
    assert [h[3] for h, _ in cef] == ["job.accept", "job.dispatch", "job.fail", "config.set"]
    assert [e["externalId"] for _, e in cef] == keys
    failed = by_key[keys[2]]
    assert (failed.facility, failed.severity, failed.msgid) == (20, 4, "job-fail")
    assert cef[2][0][5] == "5" and cef[2][1]["outcome"] == "failure" and cef[2][1]["msg"] == "gave up"
    assert by_key[keys[3]].sd["audit@32473"] == {"key": keys[3], "actor": "alice", "action": "config.set",
                                                 "resource": "alerts.interval_s"}
    assert json.loads(cef[3][1]["cs3"]) == "über = | x" and cef[3][1]["dvchost"] == "qalloc-head"
