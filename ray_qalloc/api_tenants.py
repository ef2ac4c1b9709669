"""The tenants' routes: the caller's own quota and usage, and, for admins, tokens and quotas.

Why a router of its own: tenants, tokens and quotas live in the tenant store (``tenants.py``),
not the allocator; these routes read and write it and nothing else. ``create_app`` mounts it
with its auth dependencies.
"""

from typing import Annotated, Any, Callable

from fastapi import Depends, FastAPI, Path
from starlette.concurrency import run_in_threadpool

from ray_qalloc.api_errors import ErrorOut
from ray_qalloc.api_models import TenantOut, TokenIn, TokenOut
from ray_qalloc.api_state import AppState
from ray_qalloc.tenants import Principal, Quota


def add_tenant_routes(app: FastAPI, state: AppState, principal: Callable[..., Any],
                      admin: Callable[..., Any]) -> None:
    """``principal`` is the auth dependency, ``admin`` the one that admits admin tokens only."""
    Caller = Annotated[Principal, Depends(principal)]
    Admin = Annotated[Principal, Depends(admin)]

    @app.get("/v1/me", response_model=TenantOut, tags=["tenants"])
    async def me(p: Caller) -> TenantOut:
        """The caller's tenant, quota and today's usage."""
        q = await run_in_threadpool(state.tenants.quota, p.tenant)
        use = await run_in_threadpool(state.tenants.usage, p.tenant)
        return TenantOut(tenant=p.tenant, quota=q, usage=use)

    # -- admin
    @app.post("/v1/admin/tokens", response_model=TokenOut, status_code=201, tags=["admin"],
              responses={403: {"model": ErrorOut}})
    async def create_token(body: TokenIn, _: Admin) -> TokenOut:
        token = await run_in_threadpool(state.tenants.create_token, body.tenant, admin=body.admin,
                                        scopes=tuple(body.scopes))
        return TokenOut(tenant=body.tenant, admin=body.admin, token=token)

    @app.put("/v1/admin/tenants/{tenant}/quota", response_model=TenantOut, tags=["admin"],
             responses={403: {"model": ErrorOut}})
    async def set_quota(tenant: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], quota: Quota,
                        _: Admin) -> TenantOut:
        await run_in_threadpool(state.tenants.set_quota, tenant, quota)
        use = await run_in_threadpool(state.tenants.usage, tenant)
        return TenantOut(tenant=tenant, quota=quota, usage=use)


__all__ = ["add_tenant_routes"]
