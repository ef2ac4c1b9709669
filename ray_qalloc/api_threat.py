"""SOAR actions over HTTP: raise a tenant's priority, reserve capacity, pause or resume a tenant.

Why a route family of its own: a SOAR playbook runs with a token scoped to these actions
(``qalloc token create soar --scope soar``), not an admin token that could also change the
configuration or drain the pool. Every call is idempotent — the action's ``id`` (or the
``Idempotency-Key`` header when the body has none) names it, so a playbook that retries after
a timeout changes nothing the second time; the same id with different content is a 409.
The allocator commits each action to the audited admin state before it takes effect
(``threatdesk.py``); the actor recorded is the token's tenant.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, Literal

from fastapi import Depends, FastAPI, Header, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ray_qalloc.exceptions import Forbidden, InvalidRequest
from ray_qalloc.wire import JsonFloat, JsonInt

_KEY = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
TenantName = Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The tenant the action is about.")


class ActionIn(BaseModel):
    """A timed action (see ``threatdesk.py``). ``for_s`` or ``until`` says when it ends."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/-]{1,128}$",
                           description="Names the action (idempotency); default: the Idempotency-Key header.")
    kind: Literal["boost", "reserve", "pause"]
    tenant: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="boost, pause: whose jobs.")
    to: Literal["emergency", "high", "normal"] | None = Field(None, description="boost: the class served at least.")
    target: str | None = Field(None, min_length=1, max_length=128, description="reserve: a backend or a pool.")
    slots: JsonInt | None = Field(None, ge=1, le=1024, description="reserve: slots (backend) or cores (pool).")
    for_s: JsonFloat | None = Field(None, gt=0, le=30 * 86_400, description="How long from now.")
    until: JsonFloat | None = Field(None, gt=0, description="Unix time it ends (instead of for_s).")
    reason: str = Field("", max_length=500)
    event_id: str | None = Field(None, max_length=128, description="The security event behind it (for explain).")


class RaiseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    to: Literal["emergency", "high", "normal"] = "high"
    for_s: JsonFloat = Field(3_600.0, gt=0, le=30 * 86_400)
    reason: str = Field("", max_length=500)
    event_id: str | None = Field(None, max_length=128)


class PauseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    for_s: JsonFloat | None = Field(None, gt=0, le=30 * 86_400, description="None: until resumed.")
    reason: str = Field("", max_length=500)
    event_id: str | None = Field(None, max_length=128)


