"""Alert events as ArcSight CEF lines, escaped so that any text survives the trip.

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
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from ray_qalloc.integration.ocsf_out import alert_title, product_version

VENDOR = "ray-qalloc"
PRODUCT = "ray-qalloc"
CEF_SEVERITY = {"critical": 10, "error": 8, "warning": 6, "notice": 4, "info": 2}
RESOLVED_SEVERITY = 1
SUMMARY_SEVERITY = 3


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
