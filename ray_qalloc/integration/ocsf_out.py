"""ray-qalloc's records as OCSF 1.3 events: Detection Finding, Scheduled Job Activity, API Activity.

Why OCSF: Splunk, Sentinel, Security Lake, QRadar and Elastic all map OCSF classes onto
their own models, so one rendering reaches every SIEM without a per-vendor mapping. Each
function here is pure: a plain dict in (``AlertEvent.to_dict()``, or a ``records`` dict),
a JSON-ready dict out, nothing read from the machine (the reporting ``host`` is passed in).

Common to every class (OCSF base event):
``class_uid``/``class_name``, ``category_uid``/``category_name``, ``activity_id``/
``activity_name``, ``type_uid`` = class_uid·100 + activity_id (and ``type_name``), ``time``
(epoch **milliseconds**, an integer), ``severity_id``/``severity``, ``metadata`` {version
"1.3.0", product {name, vendor_name, version}, uid = the record's idempotency key, so a SIEM
can drop duplicates of at-least-once delivery}, and ``unmapped`` for what has no OCSF home.

**Detection Finding (2004)**, one per alert event:
- ``activity_id`` 1 Create for a firing alert, 3 Close for its resolve, 99 Other
  ("Rate-limit summary") for a rate-limit summary; ``is_alert`` true only on Create.
- ``finding_info.uid`` is the alert's fingerprint, the same on Create and Close, so the
  SIEM pairs them; ``title`` names the rule and its subject ("mem on node n1");
  ``desc`` is the summary; ``created_time`` when it fired; ``first_seen_time`` when its
  condition began; ``last_seen_time`` the event's time; ``analytic`` the rule.
- ``status_id`` 1 New (firing, summary) or 4 Resolved (resolve).
- ``resources`` and ``observables``: each subject label (backend, node, tenant, priority,
  breaker, resource) is one resource {uid, name, type} and one observable of type
  10 "Resource UID" pointing at it (``resources[i].uid``); the tenant also goes to
  ``metadata.tenant_uid``.
- ``unmapped``: status, severity name, kind, value, threshold, labels, details.

Severity (``Severity`` → OCSF ``severity_id``): critical → 5 Critical, error → 4 High,
warning → 3 Medium, notice → 2 Low, info → 1 Informational. Both scales are ordered
and ours has five steps below OCSF's 6 Fatal; Fatal is not used because OCSF reserves it
for an error the system cannot recover from, and every condition we alert on (a backend
down, a queue backing up) is one ray-qalloc keeps running through. A resolve keeps the
finding's severity (closing a finding does not make it less severe; ``is_alert`` false says
it needs no attention).

**Scheduled Job Activity (1006)**, one per job transition (``records.JobTransition``):
activity 1 Create (accepted), 6 Start (to running), 3 Delete (cancelled), 2 Update
(anything else: requeued, completed, failed); ``job`` {name = uid = job id, run_state_id
2 Queued / 3 Running / 4 Stopped, user = tenant, file}; ``status_id`` 2 Failure only
for a transition to failed. OCSF requires ``job.file`` and the System category's
``actor`` and ``device``: a job's file is its circuit (``<job id>.qasm``, type 99 Other:
it is submitted as text, not a file); the actor is ray-qalloc itself (the scheduler
moved the job); the device is the host that recorded it, with the backend (and the
transition's ``event`` name and the job's ``priority``, when given) in ``unmapped``.

**API Activity (6003)**, one per audit record (``records.AuditRecord``): activity from the
action's verb (1 Create, 2 Read, 3 Update, 4 Delete, else 99 Other); ``actor.user``;
``api.operation`` = the action; ``resources`` = [{uid = name = key, type "config", data
{old, new}}]; ``src_endpoint`` (required) from ``src_ip`` or ``{"name": "unknown"}``;
``status_id`` 1 Success / 2 Failure with ``status_detail`` = reason.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ray_qalloc.integration.records import AuditRecord, JobTransition, parse_record

OCSF_VERSION = "1.3.0"
PRODUCT_NAME = "ray-qalloc"
VENDOR_NAME = "ray-qalloc"

DETECTION_FINDING = 2004
SCHEDULED_JOB_ACTIVITY = 1006
API_ACTIVITY = 6003

SEVERITY_NAMES = {0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical",
                  6: "Fatal", 99: "Other"}
#: ``alerts.rules.Severity`` value → OCSF severity_id (why: see the module docstring).
SEVERITY_IDS = {"critical": 5, "error": 4, "warning": 3, "notice": 2, "info": 1}

#: Labels the engine sets on an alert that name what it is about; each becomes a resource.
SUBJECT_LABELS = ("backend", "node", "tenant", "priority", "breaker", "resource")
RESOURCE_UID_TYPE = 10   # observable type_id "Resource UID"

_CLASSES = {DETECTION_FINDING: ("Detection Finding", 2, "Findings"),
            SCHEDULED_JOB_ACTIVITY: ("Scheduled Job Activity", 1, "System Activity"),
            API_ACTIVITY: ("API Activity", 6, "Application Activity")}


def ms(ts: float | None) -> int | None:
    """Epoch seconds → OCSF timestamp_t (integer epoch milliseconds)."""
    return None if ts is None else int(round(float(ts) * 1000))


def product(version: str) -> dict[str, str]:
    return {"name": PRODUCT_NAME, "vendor_name": VENDOR_NAME, "version": version}


def product_version() -> str:
    from ray_qalloc import __version__

    return __version__


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    """Drop None values: OCSF attributes are omitted, not null, when unknown."""
    return {k: v for k, v in d.items() if v is not None}


def base_event(class_uid: int, activity_id: int, activity_name: str, *, time_s: float, severity_id: int,
               uid: str, version: str | None = None, tenant: str | None = None) -> dict[str, Any]:
    """The attributes every OCSF class shares (base event + classification + metadata)."""
    class_name, category_uid, category_name = _CLASSES[class_uid]
    return _compact({
        "class_uid": class_uid, "class_name": class_name, "category_uid": category_uid,
        "category_name": category_name, "activity_id": activity_id, "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id, "type_name": f"{class_name}: {activity_name}",
        "time": ms(time_s), "timezone_offset": 0, "severity_id": severity_id,
        "severity": SEVERITY_NAMES[severity_id],
        "metadata": _compact({"version": OCSF_VERSION, "product": product(version or product_version()),
                              "uid": uid, "tenant_uid": tenant}),
    })


# ---- alerts: Detection Finding ------------------------------------------------------------
def alert_title(event: Mapping[str, Any]) -> str:
    """A short, stable name of the alert: its rule and subject ("mem on node n1")."""
    labels = event.get("labels") or {}
    subject = ", ".join(f"{k} {labels[k]}" for k in SUBJECT_LABELS if k in labels)
    if event.get("status") == "suppressed":
        return f"{event['rule']} notifications held back"
    return f"{event['rule']} on {subject}" if subject else str(event["rule"])


def _resources(labels: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    resources, observables = [], []
    for k in SUBJECT_LABELS:
        if k in labels:
            value = str(labels[k])
            observables.append({"name": f"resources[{len(resources)}].uid", "type_id": RESOURCE_UID_TYPE,
                                "type": "Resource UID", "value": value})
            resources.append({"uid": value, "name": value, "type": k})
    return resources, observables


def detection_finding(event: Mapping[str, Any], *, version: str | None = None) -> dict[str, Any]:
    """One alert event (``AlertEvent.to_dict()``) as an OCSF Detection Finding (class 2004)."""
    status = event["status"]
    severity = str(event["severity"])
    labels = dict(event.get("labels") or {})
    activity = {"firing": (1, "Create"), "resolved": (3, "Close")}.get(status, (99, "Rate-limit summary"))
    out = base_event(DETECTION_FINDING, *activity, time_s=event["at"], severity_id=SEVERITY_IDS.get(severity, 0),
                     uid=str(event["key"]), version=version, tenant=labels.get("tenant"))
    resources, observables = _resources(labels)
    out.update(_compact({
        "message": event.get("summary") or None,
        "is_alert": status == "firing",
        "status_id": 4 if status == "resolved" else 1,
        "status": "Resolved" if status == "resolved" else "New",
        "start_time": ms(event.get("active_since")),
        "end_time": ms(event["at"]) if status == "resolved" else None,
        "finding_info": _compact({
            "uid": str(event["fingerprint"]), "title": alert_title(event), "desc": event.get("summary") or None,
            "created_time": ms(event.get("fired_at") if event.get("fired_at") is not None else event["at"]),
            "first_seen_time": ms(event.get("active_since")), "last_seen_time": ms(event["at"]),
            "modified_time": ms(event["at"]) if status != "firing" else None,
            "types": [str(event["kind"])],
            "analytic": {"name": str(event["rule"]), "uid": str(event["rule"]), "type_id": 1, "type": "Rule",
                         "category": str(event["kind"])},
        }),
        "resources": resources or None,
        "observables": observables or None,
        "unmapped": _compact({"status": status, "severity": severity, "kind": event["kind"],
                              "value": _finite(event.get("value")), "threshold": _finite(event.get("threshold")),
                              "labels": labels or None, "details": dict(event.get("details") or {}) or None}),
    }))
    return out


# ---- job transitions: Scheduled Job Activity ----------------------------------------------------
_RUN_STATE = {"queued": (2, "Queued"), "running": (3, "Running"), "completed": (4, "Stopped"),
              "failed": (4, "Stopped"), "cancelled": (4, "Stopped")}


def _job_activity(t: JobTransition) -> tuple[int, str]:
    if t.from_state is None:
        return 1, "Create"
    if t.to_state == "running":
        return 6, "Start"
    if t.to_state == "cancelled":
        return 3, "Delete"
    return 2, "Update"


def scheduled_job_activity(record: Mapping[str, Any] | JobTransition, *, host: str | None = None,
                           version: str | None = None) -> dict[str, Any]:
    """One job transition (``records.JobTransition``) as OCSF Scheduled Job Activity (1006)."""
    t = parse_record(JobTransition, record, "job transition")
    extra = t.model_extra or {}
    failed = t.to_state == "failed"
    out = base_event(SCHEDULED_JOB_ACTIVITY, *_job_activity(t), time_s=t.time, severity_id=2 if failed else 1,
                     uid=t.uid or t.content_uid(), version=version, tenant=t.tenant)
    run_state_id, run_state = _RUN_STATE.get(t.to_state, (99, "Other"))
    out.update(_compact({
        "message": f"job {t.job_id}: {t.from_state or 'new'} -> {t.to_state}" + (f" ({t.reason})" if t.reason else ""),
        "status_id": 2 if failed else 1, "status": "Failure" if failed else "Success",
        "status_detail": t.reason,
        "job": _compact({"name": t.job_id, "uid": t.job_id, "run_state_id": run_state_id, "run_state": run_state,
                         "user": {"name": t.tenant, "uid": t.tenant},
                         "file": {"name": f"{t.job_id}.qasm", "type_id": 99, "type": "Other"}}),
        "actor": {"app_name": PRODUCT_NAME},
        "device": _compact({"type_id": 1, "type": "Server", "hostname": host}),
        "unmapped": _compact({"from_state": t.from_state, "to_state": t.to_state, "backend": t.backend,
                              "tenant": t.tenant, "event": extra.get("event"), "priority": extra.get("priority")}),
    }))
    return out


# ---- audit records: API Activity -----------------------------------------------------------------
_API_VERBS = {"create": (1, "Create"), "add": (1, "Create"), "read": (2, "Read"), "get": (2, "Read"),
              "list": (2, "Read"), "update": (3, "Update"), "set": (3, "Update"), "put": (3, "Update"),
              "patch": (3, "Update"), "unset": (3, "Update"), "delete": (4, "Delete"), "remove": (4, "Delete")}


def api_activity(record: Mapping[str, Any] | AuditRecord, *, version: str | None = None) -> dict[str, Any]:
    """One audit record (``records.AuditRecord``) as OCSF API Activity (6003)."""
    a = parse_record(AuditRecord, record, "audit record")
    verb = a.action.rsplit(".", 1)[-1].lower()
    activity_id, activity_name = _API_VERBS.get(verb, (99, a.action))
    failed = a.outcome == "failure"
    out = base_event(API_ACTIVITY, activity_id, activity_name, time_s=a.time, severity_id=2 if failed else 1,
                     uid=a.uid or a.content_uid(), version=version)
    out.update(_compact({
        "message": f"{a.actor} {a.action} {a.key}: {a.outcome}" + (f" ({a.reason})" if a.reason else ""),
        "status_id": 2 if failed else 1, "status": "Failure" if failed else "Success",
        "status_detail": a.reason,
        "actor": {"user": {"name": a.actor, "uid": a.actor}},
        "api": {"operation": a.action, "service": {"name": PRODUCT_NAME}},
        "src_endpoint": {"ip": a.src_ip} if a.src_ip else {"name": "unknown"},
        "http_request": {"user_agent": a.user_agent} if a.user_agent else None,
        "resources": [{"uid": a.key, "name": a.key, "type": "config", "data": {"old": a.old, "new": a.new}}],
        "unmapped": {"outcome": a.outcome},
    }))
    return out
