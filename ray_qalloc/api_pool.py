"""The pool's routes: the backends a tenant may use, with their live state, and the
allocator's own figures for admins.

Why a router of its own: what the pool offers is read from the allocator and filtered by the
tenant's permissions (the same filter placement uses), apart from the job routes. ``create_app``
mounts it with its auth dependencies.
"""

from typing import Annotated, Any, Callable

from fastapi import Depends, FastAPI

from ray_qalloc.api_errors import ErrorOut
from ray_qalloc.api_state import AppState
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.filters import TenantFilter
from ray_qalloc.placement.model import BackendView, JobView
from ray_qalloc.tenants import Principal


def add_pool_routes(app: FastAPI, state: AppState, principal: Callable[..., Any], admin: Callable[..., Any]) -> None:
    """``principal`` is the auth dependency, ``admin`` the one that admits admin tokens only."""
    settings = state.settings
    Caller = Annotated[Principal, Depends(principal)]
    Admin = Annotated[Principal, Depends(admin)]

    def _spec_of_row(r: dict[str, Any]) -> BackendSpec:
        return BackendSpec(r["name"], r["kind"], r.get("family") or "", int(r.get("num_qubits") or 0),
                           method=r.get("method"), pool=r.get("pool"))

    @app.get("/v1/backends", tags=["pool"])
    async def backends(p: Caller) -> list[dict[str, Any]]:
        """The pool: each backend's kind, size, health, load and calibration summary."""
        rows = await state.call("backends")
        if p.tenant not in settings.tenant_backends:
            return rows
        may = TenantFilter(settings.tenant_backends)
        view = JobView("-", 0, frozenset(), {}, 1, tenant=p.tenant)
        return [r for r in rows if may.check(view, BackendView(_spec_of_row(r))).ok]

    @app.get("/v1/admin/stats", tags=["admin"], responses={403: {"model": ErrorOut}})
    async def stats(_: Admin) -> dict[str, Any]:
        return await state.call("stats")


__all__ = ["add_pool_routes"]
