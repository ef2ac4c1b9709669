"""Which format an alert leaves in: native JSON (default), OCSF, or CEF — one entry point for the sinks.

Why one entry point: every sink (webhook, syslog, Splunk HEC) offers the same ``format``
option, and each needs the same three things of it — the record, its text, and how to label
that text (HTTP content type, Splunk sourcetype). Keeping them together means a new format
is added once, not once per sink.

- ``json``: ``AlertEvent.to_dict()`` unchanged (what every sink sent before formats existed);
- ``ocsf``: an OCSF 1.3 Detection Finding (``ocsf_out.detection_finding``), as JSON;
- ``cef``: one CEF line (``cef_out.alert_cef``), as text.

The other record kinds — job transitions and audit changes, forwarded from the change feed
(``integration.forwarder``) as ``records.ChangeRecord`` — go through ``render_record``:
``json`` is the change itself (``ChangeRecord.to_dict()``), ``ocsf`` a Scheduled Job Activity
(``ocsf_out.scheduled_job_activity``) or API Activity (``ocsf_out.api_activity``), ``cef``
``cef_out.job_cef`` / ``cef_out.audit_cef``.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray_qalloc.integration.cef_out import alert_cef, audit_cef, job_cef
from ray_qalloc.integration.ocsf_out import api_activity, detection_finding, scheduled_job_activity
from ray_qalloc.integration.records import ChangeRecord

FORMATS: tuple[str, ...] = ("json", "ocsf", "cef")

#: Splunk sourcetype of each format when the sink does not set one: ``_json`` is Splunk's
#: built-in JSON type; ``cef`` is what Splunk's CEF add-ons extract; the OCSF one follows the
#: ``ocsf:<class>`` naming of Splunk's OCSF tooling.
SOURCETYPES: dict[str, str] = {"json": "_json", "ocsf": "ocsf:detection_finding", "cef": "cef"}
#: The same per forwarded record kind (``ChangeRecord.kind``).
RECORD_SOURCETYPES: dict[str, dict[str, str]] = {
    "job": {"json": "_json", "ocsf": "ocsf:scheduled_job_activity", "cef": "cef"},
    "config": {"json": "_json", "ocsf": "ocsf:api_activity", "cef": "cef"},
}


def render_alert(event: Mapping[str, Any], fmt: str = "json", *, host: str | None = None,
                 device_id: str | None = None) -> dict[str, Any] | str:
    """The alert as a record of format ``fmt``: a dict (json, ocsf) or a line (cef)."""
    if fmt == "json":
        return dict(event)
    if fmt == "ocsf":
        return detection_finding(event)
    if fmt == "cef":
        return alert_cef(event, host=host, device_id=device_id)
    raise ValueError(f"unknown alert format {fmt!r}. To fix: use one of {', '.join(FORMATS)}.")


def render_record(record: ChangeRecord, fmt: str = "json", *, host: str | None = None) -> dict[str, Any] | str:
    """A forwarded job transition or audit change as a record of format ``fmt``. Raises
    ValueError (naming the field) when the change lacks what the format needs."""
    if fmt == "json":
        return record.to_dict()
    if record.kind not in RECORD_SOURCETYPES:
        raise ValueError(f"record kind {record.kind!r} is not forwarded. To fix: forward job or config changes.")
    if fmt == "ocsf":
        return scheduled_job_activity(record.transition(), host=host) if record.kind == "job" \
            else api_activity(record.audit())
    if fmt == "cef":
        return job_cef(record.transition(), host=host) if record.kind == "job" else audit_cef(record.audit(), host=host)
    raise ValueError(f"unknown record format {fmt!r}. To fix: use one of {', '.join(FORMATS)}.")


def record_text(record: dict[str, Any] | str) -> str:
    """A rendered record as text: compact JSON (sorted keys, UTF-8, one line) or the CEF line."""
    from ray_qalloc.alerts.sinks import canonical_body

    return record if isinstance(record, str) else canonical_body(record).decode()


__all__ = ["FORMATS", "RECORD_SOURCETYPES", "SOURCETYPES", "api_activity",
           "detection_finding", "record_text", "render_alert", "render_record", "scheduled_job_activity"]
