"""Where alert events go: a signed JSON webhook, and syslog (RFC 5424) over TCP or UDP.

A sink delivers one event (the ``AlertEvent.to_dict()`` form) or raises ``DeliveryError``;
the outbox's dispatcher owns retries, backoff and bookkeeping, so a sink stays a plain
"send this once" with no state worth keeping.

The exception tree::

    DeliveryError            the event did not (verifiably) reach the receiver; retry later
    └── (permanent=True)     the receiver refused it for good (HTTP 4xx, oversized datagram):
                             retrying cannot help, the dispatcher gives up on it at once

Webhook signing: the body is signed with HMAC-SHA256 over ``<timestamp>.<body>`` with a
shared secret, sent as ``X-Qalloc-Signature: sha256=<hex>`` beside ``X-Qalloc-Timestamp``.
The timestamp is inside the signed bytes, so a captured request cannot be replayed later
with a fresh timestamp; ``verify_signature`` checks both the signature (constant time) and
the age. ``Idempotency-Key`` carries the event's key: a retry after a lost response repeats
it, and the receiver drops the duplicate.

Syslog: RFC 5424 (``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG``), with the
alert's fields as structured data under a private enterprise number (32473, the one RFC 5612
reserves for documentation, until the operator sets their own). Over TCP each message is
framed by octet counting (RFC 6587 §3.4.1), so any byte may appear in it; over UDP one
datagram is one message (RFC 5426). Neither transport acknowledges: a TCP write that
succeeded may still be lost if the receiver dies before reading it. The sink checks that the
peer has not closed the connection before each write to catch the common case (a restarted
daemon); RELP would be needed to close the gap entirely.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import hmac
import json
import os
import re
import select
import socket
import threading
import time
from typing import Annotated, Any, Callable, Literal, Mapping, Protocol, Union

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ray_qalloc.alerts.rules import Severity

SIGNATURE_HEADER = "X-Qalloc-Signature"
TIMESTAMP_HEADER = "X-Qalloc-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: RFC 5612's enterprise number for documentation; set ``enterprise_id`` to your own PEN.
DOC_ENTERPRISE_ID = "32473"
_USER_AGENT = "ray-qalloc-alerts"


class DeliveryError(Exception):
    """An event was not delivered. ``permanent``: retrying will not help; ``retry_after_s``:
    the receiver asked to wait at least this long."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after_s = retry_after_s


