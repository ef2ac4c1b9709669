"""A syslog receiver: TCP (RFC 6587 octet counting or newline framing) and UDP, into the event store.

Why: many security tools forward only syslog (RFC 5424/3164 lines, CEF or LEEF inside them)
and cannot POST HTTP. Each message goes through the same parsers as ``POST /v1/events``
(syslog, CEF, LEEF) into the same ``EventStore``, for one tenant
(``events.syslog.tenant``).

Framing, per TCP connection, decided by its first byte (RFC 6587 §3.4): a digit starts
octet counting (``LEN SP MSG``), anything else (``<PRI>`` normally) newline framing (one
message a line, ``\\n`` or ``\\r\\n``). UDP: one datagram, one message (RFC 5426).

Never crash, never grow without bound: a message over ``max_message_bytes`` is skipped as
it streams past (it is never buffered whole) and counted; a message that does not parse is
counted and logged at DEBUG, with at most one WARNING a minute summarising them; an
octet-count header that is not a number ends that connection (there is no way to find the
next frame), counted too. Writes are batched: the messages received in the last
``flush_s`` (50 ms), or ``flush_events`` (1,000) of them, are parsed and committed in one
transaction by one worker thread, while the event loop goes on receiving. When writing
falls behind by ``max_pending`` messages, TCP connections stop being read until it catches
up (back-pressure to the senders); UDP has no back-pressure, so the kernel drops datagrams
then (``stats.pending_dropped`` counts those the listener itself had to drop).

Delivery: syslog has no acknowledgements, so a message is "in" once committed; a crash
loses at most what was received but not yet flushed (≤ ``flush_s`` of traffic).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ray_qalloc.config import Settings, SyslogListenerSettings
from ray_qalloc.exceptions import ConfigError, InvalidEvent
from ray_qalloc.integration.detect import parse_line
from ray_qalloc.integration.events import SecurityEvent, utc_now
from ray_qalloc.integration.eventstore import EventStore, count_events
from ray_qalloc.integration.gcpause import paused_gc
from ray_qalloc.metrics import metrics

log = logging.getLogger("ray_qalloc.integration.listener")

__all__ = ["SyslogListener", "ListenerStats", "RunningListener", "start_in_thread"]

_MAX_LEN_DIGITS = 10   # an octet count longer than this is not a length


@dataclass
class ListenerStats:
    """Counters since start (a snapshot via ``SyslogListener.stats``)."""

    connections: int = 0
    received: int = 0           # messages framed (TCP) or datagrams (UDP), before parsing
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0           # did not parse (each logged at DEBUG)
    oversized: int = 0          # over max_message_bytes: skipped unread
    framing_errors: int = 0     # a TCP connection whose octet count was not a number (closed)
    pending_dropped: int = 0    # UDP messages dropped because writing fell behind
    write_errors: int = 0       # batches the store refused (logged; their messages are lost)
    batches: int = 0


def parse_message(text: str, tenant: str, now: Any) -> SecurityEvent:
    """One syslog message, read as the HTTP endpoint reads an undeclared line
    (``detect.parse_line``): CEF or LEEF behind any syslog header or none, else syslog."""
    return parse_line(text, tenant=tenant, received_at=now)


def _too_big(message: bytes | bytearray, limit: int) -> bool:
    """Over ``limit`` bytes, not counting the line end that ends it."""
    size = len(message)
    if size <= limit:
        return False
    if message.endswith(b"\r\n"):
        size -= 2
    elif message.endswith(b"\n") or message.endswith(b"\r"):
        size -= 1
    return size > limit


class _TcpConnection(asyncio.Protocol):
    """One TCP connection's framing: detected on its first byte, bounded buffer."""

    def __init__(self, owner: SyslogListener) -> None:
        self.owner = owner
        self.limit = owner.settings.max_message_bytes
        self.mode: str | None = None      # "octet" | "newline"
        self.buf = bytearray()
        self.skip = 0                     # octet mode: bytes of an oversized frame still to discard
        self.discarding = False           # newline mode: inside an oversized line, until its "\n"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner._stats.connections += 1
        self.owner._connections.add(self)
        if self.owner._paused:
            transport.pause_reading()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._connections.discard(self)
        if self.mode == "newline" and self.buf and not self.discarding:
            self.owner._enqueue(bytes(self.buf), "syslog_tcp")   # a last line without its "\n"
        self.buf.clear()

    def data_received(self, data: bytes) -> None:
        try:
            if self.mode is None:
                data = data.lstrip()
                if not data:
                    return
                self.mode = "octet" if data[:1].isdigit() else "newline"
            if self.mode == "octet":
                self._octets(data)
            else:
                self._lines(data)
        except Exception:  # never let one connection's bytes take the listener down
            log.exception("syslog TCP connection: unexpected error; closing it")
            if self.transport is not None:
                self.transport.close()

    def _octets(self, data: bytes) -> None:
        """``LEN SP MSG`` frames; the buffer is trimmed once per read, not once per frame."""
        if self.skip:   # the rest of an oversized frame streams past unbuffered
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
            if not data:
                return
        buf = self.buf
        buf += data
        pos, size = 0, len(buf)
        while pos < size:
            if buf[pos] in b" \r\n\t":   # stray whitespace between frames
                pos += 1
                continue
            sp = buf.find(b" ", pos, pos + _MAX_LEN_DIGITS + 1)
            if sp < 0:
                if size - pos > _MAX_LEN_DIGITS or not bytes(buf[pos:]).isdigit():
                    return self._bad_frame()
                break   # the length is still arriving
            head = bytes(buf[pos:sp])
            if not head.isdigit() or head[:1] == b"0":
                return self._bad_frame()
            length = int(head)
            end = sp + 1 + length
            if length > self.limit:
                self.owner._oversized()
                if end <= size:
                    pos = end
                    continue
                self.skip, pos = end - size, size
                break
            if end > size:
                break   # the message is still arriving (a bounded wait: length <= limit)
            self.owner._enqueue(bytes(buf[sp + 1:end]), "syslog_tcp")
            pos = end
        del buf[:pos]

    def _bad_frame(self) -> None:
        self.owner._stats.framing_errors += 1
        log.warning("syslog TCP: an octet-counted frame does not start with a length (got %r); closing the "
                    "connection", bytes(self.buf[:16]))
        self.buf.clear()
        if self.transport is not None:
            self.transport.close()

    def _lines(self, data: bytes) -> None:
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self.discarding:
                self.discarding = False
            elif self.buf:
                self.buf += data[start:nl]
                if _too_big(self.buf, self.limit):
                    self.owner._oversized()
                else:
                    self.owner._enqueue(bytes(self.buf), "syslog_tcp")
                self.buf.clear()
            else:
                line = data[start:nl]
                if _too_big(line, self.limit):
                    self.owner._oversized()
                elif line.strip():
                    self.owner._enqueue(line, "syslog_tcp")
            start = nl + 1
        tail = data[start:]
        if not tail or self.discarding:
            return
        if len(self.buf) + len(tail) > self.limit + 1:
            self.owner._oversized()
            self.buf.clear()
            self.discarding = True
        else:
            self.buf += tail


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: SyslogListener) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if _too_big(data, self.owner.settings.max_message_bytes):
            self.owner._oversized()
            return
        self.owner._enqueue(data, "syslog_udp", droppable=True)

    def error_received(self, exc: Exception) -> None:  # ICMP errors and such: nothing to do
        log.debug("syslog UDP: %s", exc)


