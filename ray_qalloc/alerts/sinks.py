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

Formats: every sink has ``format``: ``json`` (the default: the webhook's signed JSON of
``AlertEvent.to_dict()``, syslog's one-line summary) or a SIEM's own, rendered by
``ray_qalloc.integration.formats`` — ``ocsf`` (an OCSF Detection Finding, JSON) or ``cef``
(one CEF line). On the webhook the body is that record (CEF as text/plain); on syslog the
MSG part is its text, with the structured data as before, and it is never cut (a cut JSON
or CEF record would not parse): one that does not fit ``max_message_bytes`` is refused.

Splunk HEC: ``SplunkHecSink`` POSTs ``{"time", "host", "source", "sourcetype", "index",
"event", "fields": {"idempotency_key"}}`` to ``<url>/services/collector/event`` with
``Authorization: Splunk <token>``. HEC answers with a JSON ``{"text", "code"}``; ``HEC_CODES``
says which codes are worth retrying (busy, unhealthy, internal error) and which are refusals
(bad or disabled token, bad format, index not allowed): see ``hec_outcome``.

Records: every sink has ``records``, the kinds it receives: ``alerts`` (the default, through
the alert outbox), ``jobs`` (job transitions) and ``audit`` (configuration changes), the
last two forwarded from the change feed by ``ray_qalloc.integration.forwarder`` through
``send_record`` — the same transport, signing and ``format``, with the record's dedupe key
where an alert's key goes (``Idempotency-Key``; HEC's ``fields.idempotency_key``; syslog's
structured data ``key`` and CEF's ``externalId``).
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
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Mapping, Protocol, Union

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ray_qalloc.alerts.rules import Severity

if TYPE_CHECKING:
    from ray_qalloc.integration.records import ChangeRecord

SIGNATURE_HEADER = "X-Qalloc-Signature"
TIMESTAMP_HEADER = "X-Qalloc-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: On forwarded records: ``job`` or ``config``, so that one receiver can route both kinds.
RECORD_HEADER = "X-Qalloc-Record"
#: RFC 5612's enterprise number for documentation; set ``enterprise_id`` to your own PEN.
DOC_ENTERPRISE_ID = "32473"
_USER_AGENT = "ray-qalloc-alerts"
#: The ``format`` option of every sink (``ray_qalloc.integration.formats``).
SinkFormat = Literal["json", "ocsf", "cef"]
_FORMAT_DESCRIPTION = ("How each alert is rendered: json (this sink's native payload), ocsf (an OCSF 1.3 "
                       "Detection Finding as JSON) or cef (one ArcSight CEF line).")
#: What a sink may receive (its ``records`` option).
RecordKind = Literal["alerts", "jobs", "audit"]
RECORD_KINDS: tuple[str, ...] = ("alerts", "jobs", "audit")
#: ``records`` entry → the change feed's kind it forwards (alerts go through the outbox).
FORWARDED_KINDS: dict[str, str] = {"jobs": "job", "audit": "config"}


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


class RecordSink(Sink, Protocol):
    """What the forwarder needs of a sink: one job transition or audit change, sent once."""

    def send_record(self, record: "ChangeRecord") -> None: ...


class SinkCommon(BaseModel):
    """What every sink's configuration has, whatever its transport."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    records: list[RecordKind] = Field(default_factory=lambda: ["alerts"], description="What this sink receives: "
                                      "any of alerts (the default), jobs (every job transition) and audit "
                                      "(configuration changes). jobs and audit start at the moment the sink "
                                      "is added, not at the beginning of history.")

    @field_validator("records", mode="before")
    @classmethod
    def _record_kinds(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{v!r} is not a list. To fix: give a list such as [\"alerts\", \"jobs\", \"audit\"]")
        bad = [x for x in v if x not in RECORD_KINDS]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a kind of record a sink receives. To fix: use any of "
                             f"{', '.join(repr(k) for k in RECORD_KINDS)}")
        if not v:
            raise ValueError("the list is empty, so the sink would receive nothing. To fix: list at least one of "
                             f"{', '.join(repr(k) for k in RECORD_KINDS)}, or remove the sink")
        return list(dict.fromkeys(v))

    def forwarded(self) -> set[str]:
        """The records that the change-feed forwarder sends here (jobs, audit)."""
        return {r for r in self.records if r in FORWARDED_KINDS}


# ---- webhook ----------------------------------------------------------------------------------
class WebhookConfig(SinkCommon):
    """A JSON webhook receiver."""

    type: Literal["webhook"] = "webhook"
    url: str = Field(..., description="http(s) URL the events are POSTed to.")
    secret: SecretStr = Field(..., min_length=16, description="Shared HMAC secret, at least 16 characters.")
    timeout_s: float = Field(5.0, gt=0, le=120, description="Connect and read timeout per request.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers (e.g. routing).")
    format: SinkFormat = Field("json", description=_FORMAT_DESCRIPTION)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        return _http_url(v)


def _http_url(v: str) -> str:
    url = httpx.URL(v)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{v!r} is not an http(s) URL with a host. To fix: give a URL like https://host:port/path")
    return v


def render(event: Mapping[str, Any], fmt: str, *, host: str | None = None) -> dict[str, Any] | str:
    """The event as format ``fmt`` (``integration.formats.render_alert``).

    Imported on first use: the default format needs nothing from the SIEM package, so a
    configuration without ``format`` runs exactly the code it ran before formats existed."""
    from ray_qalloc.integration.formats import render_alert

    return render_alert(event, fmt, host=host)


def render_change(record: "ChangeRecord", fmt: str, *, host: str | None = None) -> dict[str, Any] | str:
    """A forwarded job transition or audit change as format ``fmt`` (``formats.render_record``)."""
    from ray_qalloc.integration.formats import render_record

    return render_record(record, fmt, host=host)


def canonical_body(event: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): sorted keys, no spaces, UTF-8."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _encoded(rendered: Mapping[str, Any] | str) -> tuple[bytes, str]:
    """What a webhook POSTs for a rendered record: a CEF line as text, JSON canonical."""
    if isinstance(rendered, str):
        return rendered.encode(), "text/plain; charset=utf-8"
    return canonical_body(rendered), "application/json"


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

    def body(self, event: Mapping[str, Any]) -> tuple[bytes, str]:
        """The bytes POSTed for ``event`` and their content type."""
        return _encoded(event if self.config.format == "json" else render(event, self.config.format))

    def send(self, event: Mapping[str, Any]) -> None:
        body, content_type = self.body(event)
        self._post(body, content_type, str(event["key"]))

    def record_body(self, record: "ChangeRecord") -> tuple[bytes, str]:
        """The bytes POSTed for a forwarded record and their content type."""
        return _encoded(render_change(record, self.config.format))

    def send_record(self, record: "ChangeRecord") -> None:
        body, content_type = self.record_body(record)
        self._post(body, content_type, record.key, {RECORD_HEADER: record.kind})

    def _post(self, body: bytes, content_type: str, key: str, extra: Mapping[str, str] | None = None) -> None:
        ts = str(int(self._clock()))
        headers = {**self.config.headers, **(extra or {}), "Content-Type": content_type, "User-Agent": _USER_AGENT,
                   TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(self.config.secret.get_secret_value(), body, ts),
                   IDEMPOTENCY_HEADER: key}
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


class SyslogConfig(SinkCommon):
    """A syslog receiver (rsyslog, syslog-ng, a SIEM's collector)."""

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
    format: SinkFormat = Field("json", description=_FORMAT_DESCRIPTION + " json sends the alert's summary "
                               "as MSG; ocsf and cef send the record's text as MSG, never cut.")

    @property
    def message_limit(self) -> int:
        """The longest message. ``max_message_bytes`` when set; otherwise 2048, except for an
        ocsf or cef record over TCP: that cannot be cut to fit, and 8192 is what RFC 5425
        asks receivers to accept (rsyslog's and syslog-ng's default limit is 8 KiB too)."""
        if "max_message_bytes" in self.model_fields_set or self.format == "json" or self.transport == "udp":
            return self.max_message_bytes
        return 8192

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
                   enterprise_id: str = DOC_ENTERPRISE_ID, bom: bool = True, max_bytes: int = 2048,
                   body: str | None = None) -> bytes:
    """One alert event as an RFC 5424 message (without transport framing).

    The alert's fields go in ``[alert@PEN ...]``, its labels in ``[labels@PEN ...]``, a rate
    limit summary's counts in ``[summary@PEN ...]``; MSG is the event's summary on one line,
    cut (on a character boundary) so the whole message fits ``max_bytes`` — or ``body``
    exactly (a CEF or OCSF record), which is never cut: one that does not fit is refused."""
    header = _header(facility * 8 + syslog_severity(event), float(event["at"]), hostname, app_name, procid,
                     "alert-" + event["status"])
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
    return _with_msg((header + sd).encode(), body, str(event.get("summary") or ""), bom=bom, max_bytes=max_bytes,
                     what="the alert")


def _header(pri: int, at: float, hostname: str | None, app_name: str, procid: str | None, msgid: str) -> str:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID `` — the one RFC 5424 header writer."""
    host = _header_field(hostname or socket.gethostname(), 255)
    return (f"<{pri}>1 {_rfc3339(at)} {host} {_header_field(app_name, 48)} "
            f"{_header_field(procid or str(os.getpid()), 128)} {_header_field(msgid, 32)} ")


def _with_msg(head: bytes, body: str | None, summary: str, *, bom: bool, max_bytes: int, what: str) -> bytes:
    """HEADER SD, then MSG: ``body`` (a record) whole, or ``summary`` on one line, cut to fit."""
    if body is not None:
        msg = ("\ufeff" if bom else "").encode() + body.encode()
        if len(head) + 1 + len(msg) > max_bytes:
            raise DeliveryError(f"{what} as a syslog message with its record takes {len(head) + 1 + len(msg)} "
                                f"bytes, more than max_message_bytes={max_bytes}; a record is not cut. To fix: raise "
                                f"the sink's max_message_bytes (and the receiver's limit), or use format json",
                                permanent=True)
        return head + b" " + msg
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", summary).strip()
    msg = ("\ufeff" if bom else "").encode() + text.encode()
    room = max_bytes - len(head) - 1
    if room < 0:
        raise DeliveryError(f"{what}'s header and structured data alone take {len(head)} bytes, more than "
                            f"max_message_bytes={max_bytes}", permanent=True)
    if not text:
        return head
    if len(msg) > room:
        msg = msg[:room].decode("utf-8", errors="ignore").encode()
    return head + b" " + msg


#: RFC 5424 severities of forwarded records: a job that failed is a warning, other job
#: transitions are informational, a configuration change is a notice.
_RECORD_SEVERITY = {"job": 6, "job_failed": 4, "config": 5}


def format_record_rfc5424(record: "ChangeRecord", *, facility: int = 16, hostname: str | None = None,
                          app_name: str = "ray-qalloc", procid: str | None = None,
                          enterprise_id: str = DOC_ENTERPRISE_ID, bom: bool = True, max_bytes: int = 2048,
                          body: str | None = None) -> bytes:
    """One forwarded job transition or audit change as an RFC 5424 message.

    MSGID is ``job-<event>`` or ``audit-<action>``; the change's fields go in
    ``[job@PEN ...]`` or ``[audit@PEN ...]``, with ``key`` the record's dedupe key (the audit
    record's own key is ``resource``); MSG is a one-line summary, cut to fit, or ``body`` (a
    CEF or OCSF record) whole."""
    d = record.data
    if record.kind == "job":
        sev = _RECORD_SEVERITY["job_failed" if d.get("to") == "failed" else "job"]
        msgid = f"job-{d.get('event') or d.get('to')}"
        sd = _sd_element(f"job@{enterprise_id}", {"key": record.key, "job_id": d.get("job_id"),
                                                 "event": d.get("event"), "from": d.get("from"), "to": d.get("to"),
                                                 "tenant": d.get("tenant"), "priority": d.get("priority")})
    else:
        sev = _RECORD_SEVERITY["config"]
        msgid = f"audit-{d.get('action')}"
        sd = _sd_element(f"audit@{enterprise_id}", {"key": record.key, "actor": d.get("actor"),
                                                   "action": d.get("action"), "resource": d.get("key")})
    header = _header(facility * 8 + sev, float(record.at), hostname, app_name, procid, msgid)
    return _with_msg((header + sd).encode(), body, record.summary(), bom=bom, max_bytes=max_bytes,
                     what=f"the {'job transition' if record.kind == 'job' else 'audit record'} {record.key}")


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

    def _options(self, rendered: Any) -> dict[str, Any]:
        """The RFC 5424 options of this sink, with the MSG of a SIEM format (None: the JSON default)."""
        c = self.config
        body = None
        if c.format != "json":
            from ray_qalloc.integration.formats import record_text

            body = record_text(rendered())
        return {"facility": c.facility, "hostname": self._hostname, "app_name": c.app_name, "procid": self._procid,
                "enterprise_id": c.enterprise_id, "bom": c.bom, "max_bytes": c.message_limit, "body": body}

    def format(self, event: Mapping[str, Any]) -> bytes:
        return format_rfc5424(event, **self._options(lambda: render(event, self.config.format, host=self._hostname)))

    def format_record(self, record: "ChangeRecord") -> bytes:
        return format_record_rfc5424(record, **self._options(
            lambda: render_change(record, self.config.format, host=self._hostname)))

    def send_record(self, record: "ChangeRecord") -> None:
        self._send(self.format_record(record))

    def send(self, event: Mapping[str, Any]) -> None:
        self._send(self.format(event))

    def _send(self, message: bytes) -> None:
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


# ---- Splunk HTTP Event Collector -------------------------------------------------------------
#: HEC's answer codes (the ``code`` of its JSON reply), their text, and whether a retry can
#: help. Refusals (a bad or disabled token, a malformed event, an index the token may not
#: write to) do not get better by waiting; busy, unhealthy and internal errors do.
HEC_CODES: dict[int, tuple[str, bool]] = {
    0: ("Success", False), 1: ("Token disabled", False), 2: ("Token is required", False),
    3: ("Invalid authorization", False), 4: ("Invalid token", False), 5: ("No data", False),
    6: ("Invalid data format", False), 7: ("Incorrect index", False), 8: ("Internal server error", True),
    9: ("Server is busy", True), 10: ("Data channel is missing", False), 11: ("Invalid data channel", False),
    12: ("Event field is required", False), 13: ("Event field cannot be blank", False),
    14: ("ACK is disabled", False), 15: ("Error in handling indexed fields", False),
    16: ("Query string authorization is not enabled", False), 17: ("HEC is healthy", False),
    18: ("HEC is unhealthy, queues are full", True), 19: ("HEC is unhealthy, ack service unavailable", True),
    20: ("HEC is unhealthy, queues are full, ack service unavailable", True),
}
HEC_EVENT_PATH = "/services/collector/event"
_HEC_FIXES = {1: "enable the token in Splunk (Settings > Data inputs > HTTP Event Collector)",
              2: "set the sink's token", 3: "set the sink's token (sent as 'Authorization: Splunk <token>')",
              4: "set the sink's token to one Splunk knows", 7: "set index to one of the token's allowed indexes, "
              "or allow it on the token", 10: "turn off indexer acknowledgement on the token",
              11: "turn off indexer acknowledgement on the token"}


class SplunkHecConfig(SinkCommon):
    """A Splunk HTTP Event Collector (Splunk Enterprise or Cloud)."""

    type: Literal["splunk_hec"] = "splunk_hec"
    url: str = Field(..., description="The collector's base URL, e.g. https://splunk:8088 (the event endpoint "
                                      f"{HEC_EVENT_PATH} is added unless the URL already ends with it).")
    token: SecretStr = Field(..., min_length=1, description="The HEC token (sent as 'Authorization: Splunk <token>').")
    index: str | None = Field(None, min_length=1, description="Target index; the token's default index when unset.")
    source: str = Field("ray-qalloc", min_length=1, description="The events' source.")
    sourcetype: str | None = Field(None, min_length=1, description="The events' sourcetype; by format when "
                                   "unset: _json (json), ocsf:detection_finding (ocsf), cef (cef).")
    host: str | None = Field(None, min_length=1, description="The events' host; this machine's name when unset.")
    verify_tls: bool = Field(True, description="Verify the collector's TLS certificate (https URLs).")
    timeout_s: float = Field(5.0, gt=0, le=120, description="Connect and read timeout per request.")
    format: SinkFormat = Field("json", description=_FORMAT_DESCRIPTION)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        return _http_url(v)

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith(HEC_EVENT_PATH) else base + HEC_EVENT_PATH

    @property
    def effective_sourcetype(self) -> str:
        from ray_qalloc.integration.formats import SOURCETYPES

        return self.sourcetype or SOURCETYPES[self.format]


def hec_outcome(status: int, body: str, *, retry_after_s: float | None = None, sink: str = "splunk") -> None:
    """Map one HEC answer onto the outbox's contract: return when delivered, raise
    ``DeliveryError`` (``permanent`` for a refusal) otherwise.

    Delivered is a 2xx carrying HEC's ``{"code": 0}``: anything else (a proxy's page, an empty
    200) has not verifiably reached an index, so it is retried. 408/425/429/5xx and the busy,
    unhealthy and internal-error codes are retried, honouring ``Retry-After``; every other
    answer (400, 401, 403, 404, a redirect; the token, format and index codes) is a refusal."""
    try:
        answer = json.loads(body)
        code = answer.get("code") if isinstance(answer, dict) else None
        text = answer.get("text") if isinstance(answer, dict) else None
    except ValueError:
        code, text = None, None
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    if 200 <= status < 300 and code == 0:
        return
    said = f"HEC {sink} answered HTTP {status}" + (f" code {code} ({text or HEC_CODES.get(code, ('?',))[0]})"
                                                   if code is not None else f": {body[:200]!r}")
    if 200 <= status < 300:
        raise DeliveryError(said + " without HEC's success code; not taken as delivered", retry_after_s=retry_after_s)
    retryable = status in (408, 425, 429) or status >= 500 or (code is not None and HEC_CODES.get(code, ("", False))[1])
    if retryable:
        raise DeliveryError(said, retry_after_s=retry_after_s)
    fix = _HEC_FIXES.get(code, "check the sink's url, token and index against the collector's settings")
    raise DeliveryError(f"{said} (refused: not retried). To fix: {fix}", permanent=True)


class SplunkHecSink:
    """POSTs each event to a Splunk HTTP Event Collector, one event per request."""

    def __init__(self, name: str, config: SplunkHecConfig, *, client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._host = config.host or socket.gethostname()
        self._own_client = client is None
        self._client = client or httpx.Client(timeout=config.timeout_s, follow_redirects=False,
                                              verify=config.verify_tls)

    def payload(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The HEC event envelope for ``event`` (``time`` in epoch seconds, ms precision)."""
        c = self.config
        record = dict(event) if c.format == "json" else render(event, c.format, host=self._host)
        return self._envelope(float(event["at"]), c.effective_sourcetype, record, str(event["key"]))

    def record_payload(self, record: "ChangeRecord") -> dict[str, Any]:
        """The HEC event envelope for a forwarded record (sourcetype by kind and format unless set)."""
        from ray_qalloc.integration.formats import RECORD_SOURCETYPES

        c = self.config
        return self._envelope(record.at, c.sourcetype or RECORD_SOURCETYPES[record.kind][c.format],
                              render_change(record, c.format, host=self._host), record.key)

    def _envelope(self, at: float, sourcetype: str, event: Any, key: str) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {"time": round(float(at), 3), "host": self._host, "source": c.source,
                               "sourcetype": sourcetype, "event": event, "fields": {"idempotency_key": key}}
        if c.index:
            out["index"] = c.index
        return out

    def send_record(self, record: "ChangeRecord") -> None:
        self._post(self.record_payload(record), record.key)

    def send(self, event: Mapping[str, Any]) -> None:
        self._post(self.payload(event), str(event["key"]))

    def _post(self, payload: dict[str, Any], key: str) -> None:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        headers = {"Authorization": f"Splunk {self.config.token.get_secret_value()}",
                   "Content-Type": "application/json", "User-Agent": _USER_AGENT, IDEMPOTENCY_HEADER: key}
        try:
            resp = self._client.post(self.config.endpoint, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"HEC {self.name}: {exc.__class__.__name__}: {exc}") from None
        hec_outcome(resp.status_code, resp.text, sink=self.name,
                    retry_after_s=_retry_after(resp.headers.get("Retry-After"), self._clock()))

    def close(self) -> None:
        if self._own_client:
            self._client.close()


# ---- building --------------------------------------------------------------------------------
AnySinkConfig = Union[WebhookConfig, SyslogConfig, SplunkHecConfig]
SinkConfig = Annotated[AnySinkConfig, Field(discriminator="type")]
#: ``type`` → config model, for loading ``alerts.sinks`` (``config.AlertSettings``).
SINK_CONFIGS: dict[str, type[BaseModel]] = {"webhook": WebhookConfig, "syslog": SyslogConfig,
                                            "splunk_hec": SplunkHecConfig}


def build_sink(name: str, config: AnySinkConfig) -> RecordSink:
    """The sink a configuration describes."""
    if isinstance(config, WebhookConfig):
        return WebhookSink(name, config)
    if isinstance(config, SplunkHecConfig):
        return SplunkHecSink(name, config)
    return SyslogSink(name, config)
