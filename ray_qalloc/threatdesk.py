"""Timed allocation actions: raise a tenant's priority class, reserve emergency capacity, pause a
tenant — taken by a threat rule on security events, or by a SOAR playbook over the API.

Why one desk for both: a rule and a playbook ask for the same three things, and an operator
must see, in one place, what changed allocation and why (``qalloc threat``, explain). Each
action carries who took it (``by``: ``rule:<name>`` or the caller), the rule and the event that
triggered it, and when it ends.

State changes go one way: an action is validated, committed to the audited admin state
(``adminstate.py``: who, when, old → new), then applied to the scheduler and the dispatcher; a
restarted allocator applies what is stored. Actions are idempotent by ``id``: the same action
again changes nothing (a SOAR retry, a rule firing twice on one incident), the same id with
different content is refused (409). Expiry is a pass of the operations loop: an action past
its ``until`` is removed the same way (committed, then undone on the scheduler).

What each action does:

* ``boost`` — the tenant's queued and new jobs are served as at least class ``to`` (their place
  in line moves; an ``emergency`` boost lets them use reserved capacity and preempt batch runs);
  explain names the action, its rule and event. The jobs' own priority (and the selector's
  weights) stay theirs.
* ``reserve`` — ``slots`` more of a backend's slots (or a pool's cores) are kept for emergency
  jobs, on top of the configured ``scheduler.reserved``.
* ``pause`` — the tenant's jobs are accepted and stored but none starts (running ones finish)
  until the action ends or is removed (resume).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray_qalloc.exceptions import Conflict, InvalidRequest
from ray_qalloc.priority import CLASSES, RANK

KEY = "threat.actions"
MAX_ACTIONS = 1_000
_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")


class Action(BaseModel):
    """One timed action (see the module docstring for what each kind does)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=128, description="Idempotency: the same id again is the same action.")
    kind: Literal["boost", "reserve", "pause"]
    tenant: str | None = Field(None, min_length=1, max_length=64, description="boost, pause: whose jobs.")
    to: Literal["emergency", "high", "normal"] | None = Field(None, description="boost: the class served at least.")
    target: str | None = Field(None, min_length=1, max_length=128,
                               description="reserve: a backend (slots) or a pool (cores).")
    slots: int | None = Field(None, ge=1, le=1024, description="reserve: how many.")
    until: float | None = Field(None, description="Unix time it ends (None: only pause, until resumed).")
    for_s: float | None = Field(None, gt=0, le=30 * 86_400, description="Instead of until: how long from when it "
                                "is taken (a retry of the same request is then the same action).")
    reason: str = Field("", max_length=500)
    by: str = Field("admin", min_length=1, max_length=128, description="Who took it: rule:<name> or the caller.")
    rule: str | None = Field(None, max_length=128, description="The threat rule that took it, if one did.")
    event_id: str | None = Field(None, max_length=128, description="The security event that triggered it.")
    at: float = Field(0.0, description="When it was taken.")

    @model_validator(mode="after")
    def _shape(self) -> "Action":
        if not _ID.match(self.id):
            raise ValueError("id may hold letters, digits and . _ : @ / - only")
        need = {"boost": ("tenant", "to", "until"), "reserve": ("target", "slots", "until"), "pause": ("tenant",)}
        if self.for_s is not None and self.until is not None and self.at == 0.0:
            raise ValueError("give until or for_s, not both")
        missing = [f for f in need[self.kind] if getattr(self, f) is None and not (f == "until" and self.for_s)]
        if missing:
            raise ValueError(f"a {self.kind} action needs {', '.join(missing)}")
        extra = [f for f in ("tenant", "to", "target", "slots") if f not in need[self.kind] and getattr(self, f) is not None]
        if extra:
            raise ValueError(f"a {self.kind} action takes no {', '.join(extra)}")
        return self

    def same_as(self, other: "Action") -> bool:
        """The same action, whenever it was taken (idempotent retries keep the first ``at``)."""
        skip = {"at", "until"} if self.for_s is not None else {"at"}
        return self.model_dump(exclude=skip) == other.model_dump(exclude=skip)

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


def parse_action(raw: dict[str, Any]) -> Action:
    """An action from outside (API, rule), or InvalidRequest naming the field and why."""
    try:
        return Action.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "action"
        raise InvalidRequest(f"action field {where!r}: {err.get('msg')}", field=where,
                             fix="see POST /v1/threat/actions in /docs for the fields each kind takes.") from None


