"""The plain records that leave ray-qalloc besides alerts: job transitions and audit records.

Why they are defined here, as pydantic models over plain dicts: the SIEM formatters
(``ocsf_out``, ``cef_out``) are pure functions of a dict, so the job store and the audit
trail can hand them whatever they already have (a row, a ``to_dict()``), and the outbox can
store it as JSON. The model only checks that the dict carries what a SIEM record needs, and
names the field when it does not, before anything is rendered half-way.

A **job transition** (one state change of one job)::

    {"job_id": "j-42", "tenant": "acme", "from_state": "queued", "to_state": "running",
     "backend": "aer-cpu-n1", "time": 1767225600.5, "reason": "placed: fastest expected"}

``from_state`` is null for the job's first record (accepted). States are ``JobState``
values (queued, running, completed, failed, cancelled); an unknown one is kept and rendered
as "Other". ``uid`` (optional) is the record's idempotency key; when absent, one is derived
from the content, so the same transition rendered twice has the same key. ``event`` (the
transition's name: accept, dispatch, complete, ...) and ``priority`` are optional extras,
rendered when present.

An **audit record** (one API call or configuration change)::

    {"actor": "alice", "action": "config.set", "key": "alerts.interval_s", "old": 5, "new": 10,
     "time": 1767225600.5, "outcome": "success"}

``action`` is ``<area>.<verb>``: the verb (create, read/get/list, update/set/put/patch/unset,
delete) picks the OCSF activity; ``outcome`` is success or failure (a refused change is a
failure, with ``reason``). ``src_ip`` and ``user_agent`` are optional (known for HTTP calls).

A **change record** (``ChangeRecord``) is one job transition or audit change of the change
feed (``ray_qalloc.changefeed``) as the forwarder sends it: its kind, its dedupe key (the
change's position in its source, ``j:<id>`` or ``c:<id>``), its time and the feed's data.
``transition()`` / ``audit()`` map that data onto the two models above.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_M = TypeVar("_M", bound=BaseModel)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False)

    def content_uid(self) -> str:
        """A deterministic id from the record's content (sorted JSON, SHA-256, 32 hex digits)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class JobTransition(_Record):
    """One state change of one job."""

    job_id: str = Field(..., min_length=1, description="The job's id.")
    tenant: str = Field(..., min_length=1, description="The tenant that submitted the job.")
    from_state: str | None = Field(None, description="State before; null when the job was just accepted.")
    to_state: str = Field(..., min_length=1, description="State after (a JobState value).")
    backend: str | None = Field(None, description="The backend the job is placed on, when it has one.")
    time: float = Field(..., ge=0, description="When the transition was committed, epoch seconds.")
    reason: str | None = Field(None, description="Why (placement decision, error, cancel request).")
    uid: str | None = Field(None, min_length=1, description="Idempotency key; derived from the content when unset.")


class AuditRecord(_Record):
    """One API call or configuration change."""

    actor: str = Field(..., min_length=1, description="Who: user or service account.")
    action: str = Field(..., min_length=1, description="What: '<area>.<verb>', e.g. 'config.set'.")
    key: str = Field(..., min_length=1, description="On what: configuration key or API resource.")
    old: Any = Field(None, description="Value before (JSON).")
    new: Any = Field(None, description="Value after (JSON).")
    time: float = Field(..., ge=0, description="When, epoch seconds.")
    outcome: Literal["success", "failure"] = Field(..., description="Whether it took effect.")
    reason: str | None = Field(None, description="Why it failed, or a comment.")
    src_ip: str | None = Field(None, description="Caller's address, for HTTP calls.")
    user_agent: str | None = Field(None, description="Caller's User-Agent, for HTTP calls.")
    uid: str | None = Field(None, min_length=1, description="Idempotency key; derived from the content when unset.")


def parse_record(model: type[_M], data: Mapping[str, Any] | _M, what: str) -> _M:
    """``data`` as ``model``; a ValueError naming the first bad field otherwise."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "record"
        raise ValueError(f"{what}: field {where!r}: {err['msg']}. To fix: pass a dict with the fields "
                         f"{', '.join(model.model_fields)} (see ray_qalloc.integration.records).") from None


#: The change feed's kinds that leave as records, and the source letter of their position.
CHANGE_SOURCES: dict[str, str] = {"job": "j", "config": "c"}


@dataclass(frozen=True)
class ChangeRecord:
    """One job transition or audit change of the change feed, as it leaves for a SIEM.

    ``key`` is the change's position in its own source (``j:<transition id>``,
    ``c:<audit id>``): unique, and the same however often and by whichever process the change
    is read again, so a receiver drops the duplicates of at-least-once delivery by it. (The
    feed's full cursor is not used: its other sources' positions depend on where a read
    started.)"""

    kind: Literal["job", "config"]
    key: str
    at: float
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``json`` form: the change as the feed gives it, with the dedupe key for its id."""
        return {"key": self.key, "kind": self.kind, "at": self.at, "data": dict(self.data)}

    def transition(self) -> JobTransition:
        """A ``job`` change (``{job_id, event, from, to, why, tenant, priority}``) as a JobTransition."""
        d = self.data
        return parse_record(JobTransition, {
            "job_id": d.get("job_id"), "tenant": d.get("tenant"), "from_state": d.get("from"),
            "to_state": d.get("to"), "time": self.at, "reason": d.get("why") or None, "uid": self.key,
            "event": d.get("event"), "priority": d.get("priority")}, "job transition")

    def audit(self) -> AuditRecord:
        """A ``config`` change (``{actor, action, key, old, new, detail}``) as an AuditRecord: the
        admin audit trail records changes that were committed, so the outcome is success."""
        d = self.data
        return parse_record(AuditRecord, {
            "actor": d.get("actor"), "action": d.get("action"), "key": d.get("key"), "old": d.get("old"),
            "new": d.get("new"), "time": self.at, "outcome": "success", "reason": d.get("detail") or None,
            "uid": self.key}, "audit record")

    def summary(self) -> str:
        """One line for humans (the syslog MSG of the json format)."""
        d = self.data
        if self.kind == "job":
            why = f" ({d.get('why')})" if d.get("why") else ""
            return f"job {d.get('job_id')} of {d.get('tenant')}: {d.get('from') or 'new'} -> {d.get('to')}{why}"
        detail = f" ({d.get('detail')})" if d.get("detail") else ""
        return f"{d.get('actor')} {d.get('action')} {d.get('key')}{detail}"
