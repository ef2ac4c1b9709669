"""The Splunk HEC sink against a local HEC-compatible receiver, and through the durable outbox.

The receiver is a real HTTP server on 127.0.0.1 (threads) that behaves like HEC's
``/services/collector/event``: it checks ``Authorization: Splunk <token>``, parses the body
as HEC does (one or more concatenated JSON event objects), checks each event's shape and
index, and answers with HEC's own status codes and bodies. It can be made busy (503,
code 9, ``Retry-After``), be down (nothing listening), or "lose" answers (index the event,
then answer 503), and it indexes by ``fields.idempotency_key`` the way a search would dedup.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from ray_qalloc.alerts import AlertEngine, Dispatcher, MemoryUsage, Observations, Outbox, RetryPolicy, load_rules
from ray_qalloc.alerts.sinks import (
    DeliveryError, SplunkHecConfig, SplunkHecSink, build_sink, hec_outcome,
)
from ray_qalloc.integration.ocsf_out import detection_finding

TOKEN = "6d1f2a3b-0000-4c5d-9e8f-0123456789ab"


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


def _answer(status: int, text: str, code: int, **extra: Any) -> tuple[int, dict[str, Any]]:
    return status, {"text": text, "code": code, **extra}


@dataclass
class Hec:
    """A HEC-compatible receiver on 127.0.0.1:``port``; ``mode``: ok | busy | lose."""

    port: int = field(default_factory=_free_port)
    token: str = TOKEN
    indexes: tuple[str, ...] = ("main", "qalloc")
    mode: str = "ok"
    retry_after: str | None = "2"
    indexed: list[dict[str, Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def keys(self) -> list[str]:
        return [e["fields"]["idempotency_key"] for e in self.indexed]

    def unique(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for e in self.indexed:
            seen.setdefault(e["fields"]["idempotency_key"], e)
        return list(seen.values())

    def handle(self, path: str, auth: str | None, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path != "/services/collector/event":
            return 404, {"text": "The requested URL was not found on this server.", "code": 404}, {}
        if not auth:
            return (*_answer(401, "Token is required", 2), {})
        scheme, _, token = auth.partition(" ")
        if scheme != "Splunk" or not token:
            return (*_answer(401, "Invalid authorization", 3), {})
        if token != self.token:
            return (*_answer(403, "Invalid token", 4), {})
        if self.mode == "busy":
            return (*_answer(503, "Server is busy", 9), {"Retry-After": self.retry_after} if self.retry_after else {})
        text = body.decode("utf-8", errors="strict").strip()
        if not text:
            return (*_answer(400, "No data", 5), {})
        events, dec, i = [], json.JSONDecoder(), 0
        while i < len(text):
            try:
                obj, end = dec.raw_decode(text, i)
            except ValueError:
                return (*_answer(400, "Invalid data format", 6, **{"invalid-event-number": len(events)}), {})
            if not isinstance(obj, dict):
                return (*_answer(400, "Invalid data format", 6, **{"invalid-event-number": len(events)}), {})
            if "event" not in obj:
                return (*_answer(400, "Event field is required", 12, **{"invalid-event-number": len(events)}), {})
            if obj["event"] in ("", None, {}):
                return (*_answer(400, "Event field cannot be blank", 13, **{"invalid-event-number": len(events)}), {})
            if obj.get("index", "main") not in self.indexes:
                return (*_answer(400, "Incorrect index", 7, **{"invalid-event-number": len(events)}), {})
            fields_ = obj.get("fields", {})
            if not isinstance(fields_, dict) or any(isinstance(v, dict) for v in fields_.values()):
                return (*_answer(400, "Error in handling indexed fields", 15,
                                 **{"invalid-event-number": len(events)}), {})
            assert isinstance(obj.get("time"), (int, float)) and isinstance(obj.get("sourcetype"), str)
            events.append(obj)
            i = end
            while i < len(text) and text[i].isspace():
                i += 1
        with self._lock:
            self.indexed.extend(events)
        if self.mode == "lose":      # indexed, but the answer says otherwise: the sender retries
            return (*_answer(503, "Server is busy", 9), {})
        return (*_answer(200, "Success", 0), {})

    def up(self) -> None:
        hec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer, headers = hec.handle(self.path, self.headers.get("Authorization"), body)
                hec.answers.append(status)
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

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
def hec() -> Any:
    h = Hec()
    h.up()
    yield h
    h.down()


def hec_sink(h: Hec, clock: FakeClock | None = None, **cfg: Any) -> SplunkHecSink:
    config = SplunkHecConfig(url=h.url, token=cfg.pop("token", TOKEN), timeout_s=2, host="qalloc-head", **cfg)
    return SplunkHecSink("splunk", config, clock=clock or FakeClock())


def mem_engine(clock: FakeClock) -> AlertEngine:
    rules = {"rules": [{"name": "mem", "kind": "node_memory", "params": {"threshold": 0.9}}],
             "rate_limit": {"max_notifications": 1000, "window_s": 60}}
    return AlertEngine(load_rules(rules), clock=clock)


def mem(**nodes: float) -> Observations:
    return Observations(node_memory={n: MemoryUsage(int(f * 1000), 1000) for n, f in nodes.items()})


# ---- one request ------------------------------------------------------------------------------------
def _event() -> dict[str, Any]:
    clock = FakeClock()
    return mem_engine(clock).step(mem(n1=0.95)).events[0].to_dict()


@pytest.mark.parametrize("fmt", ["json", "ocsf", "cef"])
def test_envelope_reaches_hec_with_token_index_sourcetype_and_key(hec: Hec, fmt: str) -> None:
    e = _event()
    sink = hec_sink(hec, index="qalloc", **({} if fmt == "json" else {"format": fmt}))
    sink.send(e)
    [got] = hec.indexed
    assert got["fields"] == {"idempotency_key": e["key"]} and got["index"] == "qalloc"
    assert (got["host"], got["source"], got["time"]) == ("qalloc-head", "ray-qalloc", round(e["at"], 3))
    assert got["sourcetype"] == {"json": "_json", "ocsf": "ocsf:detection_finding", "cef": "cef"}[fmt]
    if fmt == "json":
        assert got["event"] == e
    elif fmt == "ocsf":
        assert got["event"] == detection_finding(e) and got["event"]["class_uid"] == 2004
    else:
        assert got["event"].startswith("CEF:0|ray-qalloc|ray-qalloc|") and f"externalId={e['key']}" in got["event"]
    sink.close()


@pytest.mark.parametrize(("status", "body", "permanent"), [
    (400, '{"text":"Invalid data format","code":6,"invalid-event-number":0}', True),
    (400, '{"text":"Incorrect index","code":7,"invalid-event-number":0}', True),
    (401, '{"text":"Token is required","code":2}', True),
    (401, '{"text":"Invalid authorization","code":3}', True),
    (403, '{"text":"Token disabled","code":1}', True),
    (403, '{"text":"Invalid token","code":4}', True),
    (404, "<html>not found</html>", True),
    (503, '{"text":"Server is busy","code":9}', False),
    (503, '{"text":"HEC is unhealthy, queues are full","code":18}', False),
    (500, '{"text":"Internal server error","code":8}', False),
    (429, "", False),
    (502, "<html>bad gateway</html>", False),
    (200, "<html>a proxy's page</html>", False),     # not HEC's success: not taken as delivered
])
def test_hec_answers_map_onto_the_outbox_contract(status: int, body: str, permanent: bool) -> None:
    with pytest.raises(DeliveryError) as err:
        hec_outcome(status, body, retry_after_s=7.0)
    assert err.value.permanent is permanent
    if permanent:
        assert "To fix:" in str(err.value)
    else:
        assert err.value.retry_after_s == 7.0
    hec_outcome(200, '{"text":"Success","code":0}')   # delivered: no error


def test_network_error_is_retryable_and_retry_after_is_honoured(hec: Hec) -> None:
    hec.mode, hec.retry_after = "busy", "30"
    sink = hec_sink(hec)
    with pytest.raises(DeliveryError) as err:
        sink.send(_event())
    assert not err.value.permanent and err.value.retry_after_s == 30.0 and "code 9 (Server is busy)" in str(err.value)
    hec.down()
    with pytest.raises(DeliveryError) as err:
        sink.send(_event())
    assert not err.value.permanent and "ConnectError" in str(err.value)


def test_real_http_refusals(hec: Hec) -> None:
    e = _event()
    with pytest.raises(DeliveryError) as err:
        hec_sink(hec, index="secret").send(e)
    assert err.value.permanent and "code 7 (Incorrect index)" in str(err.value)
    with pytest.raises(DeliveryError) as err:
        hec_sink(hec, token="wrong-token").send(e)
    assert err.value.permanent and "HTTP 403 code 4 (Invalid token)" in str(err.value)
    assert "wrong-token" not in str(err.value)
    assert hec.indexed == []


# ---- through the durable outbox --------------------------------------------------------------------
def test_alerts_survive_a_busy_then_down_hec_and_arrive_once_each(tmp_path: Path, hec: Hec) -> None:
    clock = FakeClock()
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["splunk"], clock=clock)
    engine = mem_engine(clock)
    config = SplunkHecConfig(url=hec.url, token=TOKEN, timeout_s=2, format="ocsf", index="qalloc")
    assert isinstance(build_sink("splunk", config), SplunkHecSink)
    sink = SplunkHecSink("splunk", config, clock=clock)   # Retry-After against the test's time
    retry = RetryPolicy(base_s=1, multiplier=2, max_s=60, jitter=0, give_up_after_s=None)
    dispatcher = Dispatcher(outbox, {"splunk": sink}, retry=retry, clock=clock, rand=lambda: 0.0)
    try:
        committed = [e.key for e in engine.step(mem(n1=0.95, n2=0.96, n3=0.97), commit=outbox.enqueue).events]
        assert len(committed) == 3

        hec.mode = "busy"                                   # 503, code 9, Retry-After: 2
        report = dispatcher.deliver_due()
        assert report.failed == {"splunk": 1} and report.delivered == {}
        assert report.next_due_at == clock.t + 2            # Retry-After beats the 1 s backoff
        assert hec.answers == [503] and hec.indexed == []

        hec.down()                                          # nothing listening
        clock.advance(2)
        assert dispatcher.deliver_due().failed == {"splunk": 1}
        clock.advance(1)
        committed += [e.key for e in engine.step(mem(n1=0.5, n2=0.96, n3=0.97, n4=0.99),
                                                 commit=outbox.enqueue).events]   # n1 resolves, n4 fires
        assert len(committed) == 5
        assert dispatcher.deliver_due().delivered == {}     # still backing off (4 s after 2 failures)

        hec.mode = "lose"                                   # back, but its first answer is lost
        hec.up()
        clock.advance(10)
        assert dispatcher.deliver_due().failed == {"splunk": 1}
        hec.mode = "ok"
        clock.advance(60)
        report = dispatcher.deliver_due()
        assert report.delivered == {"splunk": 5} and report.failed == {}

        assert len(hec.keys()) == 6                         # one duplicate: the lost answer
        assert [e["fields"]["idempotency_key"] for e in hec.unique()] == committed   # none lost, commit order
        classes = [(e["event"]["activity_id"], e["event"]["finding_info"]["title"]) for e in hec.unique()]
        assert classes[3] == (3, "mem on node n1")          # n1's Close came after its Create
        assert all(e["sourcetype"] == "ocsf:detection_finding" and e["index"] == "qalloc" for e in hec.indexed)
        assert outbox.counts() == {"splunk": {"pending": 0, "delivered": 5, "dead": 0}}
    finally:
        dispatcher.stop()
        sink.close()
        outbox.close()


def test_a_bad_token_dead_letters_at_once(tmp_path: Path, hec: Hec) -> None:
    clock = FakeClock()
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["splunk"], clock=clock)
    sink = hec_sink(hec, clock, token="not-the-token")
    dispatcher = Dispatcher(outbox, {"splunk": sink}, clock=clock)
    try:
        events = mem_engine(clock).step(mem(n1=0.95, n2=0.96), commit=outbox.enqueue).events
        report = dispatcher.deliver_due()
        assert report.dead == {"splunk": 2} and report.failed == {} and report.delivered == {}
        assert hec.answers == [403, 403] and hec.indexed == []
        rows = outbox.deliveries(1)["splunk"]
        assert rows["state"] == "dead" and rows["attempts"] == 1 and "Invalid token" in rows["last_error"]
        assert "To fix" in rows["last_error"] and "not-the-token" not in rows["last_error"]
        assert len(events) == 2
    finally:
        sink.close()
        outbox.close()


def test_hec_sink_rejects_a_non_http_url_and_keeps_the_token_secret() -> None:
    with pytest.raises(ValueError, match="To fix"):
        SplunkHecConfig(url="splunk:8088", token="t")
    cfg = SplunkHecConfig(url="https://splunk:8088", token="very-secret", verify_tls=False)
    assert "very-secret" not in repr(cfg) and "very-secret" not in cfg.model_dump_json()
    client = httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"text": "Success", "code": 0})))
    sink = SplunkHecSink("s", cfg, client=client)
    sink.send(_event())   # delivered through a caller-owned client
