"""The HTTP API: a FastAPI app that Ray Serve runs as the ingress (see ``serving.py``).

Why the app holds no state of its own: any replica may answer any request, so every fact
lives in the job store (jobs, tenants, tokens, usage) or the allocator actor (the queue).
A replica parses and validates jobs itself (intake is CPU work that scales with replicas)
and sends only validated jobs to the allocator, one actor call per request or batch.

Every error is ``{"error": {"code", "message", "field"?, "hint"?, "details"?}}``; codes are
stable (see ``ERROR_STATUS``).

``create_app`` assembles the app from parts of one concern each, and holds the auth
dependencies they share:

* ``api_errors.py``: the error shape and its handlers; ``api_middleware.py``: the body limit
  and request metrics around every route;
* ``api_models.py``: request and response bodies; ``api_state.py``: what a replica holds
  (live limits, lazily opened stores, the allocator handle); ``api_openapi.py``: the limits
  in force, written into the served document;
* routers: ``api_jobs.py`` (jobs), ``api_pool.py`` (backends, stats), ``api_tenants.py``
  (the caller's quota, tokens, quotas), ``api_admin.py`` (operators), ``api_events.py``
  (security events), ``api_stream.py`` (the change stream), ``api_threat.py`` (threat
  actions), ``api_health.py`` (health and readiness).

The names other modules import from here (``create_app``, the models, ``error_response``,
``ApiLimits``, ``API_LIVE_FIELDS``, ...) stay importable from ``ray_qalloc.api``.
"""


from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header

from ray_qalloc import __version__
from ray_qalloc.api_admin import add_admin_routes
from ray_qalloc.api_errors import (ERROR_STATUS, ErrorDetail, ErrorOut, add_error_handlers,
                                   allowed_methods, error_response)
from ray_qalloc.api_events import add_event_routes
from ray_qalloc.api_health import add_health_routes
from ray_qalloc.api_jobs import add_job_routes
from ray_qalloc.api_middleware import add_middleware
from ray_qalloc.api_models import (PAULI_LABEL, BatchIn, BatchItem, BatchOut, ExpectationOut,
                                   Intent, JobAccepted, JobIn, JobOut, JobPage, Observable, Pending, Priority,
                                   ResultOut, Seed, TenantOut, TokenIn, TokenOut)
from ray_qalloc.api_openapi import document_live_limits
from ray_qalloc.api_pool import add_pool_routes
from ray_qalloc.api_state import API_LIVE_FIELDS, ApiLimits, AppState
from ray_qalloc.api_stream import add_stream_routes
from ray_qalloc.api_tenants import add_tenant_routes
from ray_qalloc.api_threat import add_threat_routes
from ray_qalloc.config import Settings, load_settings
from ray_qalloc.exceptions import Forbidden
from ray_qalloc.runopts import smallest_precision   # re-exported: tests import it from here
from ray_qalloc.tenants import Principal


# ---- the app -------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, *, allocator: Any = None) -> FastAPI:
    """The API over the allocator of ``settings`` (found by name in Ray unless given)."""
    settings = settings or load_settings()
    state = AppState(settings, allocator)
    limits = state.api   # Serve's user_config replaces it live (ApiLimits.reconfigure)
    app = FastAPI(title="ray-qalloc", version=__version__,
                  description="Quantum-classical job allocation on Ray: submit OpenQASM jobs, read results, "
                              "see why each job went where it went.",
                  responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}, 429: {"model": ErrorOut},
                             503: {"model": ErrorOut}})
    app.state.qalloc = state
    app.state.limits = limits   # the ingress's reconfigure reaches it through the app it serves
    document_live_limits(app, settings, limits)
    add_error_handlers(app)   # every error is the same JSON shape
    add_middleware(app, limits)

    # -- auth
    async def principal(authorization: Annotated[str | None, Header(
            description="`Bearer <token>`; create one with `qalloc token create TENANT`.")] = None) -> Principal:
        # on the loop: a cached token costs a hash and a dict lookup; a miss one indexed read
        return state.tenants.authenticate(authorization)

    async def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
        if not p.admin:
            raise Forbidden("this route is for admin tokens only.",
                            fix="use a token made with `qalloc token create TENANT --admin`.")
        return p

    add_job_routes(app, state, principal)
    add_pool_routes(app, state, principal, admin)
    add_tenant_routes(app, state, principal, admin)
    add_admin_routes(app, state.call, admin, {403: {"model": ErrorOut}, 404: {"model": ErrorOut}})
    add_event_routes(app, state, principal, {422: {"model": ErrorOut}})
    add_stream_routes(app, state.changefeed, principal, {422: {"model": ErrorOut}})
    add_threat_routes(app, state.call, principal, {403: {"model": ErrorOut}, 409: {"model": ErrorOut},
                                                   422: {"model": ErrorOut}})
    add_health_routes(app, state)
    return app


def openapi_document() -> str:
    """The OpenAPI document as committed in docs/openapi.json (stable key order)."""
    import json

    from ray_qalloc.config import Settings

    return json.dumps(create_app(Settings(data_dir="/nonexistent")).openapi(), indent=2, sort_keys=True) + "\n"


__all__ = ["API_LIVE_FIELDS", "ERROR_STATUS", "PAULI_LABEL", "ApiLimits", "AppState", "BatchIn", "BatchItem",
           "BatchOut", "ErrorDetail", "ErrorOut", "ExpectationOut", "Intent", "JobAccepted", "JobIn", "JobOut",
           "JobPage", "Observable", "Pending", "Priority", "ResultOut", "Seed", "TenantOut", "TokenIn", "TokenOut",
           "allowed_methods", "create_app", "error_response", "openapi_document", "smallest_precision"]
