"""What wraps every request: the body size limit (before any parsing) and the request metrics.

Why a module of its own: both apply to every route, whichever router made it, and their
order matters — the metrics middleware is added last so that it is outermost and counts
refused requests too.
"""

import time
from typing import Any

from fastapi import FastAPI, Request

from ray_qalloc.api_errors import error_response
from ray_qalloc.api_state import ApiLimits
from ray_qalloc.metrics import metrics


def add_middleware(app: FastAPI, limits: ApiLimits) -> None:
    """The body limit reads ``limits.current`` on every request (Serve's ``user_config`` changes it live)."""

    # -- body size limit, before any parsing
    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        limit = limits.current.max_body_bytes
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return error_response("invalid_request", "Content-Length is not a number.", field="Content-Length")
            if too_big:
                return error_response("body_too_large", f"request body of {length} bytes is over the limit of "
                                      f"{limit} bytes.", field="body", hint="split the batch or shorten the circuit.",
                                      details={"limit": limit})
        elif request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return error_response("body_too_large", f"request body is over the limit of {limit} bytes.",
                                          field="body", hint="split the batch or shorten the circuit.",
                                          details={"limit": limit})
            request._body = body   # starlette reads it from here
        return await call_next(request)

    # -- metrics: outermost, so refused requests are counted too; the route's template, never the path
    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        code = 500
        try:
            response = await call_next(request)
            code = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            metrics.api_request(getattr(route, "path", None), code, time.perf_counter() - t0)


__all__ = ["add_middleware"]
