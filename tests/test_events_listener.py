"""The syslog listener on real sockets (127.0.0.1, free ports): TCP octet counting and newline
framing, UDP, a message split across segments, oversized and bad messages, and the wiring
that ``qalloc serve`` uses."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from ray_qalloc.config import Settings, SyslogListenerSettings
from ray_qalloc.integration.eventstore import EventStore
from ray_qalloc.integration.listener import SyslogListener, start_in_thread

TENANT = "sys"
RFC5424 = "<34>1 2025-06-01T12:00:0{n}Z fw1 sshd 41{n} AUTH - Failed password for root from 203.0.113.{n}"
RFC3164 = "<13>Jun  1 12:00:0{n} web1 nginx[77]: GET /admin from 198.51.100.{n}"
CEF_IN_SYSLOG = "<86>1 2025-06-01T12:00:0{n}Z ids1 arcsight - - - CEF:0|Acme|IDS|1|100|Scan {n}|8|src=10.0.0.{n}"


@pytest.fixture()
def store(tmp_path: Path) -> EventStore:
    s = EventStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def _settings(**kw: Any) -> SyslogListenerSettings:
    return SyslogListenerSettings(host="127.0.0.1", tcp_port=0, udp_port=0, tenant=TENANT, **kw)


async def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _run(store: EventStore, body: Callable[[SyslogListener], Any], **kw: Any) -> SyslogListener:
    async def main() -> SyslogListener:
        listener = SyslogListener(_settings(**kw), store, flush_s=0.02)
        await listener.start()
        try:
            await body(listener)
        finally:
            await listener.stop()
        return listener

    return asyncio.run(main())


async def _tcp_send(port: int, *chunks: bytes, pause: float = 0.0) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    writer.close()
    await writer.wait_closed()


def _messages(template: str, n: int) -> list[str]:
    return [template.format(n=i) for i in range(n)]


def _octet(msg: str) -> bytes:
    data = msg.encode()
    return str(len(data)).encode() + b" " + data


def test_tcp_octet_counting_stores_every_message(store):
    msgs = _messages(RFC5424, 5) + _messages(CEF_IN_SYSLOG, 3)

    async def body(listener: SyslogListener) -> None:
        await _tcp_send(listener.tcp_port, b"".join(_octet(m) for m in msgs))
        await _wait_for(lambda: listener.stats.stored == len(msgs))

    listener = _run(store, body)
    page = store.query(TENANT, limit=100, raw=True)
    assert sorted(e["raw"] for e in page.items) == sorted(msgs)
    assert {e["format"] for e in page.items} == {"syslog", "cef"}
    assert listener.stats.rejected == 0 and listener.stats.connections == 1


def test_tcp_newline_framing_with_crlf_and_a_last_line_without_newline(store):
    msgs = _messages(RFC3164, 4)
    payload = "\r\n".join(msgs[:3]).encode() + b"\r\n\n" + msgs[3].encode()   # a blank line, no final "\n"

    async def body(listener: SyslogListener) -> None:
        await _tcp_send(listener.tcp_port, payload)
        await _wait_for(lambda: listener.stats.stored == 4)

    _run(store, body)
    assert sorted(e["raw"] for e in store.query(TENANT, raw=True).items) == sorted(msgs)


def test_a_message_split_across_tcp_segments(store):
    """Both framings, cut in the middle of the length, of the header and of the message."""
    a, b = RFC5424.format(n=1), RFC5424.format(n=2)
    octets = _octet(a) + _octet(b)
    lines = (RFC3164.format(n=1) + "\n" + RFC3164.format(n=2) + "\n").encode()

    async def body(listener: SyslogListener) -> None:
        await _tcp_send(listener.tcp_port, octets[:1], octets[1:5], octets[5:40], octets[40:len(_octet(a)) + 2],
                        octets[len(_octet(a)) + 2:], pause=0.03)
        await _tcp_send(listener.tcp_port, lines[:3], lines[3:50], lines[50:], pause=0.03)
        await _wait_for(lambda: listener.stats.stored == 4)

    listener = _run(store, body)
    assert listener.stats.rejected == 0 and listener.stats.framing_errors == 0


def test_udp_one_datagram_one_message(store):
    msgs = _messages(RFC5424, 6)

    async def body(listener: SyslogListener) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for m in msgs:
                s.sendto(m.encode() + b"\n", ("127.0.0.1", listener.udp_port))
        await _wait_for(lambda: listener.stats.stored == len(msgs))

    _run(store, body)
    assert sorted(e["raw"] for e in store.query(TENANT, raw=True).items) == sorted(msgs)


def test_oversized_messages_are_skipped_unbuffered_and_the_stream_goes_on(store):
    big = "<34>1 - h a - - - " + "x" * 600
    good = [RFC5424.format(n=i) for i in range(3)]

    async def body(listener: SyslogListener) -> None:
        # octet counting: the big frame arrives in pieces and is skipped as it streams past
        frames = _octet(good[0]) + _octet(big) + _octet(good[1])
        await _tcp_send(listener.tcp_port, frames[:100], frames[100:400], frames[400:], pause=0.02)
        # newline framing: a line over the limit, then a good one on the same connection
        await _tcp_send(listener.tcp_port, big[:300].encode(), big[300:].encode() + b"\n" + good[2].encode() + b"\n",
                        pause=0.02)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(big.encode(), ("127.0.0.1", listener.udp_port))
        await _wait_for(lambda: listener.stats.stored == 3 and listener.stats.oversized == 3)

    listener = _run(store, body, max_message_bytes=512)
    assert listener.stats.rejected == 0
    assert sorted(e["raw"] for e in store.query(TENANT, raw=True).items) == sorted(good)


def test_bad_messages_are_counted_and_the_listener_keeps_going(store, caplog):
    async def body(listener: SyslogListener) -> None:
        await _tcp_send(listener.tcp_port, b"not syslog at all\n\xff\xfe\n" + RFC5424.format(n=1).encode() + b"\n")
        await _tcp_send(listener.tcp_port, b"12x garbage frame")      # octet mode with a bad length: closed
        await _tcp_send(listener.tcp_port, _octet(RFC5424.format(n=2)))
        await _wait_for(lambda: listener.stats.stored == 2 and listener.stats.rejected == 2)

    listener = _run(store, body)
    assert listener.stats.framing_errors == 1
    assert listener.stats.connections == 3
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "listener" in r.name]
    assert len(warnings) <= 3   # quiet: per-message detail is DEBUG


def test_the_same_message_twice_is_stored_once(store):
    msg = RFC5424.format(n=7).encode()

    async def body(listener: SyslogListener) -> None:
        await _tcp_send(listener.tcp_port, msg + b"\n" + msg + b"\n")
        await _wait_for(lambda: listener.stats.stored + listener.stats.duplicates == 2)

    listener = _run(store, body)
    assert (listener.stats.stored, listener.stats.duplicates) == (1, 1)
    assert store.count(TENANT) == 1


def test_batches_writes(store):
    n = 3_000
    payload = b"".join(_octet(f"<34>1 - h a - - - event {i}") for i in range(n))

    async def body(listener: SyslogListener) -> None:
        await _tcp_send(listener.tcp_port, payload)
        await _wait_for(lambda: listener.stats.stored == n, timeout=20)

    listener = _run(store, body)
    assert listener.stats.batches < n / 100, listener.stats   # not one transaction per message


def test_start_in_thread_is_what_qalloc_serve_runs(tmp_path):
    settings = Settings(data_dir=tmp_path, events={"syslog": {"udp_port": 0, "tcp_port": 0, "tenant": TENANT}})
    assert start_in_thread(Settings(data_dir=tmp_path)) is None   # no port configured: no listener
    running = start_in_thread(settings)
    assert running is not None and running.tcp_port and running.udp_port
    try:
        with socket.create_connection(("127.0.0.1", running.tcp_port)) as s:
            s.sendall(_octet(RFC5424.format(n=3)))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(RFC5424.format(n=4).encode(), ("127.0.0.1", running.udp_port))
        deadline = time.monotonic() + 5
        while running.listener.stats.received < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        running.stop()   # flushes
    store = EventStore(settings.resolved_store_url)
    try:
        assert store.count(TENANT) == 2
    finally:
        store.close()


def test_serve_command_starts_and_stops_the_listener(tmp_path, monkeypatch):
    """``qalloc serve`` with a port configured: the listener runs beside the API and is stopped
    (flushed) on Ctrl-C. Ray and Serve are replaced by stand-ins; the listener is real."""
    import os
    import signal
    import threading

    import ray
    from typer.testing import CliRunner

    from ray_qalloc import cli, serving

    seen: dict[str, Any] = {}
    real_start_listener = serving.start_listener

    def start_listener(settings: Settings) -> Any:
        seen["running"] = running = real_start_listener(settings)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(RFC5424.format(n=5).encode(), ("127.0.0.1", running.udp_port))
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        return running

    class FakeSession:
        def shutdown(self, drain_s: float = 0.0) -> None:
            seen["shutdown"] = True

    monkeypatch.setenv("QALLOC_EVENTS__SYSLOG__UDP_PORT", "0")
    monkeypatch.setenv("QALLOC_EVENTS__SYSLOG__TENANT", TENANT)
    monkeypatch.setattr("ray_qalloc.session.connect", lambda **kw: FakeSession())
    monkeypatch.setattr(serving, "start", lambda settings, host, port: f"http://{host}:{port}")
    monkeypatch.setattr(serving, "stop", lambda: None)
    monkeypatch.setattr(serving, "start_listener", start_listener)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = CliRunner().invoke(cli.app, ["--data-dir", str(tmp_path), "serve", "--port", "1"])
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    assert result.exit_code == 0, result.output
    assert "syslog listener on 127.0.0.1" in result.output
    assert seen["shutdown"] and seen["running"].listener.stats.stored == 1


@pytest.mark.parametrize("line", [
    "<86>1 2025-06-01T12:00:00Z ids1 arcsight - - - CEF:0|Acme|IDS|1|100|Scan|8|src=10.0.0.1",
    "Jun  1 12:00:00 ids1 CEF:0|Acme|IDS|1|100|Scan|8|src=10.0.0.1",       # a header without <PRI>
    "CEF:0|Acme|IDS|1|100|Scan|8|src=10.0.0.1",
    "Jun  1 12:00:00 fw LEEF:1.0|Acme|FW|1|deny|src=10.0.0.2\tdst=10.0.0.3",
    "<34>1 2025-06-01T12:00:00Z host su - ID47 - 'su root' failed",
])
def test_the_listener_reads_a_line_as_the_http_endpoint_does(line):
    """One dispatch for both doors: a line the endpoint accepts undeclared, the listener
    accepts as the same event (a CEF record behind a header without <PRI> was refused here)."""
    from ray_qalloc.integration.detect import parse_records
    from ray_qalloc.integration.events import utc_now
    from ray_qalloc.integration.listener import parse_message

    now = utc_now()
    via_http = parse_records(line.encode(), None, tenant="t", received_at=now)[0]
    via_listener = parse_message(line, "t", now)
    assert via_listener.model_dump() == via_http.model_dump()
