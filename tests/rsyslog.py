"""A real rsyslog for the syslog sink's tests: ``rsyslog`` starts one per session.

The daemon is the machine's own ``rsyslogd`` (Debian's ``rsyslog`` package, which ``.ci/run``
installs), run in the foreground as the current user with a configuration of our own: imtcp
(octet-counted and LF framing) and imudp on free loopback ports, every message written to
a file with the RFC 5424 template (``RSYSLOG_SyslogProtocol23Format``), nothing read from or
written to the system's syslog. It is ready when a probe sent over each transport has come
out in that file. When it cannot be started the tests skip, and the reason is repeated in
the terminal summary, as for PostgreSQL in ``tests/dbs.py``, so a skipped run is never taken
for a passed one.

``parse_rfc5424`` splits what rsyslog wrote back into its fields, structured data included,
so tests assert on what a receiver saw, not on what the sink meant to send.
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

_PROBE_MSGID = "qalloc-probe"


@dataclass
class _RsState:
    """What this session's rsyslog is, for the fixture and the terminal summary."""

    skip_reason: str | None = None
    description: str = ""
    tests_run: int = 0


_RS = _RsState()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """One line saying whether the rsyslog cases ran, and on what; visible even with -q."""
    if _RS.skip_reason is not None:
        terminalreporter.write_line(f"rsyslog syslog-sink tests SKIPPED: {_RS.skip_reason}", yellow=True, bold=True)
    elif _RS.description:
        terminalreporter.write_line(f"rsyslog syslog-sink tests: {_RS.tests_run} ran on {_RS.description}")


# ---- what rsyslog wrote ---------------------------------------------------------------------
@dataclass(frozen=True)
class SyslogMessage:
    """One RFC 5424 message as a receiver parsed it."""

    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]]
    msg: str
    raw: str = field(repr=False)

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8


_HEADER = re.compile(r"^<(\d{1,3})>(\d{1,2}) (\S+) (\S+) (\S+) (\S+) (\S+) (.*)$", re.S)


def _parse_sd(text: str) -> tuple[dict[str, dict[str, str]], str]:
    """STRUCTURED-DATA at the start of ``text`` (RFC 5424 §6.3, escapes undone) and the rest."""
    if text.startswith("-"):
        return {}, text[1:]
    elements: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(text) and text[i] == "[":
        end_id = min(j for j in (text.find(" ", i), text.find("]", i)) if j != -1)
        sd_id, params = text[i + 1:end_id], {}
        i = end_id
        while text[i] == " ":
            eq = text.index("=", i)
            name = text[i + 1:eq]
            if text[eq + 1] != '"':
                raise ValueError(f"SD-PARAM {name!r} value is not quoted: {text!r}")
            j, value = eq + 2, []
            while text[j] != '"':
                if text[j] == "\\" and text[j + 1] in '"\\]':
                    value.append(text[j + 1])
                    j += 2
                else:
                    value.append(text[j])
                    j += 1
            params[name] = "".join(value)
            i = j + 1
        if text[i] != "]":
            raise ValueError(f"SD-ELEMENT {sd_id!r} not closed: {text!r}")
        elements[sd_id] = params
        i += 1
    return elements, text[i:]


def parse_rfc5424(line: str) -> SyslogMessage:
    m = _HEADER.match(line)
    if m is None:
        raise ValueError(f"not an RFC 5424 line: {line!r}")
    pri, version, ts, host, app, procid, msgid, rest = m.groups()
    sd, tail = _parse_sd(rest)
    msg = tail[1:] if tail.startswith(" ") else tail
    return SyslogMessage(pri=int(pri), version=int(version), timestamp=ts, hostname=host, app_name=app,
                         procid=procid, msgid=msgid, sd=sd, msg=msg.removeprefix("\ufeff"), raw=line)


# ---- the daemon --------------------------------------------------------------------------------
@dataclass
class Rsyslog:
    """A running rsyslogd: where to send, and what it has written."""

    tcp_port: int
    udp_port: int
    out: Path
    version: str

    def messages(self) -> list[SyslogMessage]:
        """Everything received so far, probes left out."""
        if not self.out.exists():
            return []
        text = self.out.read_text(encoding="utf-8", errors="replace")
        # rsyslog may be half-way through writing the last line: only complete lines count
        lines = text.split("\n")[:-1]
        return [m for m in map(parse_rfc5424, filter(None, lines)) if m.msgid != _PROBE_MSGID]

    def wait_for(self, predicate: Callable[[SyslogMessage], bool], count: int = 1,
                 timeout_s: float = 10.0) -> list[SyslogMessage]:
        """The received messages matching ``predicate``, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [m for m in self.messages() if predicate(m)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CONF = """\