class ThreatDesk:
    """The active actions of one allocator, and their effect on its scheduler and dispatcher."""

    def __init__(self, admin: Any, dispatcher: Any, scheduler: Any, base_reserved: Any,
                 kick: Any = None) -> None:
        """``admin``: the audited AdminState; ``base_reserved()``: the configured
        ``scheduler.reserved`` (live configuration may change it)."""
        self.admin, self.d, self.sched = admin, dispatcher, scheduler
        self.base_reserved = base_reserved
        self.kick = kick or (lambda: None)
        self.actions: dict[str, Action] = {}
        self._floors: dict[str, str] = {}
        dispatcher.class_reason = self.class_reason

    # ---- commit, then apply ---------------------------------------------------------------
    def load(self, now: float | None = None) -> None:
        """What the admin state holds (a restart), applied."""
        raw = self.admin.get(KEY, []) or []
        self.actions = {}
        for item in raw:
            try:
                a = Action.model_validate(item)
            except ValidationError:
                continue          # written by a newer version, or damaged: not applied
            self.actions[a.id] = a
        self.apply(time.time() if now is None else now)

    def prepare_add(self, action: Action, now: float) -> tuple[Action, bool, dict[str, Action] | None]:
        """Validate ``action`` against what is in force: (the action, created, the new set to
        commit — None when it is already in force). No I/O: the caller commits, then applies."""
        old = self.actions.get(action.id)
        if old is not None:
            if old.same_as(action):
                return old, False, None
            raise Conflict(f"action id {action.id!r} is already used by a different action.", field="id",
                           fix="use a new id for a new action, or remove the old one first.")
        if action.until is not None and action.until <= now:
            raise InvalidRequest(f"action {action.id!r} ends before it starts (until {action.until} ≤ now {now:.0f}).",
                                 field="until", fix="give a time in the future (unix seconds).")
        if len(self.actions) >= MAX_ACTIONS:
            raise Conflict(f"{MAX_ACTIONS} actions are in force already.", field="id",
                           fix="remove actions that are no longer needed (qalloc threat remove ID).")
        action = action.model_copy(update={"at": now, **({"until": now + action.for_s} if action.for_s else {})})
        return action, True, {**self.actions, action.id: action}

    def commit(self, actions: dict[str, Action], actor: str, what: str, detail: str = "") -> None:
        """Write the new set to the audited admin state (blocking: the store thread), then hold it."""
        self.admin.put(KEY, [a.model_dump() for a in actions.values()], actor=actor, action=f"threat.{what}"[:64],
                       detail=detail)
        self.actions = actions

    def without(self, ids: list[str]) -> dict[str, Action]:
        return {k: v for k, v in self.actions.items() if k not in ids}

    def due(self, now: float) -> list[str]:
        """Actions whose time is up."""
        return [a.id for a in self.actions.values() if not a.active(now)]

    # ---- the effect -------------------------------------------------------------------------
    def apply(self, now: float) -> None:
        """Put the active actions in force: class floors, reservations, paused tenants."""
        live = [a for a in self.actions.values() if a.active(now)]
        floors: dict[str, str] = {}
        for a in live:
            if a.kind == "boost" and a.tenant is not None and a.to is not None:
                cur = floors.get(a.tenant)
                if cur is None or RANK[a.to] < RANK[cur]:
                    floors[a.tenant] = a.to
        for tenant in set(self._floors) | set(floors):
            if self._floors.get(tenant) != floors.get(tenant):
                self.sched.set_class_floor(tenant, floors.get(tenant), now)
        self._floors = floors
        self.sched.set_reserved(self.reserved(now))
        self.d.set_paused(frozenset(a.tenant for a in live if a.kind == "pause" and a.tenant is not None))
        self.kick()

    def reserved(self, now: float | None = None) -> dict[str, int]:
        """The configured reservations plus the timed ones in force."""
        out = {k: int(v) for k, v in dict(self.base_reserved()).items()}
        now = time.time() if now is None else now
        for a in self.actions.values():
            if a.kind == "reserve" and a.active(now) and a.target is not None and a.slots:
                out[a.target] = out.get(a.target, 0) + a.slots
        return out

    def class_reason(self, job_id: str) -> dict[str, Any] | None:
        """Why a job is served above its own class (for explain), or None."""
        q = self.d.queued.get(job_id) or self.d.running.get(job_id)
        if q is None:
            return None
        floor = self._floors.get(q.job.tenant)
        own = q.job.priority.value
        if floor is None or RANK[floor] >= RANK.get(own, RANK["normal"]):
            return None
        now = time.time()
        by = [a for a in self.actions.values() if a.kind == "boost" and a.tenant == q.job.tenant
              and a.to == floor and a.active(now)]
        first = min(by, key=lambda a: a.at) if by else None
        out: dict[str, Any] = {"own": own, "served_as": floor}
        if first is not None:
            out["changed_by"] = {"action": first.id, "by": first.by, "rule": first.rule, "event_id": first.event_id,
                                 "reason": first.reason, "until": first.until}
        return out

    def view(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"actions": [a.model_dump() | {"active": a.active(now)} for a in self.actions.values()],
                "class_floors": dict(self._floors), "reserved": self.reserved(now),
                "paused": sorted(self.d.paused)}