class Sink(Protocol):
    """What the dispatcher needs of a sink."""

    name: str

    def send(self, event: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


# ---- webhook ----------------------------------------------------------------------------------
class WebhookConfig(BaseModel):
    """A JSON webhook receiver."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["webhook"] = "webhook"
    url: str = Field(..., description="http(s) URL the events are POSTed to.")
    secret: SecretStr = Field(..., min_length=16, description="Shared HMAC secret, at least 16 characters.")
    timeout_s: float = Field(5.0, gt=0, le=120, description="Connect and read timeout per request.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers (e.g. routing).")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        url = httpx.URL(v)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{v!r} is not an http(s) URL with a host")
        return v


def canonical_body(event: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): sorted keys, no spaces, UTF-8."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def sign(secret: str | bytes, body: bytes, timestamp: str) -> str:
    """The ``X-Qalloc-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, timestamp: str | None, signature: str | None, *,
                     now: float | None = None, tolerance_s: float = 300.0) -> bool:
    """For receivers: True when ``signature`` signs ``body`` at ``timestamp`` with ``secret`` and
    the timestamp is within ``tolerance_s`` of ``now`` (older requests are replays)."""
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), signature)


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds (RFC 9110: delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


class WebhookSink:
    """POSTs each event as signed JSON; 2xx is delivered, 408/425/429/5xx and network errors
    are retried, other answers are permanent refusals."""

    def __init__(self, name: str, config: WebhookConfig, *, client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._own_client = client is None
        self._client = client or httpx.Client(timeout=config.timeout_s, follow_redirects=False)

    def send(self, event: Mapping[str, Any]) -> None:
        body = canonical_body(event)
        ts = str(int(self._clock()))
        headers = {**self.config.headers, "Content-Type": "application/json", "User-Agent": _USER_AGENT,
                   TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(self.config.secret.get_secret_value(), body, ts),
                   IDEMPOTENCY_HEADER: str(event["key"])}
        try:
            resp = self._client.post(self.config.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"webhook {self.name}: {exc.__class__.__name__}: {exc}") from None
        if 200 <= resp.status_code < 300:
            return
        detail = f"webhook {self.name} answered HTTP {resp.status_code}"
        if resp.status_code in (408, 425, 429) or resp.status_code >= 500:
            raise DeliveryError(detail, retry_after_s=_retry_after(resp.headers.get("Retry-After"), self._clock()))
        raise DeliveryError(detail + " (refused: not retried)", permanent=True)

    def close(self) -> None:
        if self._own_client:
            self._client.close()


# ---- syslog -----------------------------------------------------------------------------------
_FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
               "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14,
               "clock": 15, **{f"local{i}": 16 + i for i in range(8)}}


class SyslogConfig(BaseModel):
    """A syslog receiver (rsyslog, syslog-ng, a SIEM's collector)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["syslog"] = "syslog"
    host: str = Field("127.0.0.1", min_length=1, description="Receiver host name or address.")
    port: int = Field(514, ge=1, le=65535, description="Receiver port.")
    transport: Literal["tcp", "udp"] = Field("tcp", description="TCP (octet-counted, RFC 6587) or UDP (RFC 5426).")
    facility: int = Field(16, ge=0, le=23, description="Facility number or name (local0 = 16 by default).")
    app_name: str = Field("ray-qalloc", max_length=48, pattern=r"^[!-~]+$", description="RFC 5424 APP-NAME.")
    hostname: str | None = Field(None, max_length=255, pattern=r"^[!-~]+$",
                                 description="RFC 5424 HOSTNAME; this machine's name when unset.")
    enterprise_id: str = Field(DOC_ENTERPRISE_ID, pattern=r"^[0-9]+(\.[0-9]+)*$",
                               description="Private enterprise number of the structured-data IDs.")
    timeout_s: float = Field(5.0, gt=0, le=120, description="TCP connect and send timeout.")
    max_message_bytes: int = Field(2048, ge=480, le=65507, description="Longest message; the MSG part is "
                                   "cut to fit (2048 is what RFC 5426 says every receiver should accept).")
    bom: bool = Field(True, description="Start MSG with the UTF-8 byte order mark, as RFC 5424 asks.")

    @field_validator("facility", mode="before")
    @classmethod
    def _facility_name(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.isdigit():
            if v.lower() not in _FACILITIES:
                raise ValueError(f"unknown facility {v!r}; use 0..23 or one of {', '.join(_FACILITIES)}")
            return _FACILITIES[v.lower()]
        return v


def syslog_severity(event: Mapping[str, Any]) -> int:
    """The RFC 5424 severity of an event: a firing alert's own; a resolve is informational;
    a rate-limit summary is a notice."""
    status = event["status"]
    if status == "firing":
        return Severity(event["severity"]).syslog
    return Severity.INFO.syslog if status == "resolved" else Severity.NOTICE.syslog


def _sd_escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_element(sd_id: str, params: Mapping[str, Any]) -> str:
    body = "".join(f' {k}="{_sd_escape(v)}"' for k, v in params.items() if v is not None)
    return f"[{sd_id}{body}]"


def _header_field(value: str, limit: int) -> str:
    """A header field as RFC 5424 allows it: printable US-ASCII, bounded, or NILVALUE."""
    cleaned = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return cleaned or "-"


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def format_rfc5424(event: Mapping[str, Any], *, facility: int = 16, hostname: str | None = None,
                   app_name: str = "ray-qalloc", procid: str | None = None,
                   enterprise_id: str = DOC_ENTERPRISE_ID, bom: bool = True, max_bytes: int = 2048) -> bytes:
    """One alert event as an RFC 5424 message (without transport framing).

    The alert's fields go in ``[alert@PEN ...]``, its labels in ``[labels@PEN ...]``, a rate
    limit summary's counts in ``[summary@PEN ...]``; MSG is the event's summary on one line,
    cut (on a character boundary) so the whole message fits ``max_bytes``."""
    pri = facility * 8 + syslog_severity(event)
    host = _header_field(hostname or socket.gethostname(), 255)
    header = (f"<{pri}>1 {_rfc3339(float(event['at']))} {host} {_header_field(app_name, 48)} "
              f"{_header_field(procid or str(os.getpid()), 128)} {_header_field('alert-' + event['status'], 32)} ")
    alert = {"status": event["status"], "rule": event["rule"], "kind": event["kind"],
             "severity": event["severity"], "fingerprint": event["fingerprint"], "key": event["key"],
             "value": event.get("value"), "threshold": event.get("threshold"),
             "active_since": None if event.get("active_since") is None else _rfc3339(event["active_since"]),
             "fired_at": None if event.get("fired_at") is None else _rfc3339(event["fired_at"])}
    sd = _sd_element(f"alert@{enterprise_id}", alert)
    if event.get("labels"):
        sd += _sd_element(f"labels@{enterprise_id}", dict(sorted(event["labels"].items())))
    if event["status"] == "suppressed":
        details = event.get("details") or {}
        counts = details.get("by_status") or {}
        sd += _sd_element(f"summary@{enterprise_id}", {"suppressed": details.get("suppressed"),
                                                       "firing": counts.get("firing", 0),
                                                       "resolved": counts.get("resolved", 0)})
    head = (header + sd).encode()
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(event.get("summary") or "")).strip()
    msg = ("\ufeff" if bom else "").encode() + text.encode()
    room = max_bytes - len(head) - 1
    if room < 0:
        raise DeliveryError(f"the alert's header and structured data alone take {len(head)} bytes, more than "
                            f"max_message_bytes={max_bytes}", permanent=True)
    if not text:
        return head
    if len(msg) > room:
        msg = msg[:room].decode("utf-8", errors="ignore").encode()
    return head + b" " + msg


def octet_frame(message: bytes) -> bytes:
    """RFC 6587 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode() + b" " + message


class SyslogSink:
    """Sends each event as one RFC 5424 message; keeps one TCP connection, reconnecting as needed."""

    def __init__(self, name: str, config: SyslogConfig) -> None:
        self.name = name
        self.config = config
        self._hostname = config.hostname or socket.gethostname()
        self._procid = str(os.getpid())
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def format(self, event: Mapping[str, Any]) -> bytes:
        c = self.config
        return format_rfc5424(event, facility=c.facility, hostname=self._hostname, app_name=c.app_name,
                              procid=self._procid, enterprise_id=c.enterprise_id, bom=c.bom,
                              max_bytes=c.max_message_bytes)

    def send(self, event: Mapping[str, Any]) -> None:
        message = self.format(event)
        with self._lock:
            if self.config.transport == "udp":
                self._send_udp(message)
            else:
                self._send_tcp(octet_frame(message))

    def _send_udp(self, message: bytes) -> None:
        c = self.config
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(c.host, c.port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, kind, proto) as s:
                s.sendto(message, addr)
        except OSError as exc:
            raise DeliveryError(f"syslog {self.name} (udp {c.host}:{c.port}): {exc}") from None

    def _peer_closed(self, sock: socket.socket) -> bool:
        """A syslog receiver never writes: a readable socket means it closed (or reset) the connection."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send_tcp(self, frame: bytes) -> None:
        c = self.config
        if self._sock is not None and self._peer_closed(self._sock):
            self._drop()
        try:
            if self._sock is None:
                self._sock = socket.create_connection((c.host, c.port), timeout=c.timeout_s)
            self._sock.sendall(frame)
        except OSError as exc:
            self._drop()
            raise DeliveryError(f"syslog {self.name} (tcp {c.host}:{c.port}): {exc}") from None

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()


SinkConfig = Annotated[Union[WebhookConfig, SyslogConfig], Field(discriminator="type")]


def build_sink(name: str, config: WebhookConfig | SyslogConfig) -> Sink:
    """The sink a configuration describes."""
    if isinstance(config, WebhookConfig):
        return WebhookSink(name, config)
    return SyslogSink(name, config)
