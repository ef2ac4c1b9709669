"""Alert events, job transitions and audit records as ArcSight CEF lines, escaped so that any
text survives the trip.

``CEF:0|ray-qalloc|ray-qalloc|<version>|<rule>|<name>|<severity>|<extension>``

Escaping (CEF implementation standard): in header fields, ``\\`` and ``|`` are escaped with a
backslash; a header cannot span lines, so CR and LF there become spaces (the only lossy
step, and the header carries only names). In extension values ``\\`` and ``=`` are escaped
and CR/LF are written as ``\\r``/``\\n``; ``|`` needs no escape there. Keys are fixed
ASCII names. Every other character (any Unicode) is written as is: the receiver reads
UTF-8.

Why these extension keys: they are the ones ArcSight, QRadar, Sentinel's CommonSecurityLog
and Elastic's CEF module map to named columns, so the alert lands in searchable fields
without a custom parser:

=====================  =========================================================
rt                     event time, epoch milliseconds
start / end            when the condition began / when it cleared (resolve)
msg                    the alert's summary
act                    what happened to the alert: firing, resolved, suppressed
cat                    the rule's kind (queue_wait, backend_down, ...)
externalId             the idempotency key (a SIEM drops duplicates by it)
dvchost                the host that sent the alert, when known
deviceExternalId       the reporting instance's id, when configured
cs1 / cs1Label         fingerprint (the alert's identity: firing and resolve share it)
cs2 / cs2Label         severity (our name; the header carries the 0–10 number)
cs3 / cs3Label         backend the alert is about
cs4 / cs4Label         tenant
cs5 / cs5Label         node
cs6 / cs6Label         all labels, as JSON
cfp1 / cfp1Label       value measured
cfp2 / cfp2Label       threshold
=====================  =========================================================

Severity (header, 0–10): critical 10, error 8, warning 6, notice 4, info 2 for a firing
alert; a resolve is 1 and a rate-limit summary 3 — as on syslog, the header says how much
attention *this event* needs, and cs2 keeps the alert's own severity.

**Job transitions** (``job_cef``, a ``records.JobTransition``): event class ``job.<event>``
(the transition's name: ``job.accept``, ``job.dispatch``, ``job.complete``, ...; the target
state when no name is given), name ``job <id>: <from> -> <to>``, severity 1, or 5 for a
transition to failed. Extension: rt, msg (the reason), act (the event), cat ``job``,
externalId (the dedupe key), dvchost, outcome (success / failure), cs1 job id, cs2 from
state, cs3 backend, cs4 tenant (as for alerts), cs5 to state, cs6 priority.

**Audit records** (``audit_cef``, a ``records.AuditRecord``): event class
``config.<action>`` (``config.set``, ``config.cordon``: an action already in the ``config``
area is not prefixed twice), name ``<actor> <action> <key>``, severity 3, or 5 when it
failed. Extension: rt, msg (the reason), act (the action), cat ``config``, externalId,
dvchost, suser (the actor), outcome, src (caller's address), requestClientApplication
(User-Agent), cs1 the key, cs2 / cs3 the old / new value as JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from ray_qalloc.integration.ocsf_out import alert_title, product_version
from ray_qalloc.integration.records import AuditRecord, JobTransition, parse_record

VENDOR = "ray-qalloc"
PRODUCT = "ray-qalloc"
CEF_SEVERITY = {"critical": 10, "error": 8, "warning": 6, "notice": 4, "info": 2}
RESOLVED_SEVERITY = 1
SUMMARY_SEVERITY = 3
JOB_SEVERITY, JOB_FAILED_SEVERITY = 1, 5
AUDIT_SEVERITY, AUDIT_FAILED_SEVERITY = 3, 5


def escape_header(value: Any) -> str:
    """A CEF header field: ``\\`` and ``|`` escaped, CR/LF flattened to spaces."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def escape_extension(value: Any) -> str:
    """A CEF extension value: ``\\`` and ``=`` escaped, CR/LF as ``\\r``/``\\n``."""
    return (str(value).replace("\\", "\\\\").replace("=", "\\=")
            .replace("\r", "\\r").replace("\n", "\\n"))


def cef_line(*, version: str, event_class: str, name: str, severity: int,
             extension: Iterable[tuple[str, Any]], vendor: str = VENDOR, product: str = PRODUCT) -> str:
    """One CEF record; extension pairs whose value is None are left out."""
    if not 0 <= severity <= 10:
        raise ValueError(f"CEF severity must be 0..10, not {severity}. To fix: map the severity onto 0..10.")
    head = "|".join(escape_header(x) for x in (vendor, product, version, event_class, name))
    ext = " ".join(f"{k}={escape_extension(v)}" for k, v in extension if v is not None)
    return f"CEF:0|{head}|{severity}|{ext}"