class SyslogListener:
    """The asyncio receiver; ``await start()`` in a running loop, ``await stop()`` to flush and end."""

    def __init__(self, settings: SyslogListenerSettings, store: EventStore, *, flush_s: float = 0.05,
                 flush_events: int = 1_000, max_pending: int = 100_000) -> None:
        self.settings = settings
        self.store = store
        self.flush_s = flush_s
        self.flush_events = flush_events
        self.max_pending = max_pending
        self._stats = ListenerStats()
        self._pending: list[tuple[bytes, str]] = []
        self._connections: set[_TcpConnection] = set()
        self._paused = False
        self._tcp: asyncio.base_events.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qalloc-syslog-write")
        self._stopping = False
        self._bad_since_warning = 0
        self._last_warning = 0.0
        self.tcp_port: int | None = None
        self.udp_port: int | None = None

    @property
    def stats(self) -> ListenerStats:
        return ListenerStats(**asdict(self._stats))

    # ---- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        self._wake = asyncio.Event()
        if s.tcp_port is not None:
            self._tcp = await loop.create_server(lambda: _TcpConnection(self), s.host, s.tcp_port)
            self.tcp_port = self._tcp.sockets[0].getsockname()[1]
        if s.udp_port is not None:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(s.host, s.udp_port))
            self._udp = transport
            self.udp_port = transport.get_extra_info("sockname")[1]
            _grow_receive_buffer(transport)
        self._flusher = asyncio.create_task(self._flush_loop(), name="qalloc-syslog-flush")
        log.info("syslog listener on %s (tcp %s, udp %s) for tenant %r", s.host, self.tcp_port, self.udp_port,
                 s.tenant)

    async def stop(self) -> None:
        """Stop receiving, write what was received, release the sockets."""
        self._stopping = True
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._tcp.wait_closed()
        if self._udp is not None:
            self._udp.close()
        if self._wake is not None:
            self._wake.set()
        if self._flusher is not None:
            await self._flusher
        self._writer.shutdown(wait=True)

    # ---- receiving ---------------------------------------------------------------------------
    def _enqueue(self, message: bytes, source: str, *, droppable: bool = False) -> None:
        if droppable and len(self._pending) >= self.max_pending:
            self._stats.pending_dropped += 1
            return
        self._stats.received += 1
        self._pending.append((message, source))
        if len(self._pending) >= self.flush_events and self._wake is not None:
            self._wake.set()
        if len(self._pending) >= self.max_pending and not self._paused:
            self._pause(True)

    def _oversized(self) -> None:
        self._stats.oversized += 1
        self._bad(f"a message over max_message_bytes={self.settings.max_message_bytes}", None)

    def _pause(self, paused: bool) -> None:
        self._paused = paused
        for conn in self._connections:
            if conn.transport is not None:
                (conn.transport.pause_reading if paused else conn.transport.resume_reading)()

    # ---- writing -----------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:self.flush_events * 10], self._pending[self.flush_events * 10:]
                try:
                    await loop.run_in_executor(self._writer, self._write, batch)
                except Exception:  # a store outage: log it, keep listening
                    self._stats.write_errors += 1
                    log.exception("syslog listener: could not store %d messages", len(batch))
                if self._paused and len(self._pending) < self.max_pending // 2:
                    self._pause(False)
                if not self._stopping and len(self._pending) < self.flush_events:
                    break
            if self._stopping and not self._pending:
                return

    def _write(self, batch: list[tuple[bytes, str]]) -> None:
        """Parse and commit one batch (in the writer thread), the cyclic garbage collector paused
        (``gcpause``: the batch's objects all survive until the commit)."""
        with paused_gc():
            self._write_batch(batch)

    def _write_batch(self, batch: list[tuple[bytes, str]]) -> None:
        tenant = self.settings.tenant
        now = utc_now()
        events: list[SecurityEvent] = []
        sources: list[str] = []
        for raw, source in batch:
            try:
                text = raw.decode("utf-8").rstrip("\r\n").lstrip("\ufeff")
            except UnicodeDecodeError as exc:
                self._rejected(source, f"not UTF-8 (byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                events.append(parse_message(text, tenant, now))
                sources.append(source)
            except InvalidEvent as exc:
                self._rejected(source, exc.message)
        if events:
            stored, dups = self.store.add_many(events)
            self._stats.stored += stored
            self._stats.duplicates += dups
            _count_by_source(events, sources, dups)
        self._stats.batches += 1

    def _rejected(self, source: str, reason: str) -> None:
        self._stats.rejected += 1
        metrics.events_in(source, None, "rejected", 1)
        self._bad(reason, source)

    def _bad(self, reason: str, source: str | None) -> None:
        """DEBUG per bad message; at most one WARNING a minute with how many there were."""
        log.debug("syslog listener: bad message (%s): %s", source or "-", reason)
        self._bad_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            log.warning("syslog listener: %d bad message(s) since the last report; the latest: %s",
                        self._bad_since_warning, reason)
            self._bad_since_warning = 0
            self._last_warning = now


def _count_by_source(events: list[SecurityEvent], sources: list[str], dups: int) -> None:
    for src in set(sources):   # duplicates are known per batch: charged to the first source
        mine = [e for e, s in zip(events, sources) if s == src]
        d = min(dups, len(mine))
        dups -= d
        count_events(mine, d, src)


def _grow_receive_buffer(transport: asyncio.DatagramTransport, size: int = 8 * 1024 * 1024) -> None:
    """Ask for a larger UDP receive buffer (the kernel caps it at net.core.rmem_max): bursts then
    wait in the kernel while a batch is being written instead of being dropped."""
    import socket

    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass


# ---- a listener in a thread of its own: for ``qalloc serve`` (a process without a loop) -------------
class RunningListener:
    """A ``SyslogListener`` on its own event loop in a daemon thread; ``stop()`` flushes and ends it."""

    def __init__(self, listener: SyslogListener) -> None:
        self.listener = listener
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qalloc-syslog", daemon=True)

    def _start(self, timeout: float) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.listener.start(), self._loop).result(timeout)

    @property
    def tcp_port(self) -> int | None:
        return self.listener.tcp_port

    @property
    def udp_port(self) -> int | None:
        return self.listener.udp_port

    def stop(self, timeout: float = 30.0) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.listener.stop(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self.listener.store.close()


def start_in_thread(settings: Settings, *, timeout: float = 30.0, **kwargs: Any) -> RunningListener | None:
    """Start the listener of ``settings.events.syslog`` (on the job store's database) when a
    TCP or UDP port is configured; None when neither is."""
    syslog = settings.events.syslog
    if syslog.tcp_port is None and syslog.udp_port is None:
        return None
    store = EventStore(settings.resolved_store_url, settings.events)
    running = RunningListener(SyslogListener(syslog, store, **kwargs))
    try:
        running._start(timeout)
    except BaseException as exc:
        running._loop.call_soon_threadsafe(running._loop.stop)
        store.close()
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot listen for syslog on {syslog.host} (tcp {syslog.tcp_port}, udp "
                              f"{syslog.udp_port}): {exc}.", field="events.syslog",
                              fix="choose free ports (0: any) or another host in events.syslog.") from None
        raise
    return running