def add_threat_routes(app: FastAPI, call: Callable[..., Awaitable[Any]], caller: Callable[..., Any],
                      responses: dict[int | str, Any]) -> None:
    """``call(method, *args)`` reaches the allocator; ``caller`` is the auth dependency."""

    async def soar(p: Any = Depends(caller)) -> Any:
        if not p.may("soar"):
            raise Forbidden("threat actions need a token with the soar scope, or an admin token.",
                            fix="create one with `qalloc token create TENANT --scope soar`.")
        return p

    kw: dict[str, Any] = {"tags": ["threat"], "responses": responses}

    async def take(raw: dict[str, Any], p: Any) -> JSONResponse:
        out = await call("threat_add", raw, f"{'admin' if p.admin else 'soar'}:{p.tenant}")
        return JSONResponse(out, status_code=201 if out["created"] else 200)

    def key_of(body_id: str | None, header: str | None) -> str:
        key = body_id or header
        if key is None:
            raise InvalidRequest("the action has no id.", field="id",
                                 fix="give an id in the body or an Idempotency-Key header (a retry sends it again).")
        if not _KEY.match(key):
            raise InvalidRequest("the Idempotency-Key may hold letters, digits and . _ : @ / - only (1-128).",
                                 field="Idempotency-Key", fix="use a UUID or an incident id.")
        return key

    @app.get("/v1/threat/actions", **kw)
    async def actions(_: Any = Depends(soar)) -> dict[str, Any]:
        """The actions in force: class floors per tenant, reservations, paused tenants, and why."""
        return await call("threat_actions")

    @app.post("/v1/threat/actions", status_code=201, **kw)
    async def add(body: ActionIn, p: Any = Depends(soar),
                  idempotency_key: str | None = Header(None, max_length=128)) -> JSONResponse:
        """Take a timed action; 201 when new, 200 when the same action was already taken, 409
        when its id names a different one."""
        if body.for_s is not None and body.until is not None:
            raise InvalidRequest("give for_s or until, not both.", field="until", fix="drop one of them.")
        raw = body.model_dump(exclude={"id"}, exclude_none=True)
        raw.update(id=key_of(body.id, idempotency_key), by=f"{'admin' if p.admin else 'soar'}:{p.tenant}")
        return await take(raw, p)

    @app.delete("/v1/threat/actions/{action_id}", **kw)
    async def remove(action_id: str = Path(max_length=128, pattern=r"^[A-Za-z0-9._:@/-]{1,128}$"),
                     p: Any = Depends(soar)) -> dict[str, Any]:
        """End an action now. Idempotent: removing one that is gone answers `removed: false`."""
        return {"removed": await call("threat_remove", action_id, f"soar:{p.tenant}")}

    @app.post("/v1/threat/tenants/{tenant}/raise", status_code=201, **kw)
    async def raise_(body: RaiseIn, tenant: str = TenantName, p: Any = Depends(soar),
                     idempotency_key: str | None = Header(None, max_length=128)) -> JSONResponse:
        """Serve the tenant's jobs as at least class `to` for `for_s` seconds."""
        key = key_of(None, idempotency_key or f"raise:{tenant}:{body.to}:{body.event_id or 'manual'}")
        return await take({"id": key, "kind": "boost", "tenant": tenant, "to": body.to, "for_s": body.for_s,
                           "reason": body.reason, "event_id": body.event_id, "by": f"soar:{p.tenant}"}, p)

    @app.post("/v1/threat/tenants/{tenant}/pause", status_code=201, **kw)
    async def pause(body: PauseIn, tenant: str = TenantName, p: Any = Depends(soar)) -> JSONResponse:
        """No job of the tenant starts (they are still accepted and stored) until resumed or `for_s` passes."""
        raw: dict[str, Any] = {"id": f"pause:{tenant}", "kind": "pause", "tenant": tenant, "reason": body.reason,
                               "event_id": body.event_id, "by": f"soar:{p.tenant}"}
        if body.for_s is not None:
            raw["for_s"] = body.for_s
        current = (await call("threat_actions"))["actions"]
        same = next((a for a in current if a["id"] == raw["id"]), None)
        if same is not None:      # paused already (whatever the reason given): nothing to do
            return JSONResponse({"action": same, "created": False})
        return await take(raw, p)

    @app.post("/v1/threat/tenants/{tenant}/resume", **kw)
    async def resume(tenant: str = TenantName, p: Any = Depends(soar)) -> dict[str, Any]:
        """The tenant's queued jobs start again. Idempotent."""
        return {"resumed": await call("threat_remove", f"pause:{tenant}", f"soar:{p.tenant}")}

    @app.post("/v1/threat/templates/{name}:submit", status_code=201, **kw)
    async def submit_template(name: str = Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="A name in threat.templates."),
                              p: Any = Depends(soar),
                              idempotency_key: str | None = Header(None, max_length=128)) -> dict[str, Any]:
        """Submit a registered job template as the caller's tenant. The Idempotency-Key is
        required: a playbook that retries submits nothing twice."""
        if idempotency_key is None:
            raise InvalidRequest("submitting a template needs an Idempotency-Key header.", field="Idempotency-Key",
                                 fix="send one (a UUID, or the incident id): a retry with it submits nothing twice.")
        key = key_of(None, idempotency_key)
        return {"template": name, "jobs": await call("threat_submit_template", name, p.tenant, f"soar:{key}")}