def _ms(ts: float | None) -> int | None:
    return None if ts is None else int(round(float(ts) * 1000))


def _num(x: Any) -> str | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else repr(float(x))


def alert_severity(event: Mapping[str, Any]) -> int:
    status = event["status"]
    if status == "firing":
        return CEF_SEVERITY.get(str(event["severity"]), 5)
    return RESOLVED_SEVERITY if status == "resolved" else SUMMARY_SEVERITY


def alert_cef(event: Mapping[str, Any], *, host: str | None = None, device_id: str | None = None,
              version: str | None = None) -> str:
    """One alert event (``AlertEvent.to_dict()``) as a CEF line."""
    labels = dict(event.get("labels") or {})
    status = event["status"]
    ext: list[tuple[str, Any]] = [
        ("rt", _ms(event["at"])), ("start", _ms(event.get("active_since"))),
        ("end", _ms(event["at"]) if status == "resolved" else None),
        ("msg", event.get("summary") or None), ("act", status), ("cat", event.get("kind")),
        ("externalId", event["key"]), ("dvchost", host), ("deviceExternalId", device_id),
        ("cs1Label", "fingerprint"), ("cs1", event["fingerprint"]),
        ("cs2Label", "severity"), ("cs2", event["severity"]),
    ]
    for n, label in ((3, "backend"), (4, "tenant"), (5, "node")):
        if label in labels:
            ext += [(f"cs{n}Label", label), (f"cs{n}", labels[label])]
    if labels:
        ext += [("cs6Label", "labels"),
                ("cs6", json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False))]
    for n, label in ((1, "value"), (2, "threshold")):
        value = _num(event.get(label))
        if value is not None:
            ext += [(f"cfp{n}Label", label), (f"cfp{n}", value)]
    name = alert_title(event) + {"firing": "", "resolved": " resolved"}.get(status, "")
    return cef_line(version=version or product_version(), event_class=str(event["rule"]), name=name,
                    severity=alert_severity(event), extension=ext)


def _json_value(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                                 default=str)


def job_event(t: JobTransition) -> str:
    """The transition's name (accept, dispatch, ...), or its target state when it has none."""
    event = (t.model_extra or {}).get("event")
    return str(event) if event else ("accept" if t.from_state is None else t.to_state)


def job_cef(record: Mapping[str, Any] | JobTransition, *, host: str | None = None,
            version: str | None = None) -> str:
    """One job transition (``records.JobTransition``) as a CEF line."""
    t = parse_record(JobTransition, record, "job transition")
    failed = t.to_state == "failed"
    event = job_event(t)
    ext: list[tuple[str, Any]] = [
        ("rt", _ms(t.time)), ("msg", t.reason), ("act", event), ("cat", "job"),
        ("externalId", t.uid or t.content_uid()), ("dvchost", host), ("outcome", "failure" if failed else "success"),
        ("cs1Label", "job_id"), ("cs1", t.job_id), ("cs2Label", "from_state"), ("cs2", t.from_state),
    ]
    if t.backend:
        ext += [("cs3Label", "backend"), ("cs3", t.backend)]
    ext += [("cs4Label", "tenant"), ("cs4", t.tenant), ("cs5Label", "to_state"), ("cs5", t.to_state)]
    priority = (t.model_extra or {}).get("priority")
    if priority:
        ext += [("cs6Label", "priority"), ("cs6", priority)]
    return cef_line(version=version or product_version(), event_class=f"job.{event}",
                    name=f"job {t.job_id}: {t.from_state or 'new'} -> {t.to_state}",
                    severity=JOB_FAILED_SEVERITY if failed else JOB_SEVERITY, extension=ext)


def audit_cef(record: Mapping[str, Any] | AuditRecord, *, host: str | None = None,
              version: str | None = None) -> str:
    """One audit record (``records.AuditRecord``) as a CEF line."""
    a = parse_record(AuditRecord, record, "audit record")
    failed = a.outcome == "failure"
    event_class = a.action if a.action.startswith("config.") else f"config.{a.action}"
    ext: list[tuple[str, Any]] = [
        ("rt", _ms(a.time)), ("msg", a.reason), ("act", a.action), ("cat", "config"),
        ("externalId", a.uid or a.content_uid()), ("dvchost", host), ("suser", a.actor), ("outcome", a.outcome),
        ("src", a.src_ip), ("requestClientApplication", a.user_agent),
        ("cs1Label", "key"), ("cs1", a.key),
    ]
    for n, label, value in ((2, "old", a.old), (3, "new", a.new)):
        text = _json_value(value)
        if text is not None:
            ext += [(f"cs{n}Label", label), (f"cs{n}", text)]
    return cef_line(version=version or product_version(), event_class=event_class,
                    name=f"{a.actor} {a.action} {a.key}",
                    severity=AUDIT_FAILED_SEVERITY if failed else AUDIT_SEVERITY, extension=ext)
