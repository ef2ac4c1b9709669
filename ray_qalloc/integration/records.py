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
from the content, so the same transition rendered twice has the same key.

An **audit record** (one API call or configuration change)::

    {"actor": "alice", "action": "config.set", "key": "alerts.interval_s", "old": 5, "new": 10,
     "time": 1767225600.5, "outcome": "success"}

``action`` is ``<area>.<verb>``: the verb (create, read/get/list, update/set/put/patch/unset,
delete) picks the OCSF activity; ``outcome`` is success or failure (a refused change is a
failure, with ``reason``). ``src_ip`` and ``user_agent`` are optional (known for HTTP calls).
"""

from __future__ import annotations

import hashlib
import json
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