global(workDirectory="{base}" maxMessageSize="64k")
module(load="imtcp")
module(load="imudp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{base}/tcp.port" ruleset="qalloc")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="qalloc")
ruleset(name="qalloc") {{
  action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format"
         asyncWriting="off" flushOnTXEnd="on")
}}
"""


def _probe(base: Path, out: Path, tcp_port: int, udp_port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Send a probe over each transport until both have come out in the file."""
    deadline = time.monotonic() + timeout_s
    tokens = {"tcp": secrets.token_hex(4), "udp": secrets.token_hex(4)}
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"rsyslogd exited with {proc.returncode}: " + _tail(base / "rsyslogd.log"))
        text = out.read_text(errors="replace") if out.exists() else ""
        missing = [t for t, tok in tokens.items() if tok not in text]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"rsyslogd did not write probes over {missing} within {timeout_s:g} s: "
                               + _tail(base / "rsyslogd.log"))
        for transport in missing:
            msg = f"<14>1 - - qalloc-test - {_PROBE_MSGID} - {tokens[transport]}".encode()
            try:
                if transport == "tcp":
                    with socket.create_connection(("127.0.0.1", tcp_port), timeout=1) as s:
                        s.sendall(str(len(msg)).encode() + b" " + msg)
                else:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.sendto(msg, ("127.0.0.1", udp_port))
            except OSError:
                pass
        time.sleep(0.1)


def _tail(path: Path) -> str:
    if not path.exists():
        return "(no output)"
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:]) or "(no output)"


def _start(timeout_s: float = 15.0) -> tuple[Rsyslog, Callable[[], None]]:
    """Start rsyslogd; return it and a stop function. Raises RuntimeError with a reason."""
    binary = shutil.which("rsyslogd") or next((p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd")
                                               if Path(p).exists()), None)
    if binary is None:
        raise RuntimeError("no rsyslogd on PATH or in /usr/sbin; install Debian's 'rsyslog' package "
                           "(apt-get install -y --no-install-recommends rsyslog)")
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    version_text = " ".join(version[0].split(" compiled")[0].split()) if version else "rsyslogd"
    base = Path(tempfile.mkdtemp(prefix="qalloc-rsyslog-", dir="/tmp"))
    out, conf, pid = base / "received.log", base / "rsyslog.conf", base / "rsyslogd.pid"
    udp_port = _free_udp_port()
    conf.write_text(_CONF.format(base=base, udp_port=udp_port, out=out))
    log = open(base / "rsyslogd.log", "wb")
    proc = subprocess.Popen([binary, "-n", "-f", str(conf), "-i", str(pid)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=base)

    def stop() -> None:
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            log.close()
            shutil.rmtree(base, ignore_errors=True)

    try:
        port_file = base / "tcp.port"
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited with {proc.returncode}: " + _tail(base / "rsyslogd.log"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"rsyslogd wrote no TCP port within {timeout_s:g} s: " + _tail(base / "rsyslogd.log"))
            time.sleep(0.02)
        tcp_port = int(port_file.read_text().strip())
        _probe(base, out, tcp_port, udp_port, proc, timeout_s)
    except BaseException:
        stop()
        raise
    return Rsyslog(tcp_port=tcp_port, udp_port=udp_port, out=out, version=version_text), stop


@pytest.fixture(scope="session")
def rsyslog_server() -> Iterator[Rsyslog]:
    """One rsyslogd for the session; skips (visibly) when there is none to start."""
    if _RS.skip_reason is not None:
        pytest.skip(_RS.skip_reason)
    t0 = time.perf_counter()
    try:
        server, stop = _start()
    except Exception as exc:  # noqa: BLE001 - every reason ends the same way: a visible skip
        _RS.skip_reason = f"cannot start rsyslogd: {exc}"
        pytest.skip(_RS.skip_reason)
    _RS.description = (f"{server.version} on 127.0.0.1 (tcp {server.tcp_port}, udp {server.udp_port}; "
                       f"started in {time.perf_counter() - t0:.2f} s)")
    try:
        yield server
    finally:
        stop()


@pytest.fixture()
def rsyslog(rsyslog_server: Rsyslog) -> Rsyslog:
    """The session's rsyslogd, counted for the terminal summary."""
    _RS.tests_run += 1
    return rsyslog_server
