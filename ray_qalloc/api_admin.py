"""Operators' routes: maintenance (cordon, drain, uncordon, windows), live configuration,
alerts, calibration status and the audit trail.

Kept apart from ``api.create_app`` (jobs, tenants, health) so that each concern stays small;
``create_app`` mounts this router with its own admin dependency. Every change is made by the
allocator (which commits it to the audited admin state before it applies it); the caller's
tenant name is recorded as the actor.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import Depends, FastAPI, Path, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_qalloc.wire import JsonFloat

BackendName = Path(description="A placement candidate (`cpu-1a2b3c4d/statevector`), a pool "
                               "(`cpu-1a2b3c4d`: all its methods) or a QPU (`qpu_fez`).")


class CordonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=500)


class DrainIn(CordonIn):
    wait_s: JsonFloat = Field(60.0, ge=0.0, le=3600.0,
                          description="How long to wait for the backend's running jobs to end.")


class WindowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: JsonFloat = Field(description="Unix time the maintenance begins.")
    end: JsonFloat = Field(description="Unix time it ends (after start, in the future).")
    reason: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _ordered(self) -> "WindowIn":
        if not self.end > self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self


# The page runs only its own script and plotly's, and talks only to this API.
_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; font-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")


class ConfigIn(BaseModel):
    """Settings to change (dotted keys, JSON values) and keys to reset to their start-up value."""

    model_config = ConfigDict(extra="forbid")
    changes: dict[str, Any] = Field(default_factory=dict, description="e.g. {\"placement.coherence_budget\": 2}")
    unset: list[str] = Field(default_factory=list, description="Keys whose live override is removed.")


def add_admin_routes(r: FastAPI, call: Callable[..., Awaitable[Any]], admin: Callable[..., Any],
                     responses: dict) -> None:
    """``call(method, *args, timeout=)`` reaches the allocator; ``admin`` is the dependency that
    admits admin tokens only (and returns the principal). Routes go on the app itself, not an
    included router: Serve's ingress copies ``app.routes`` and does not take an included
    router's lazily added ones (a route then asks for a ``query`` parameter)."""
    kw: dict[str, Any] = {"tags": ["admin"], "responses": responses}

    @r.get("/v1/admin/pools", **kw)
    async def pools(_: Any = Depends(admin)) -> list[dict[str, Any]]:
        """One row per simulator pool: its node, cores, memory, busy cores, health, and the
        pool actor's process (a changed pid means Ray restarted it)."""
        return await call("pools")

    @r.get("/v1/admin/maintenance", **kw)
    async def maintenance(_: Any = Depends(admin)) -> dict[str, Any]:
        """Backends under maintenance: cordon, drain, windows, runs still going there, and
        queued jobs that have no other backend (they wait)."""
        return await call("maintenance", None)

    @r.get("/v1/admin/backends/{name:path}/maintenance", **kw)
    async def backend_maintenance(name: str = BackendName, _: Any = Depends(admin)) -> dict[str, Any]:
        return await call("maintenance", name)

    @r.post("/v1/admin/backends/{name:path}/cordon", **kw)
    async def cordon(body: CordonIn, name: str = BackendName, p: Any = Depends(admin)) -> dict[str, Any]:
        """No new runs start there; running ones finish; queued jobs go to their next-best
        backend, or wait if they have none."""
        return await call("cordon", name, body.reason, p.tenant)

    @r.post("/v1/admin/backends/{name:path}/drain", **kw)
    async def drain(body: DrainIn, name: str = BackendName, p: Any = Depends(admin)) -> dict[str, Any]:
        """Cordon, then wait up to ``wait_s`` for its running jobs to end (``drained`` says if they did)."""
        return await call("drain", body.wait_s, name, body.reason, p.tenant, timeout=body.wait_s + 30.0)

    @r.post("/v1/admin/backends/{name:path}/uncordon", **kw)
    async def uncordon(name: str = BackendName, p: Any = Depends(admin)) -> dict[str, Any]:
        return await call("uncordon", name, p.tenant)

    @r.post("/v1/admin/backends/{name:path}/windows", **kw)
    async def add_window(body: WindowIn, name: str = BackendName, p: Any = Depends(admin)) -> dict[str, Any]:
        """A maintenance window: no run starts there that would not end before it begins."""
        return await call("maintenance_window", name, body.start, body.end, body.reason, p.tenant)

    @r.delete("/v1/admin/backends/{name:path}/windows", **kw)
    async def clear_windows(name: str = BackendName, p: Any = Depends(admin)) -> dict[str, Any]:
        return await call("clear_maintenance_windows", name, p.tenant)

    @r.get("/v1/admin/config", **kw)
    async def get_config(_: Any = Depends(admin)) -> dict[str, Any]:
        """The settings in force (secrets masked), what was changed live, and the keys that may change."""
        return await call("config")

    @r.put("/v1/admin/config", **kw)
    async def put_config(body: ConfigIn, p: Any = Depends(admin)) -> dict[str, Any]:
        """Change settings on the running allocator. The whole configuration is validated as at
        start-up; a bad value is refused with its field and why, and nothing is applied. Every
        change is audited (``/v1/admin/audit?key=config``) and survives a restart."""
        return await call("set_config", body.changes, p.tenant, body.unset)

    @r.get("/v1/admin/alerts", **kw)
    async def alerts(limit: int = Query(100, ge=1, le=1000), _: Any = Depends(admin)) -> dict[str, Any]:
        """Firing alerts, the newest alert events, and each sink's delivery counts."""
        return await call("alerts_view", limit)

    @r.get("/v1/admin/calibration", **kw)
    async def calibration(_: Any = Depends(admin)) -> list[dict[str, Any]]:
        """Per QPU: calibration age, staleness, series in drift alarm, last read error."""
        return await call("calibration_status")

    @r.get("/v1/admin/dashboard", **kw)
    async def dashboard_data(_: Any = Depends(admin)) -> dict[str, Any]:
        """What one refresh of ``/dashboard`` shows: utilisation and queue timelines, recent
        decisions with their reasons, open alerts, calibration, nodes."""
        return await call("dashboard")

    @r.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        """The page is static and holds no data: its script asks for an admin token and
        fetches ``/v1/admin/dashboard`` with it."""
        from ray_qalloc.dashboard import page

        return HTMLResponse(page(), headers={"Cache-Control": "no-store",
                                             "Content-Security-Policy": _CSP})

    @r.get("/dashboard/plotly.min.js", include_in_schema=False)
    async def plotly_bundle() -> Response:
        from ray_qalloc.dashboard import plotly_js

        body = plotly_js()
        if body is None:
            return Response("/* plotly is not installed: the dashboard shows tables only */",
                            media_type="text/javascript")
        return Response(body, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})

    @r.get("/v1/admin/audit", **kw)
    async def audit(key: str | None = Query(None, max_length=128), limit: int = Query(100, ge=1, le=1000),
                    _: Any = Depends(admin)) -> list[dict[str, Any]]:
        """Operators' changes, newest first: who, when, what, old → new."""
        return await call("audit", key, limit)

