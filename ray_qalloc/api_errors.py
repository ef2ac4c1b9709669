"""The API's one error shape, and the handlers that give every error that shape.

Every error is ``{"error": {"code", "message", "field"?, "hint"?, "details"?}}``; codes are
stable (``ERROR_STATUS``). Why a module of its own: every router answers errors this way
(``api_events.py`` builds its own answers with ``error_response``), and the app installs the
handlers once (``add_error_handlers``), so the shape is kept in one place.
"""

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ray_qalloc.exceptions import IntakeError, QAllocError, QuotaExceeded, Unauthorized
from ray_qalloc.runopts import MAX_SEED

log = logging.getLogger("ray_qalloc.api")

# stable error code -> HTTP status
ERROR_STATUS: dict[str, int] = {
    "invalid_request": 422, "invalid_job": 422, "invalid_job_spec": 422, "invalid_circuit": 422,
    "forbidden_include": 422, "limit_exceeded": 422, "no_feasible_backend": 422,
    "body_too_large": 413, "unauthorized": 401, "forbidden": 403, "not_found": 404,
    "job_not_found": 404, "unknown_backend": 404, "method_not_allowed": 405, "conflict": 409, "idempotency_key_reused": 409,
    "job_failed": 409, "job_cancelled": 409, "quota_exceeded": 429, "unavailable": 503, "internal": 500,
    "config_error": 422,
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    hint: str | None = None
    details: dict[str, Any] | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


def error_response(code: str, message: str, *, field: str | None = None, hint: str | None = None,
                   details: dict[str, Any] | None = None, status: int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    if hint is not None:
        body["hint"] = hint
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status or ERROR_STATUS.get(code, 400), headers=headers)


def _qalloc_error(exc: QAllocError) -> JSONResponse:
    d = exc.to_dict()
    headers: dict[str, str] = {}
    if isinstance(exc, QuotaExceeded):
        headers["Retry-After"] = str(max(1, math.ceil(float(exc.details.get("retry_after_s", 1)))))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    status = ERROR_STATUS.get(exc.code)
    if status is None:
        status = 422 if isinstance(exc, IntakeError) else 500
    details = {k: v for k, v in exc.details.items() if _jsonable(v)} or None
    return error_response(d["code"], d["message"], field=d.get("field"), hint=d.get("hint"), details=details,
                          status=status, headers=headers or None)


_FIELD_FIX = {
    "observables": 'pass a list of observables, each a mapping of Pauli label to a number, e.g. '
                   '[{"ZZ": 1.0, "XI": 0.5}]: one letter I, X, Y or Z per circuit qubit (rightmost = qubit 0).',
    "precision": "pass the wanted standard error as a number >= 0 (0: exact values, on simulators only), "
                 "together with observables; or leave it out.",
    "seed": f"pass a whole number in 0..{MAX_SEED} (a JSON integer, not a string), or leave it out.",
}


def _hint_for(field: str) -> str:
    """The fix for a field the model refused: the field's own where it has one (a job's field,
    also inside a batch: ``jobs.3.observables.0``), else where the document is."""
    parts = field.split(".")
    if parts[0] == "jobs" and len(parts) > 2:
        parts = parts[2:]
    return _FIELD_FIX.get(parts[0], "see the OpenAPI schema at /openapi.json for the accepted fields.")


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def allowed_methods(request: Request) -> str:
    """The ``Allow`` value of a 405: every method of every route on the request's path.

    Why not Starlette's own header: it names only the first route whose path matched, and
    FastAPI makes one route per method (``GET`` and ``DELETE /v1/jobs/{id}`` are two), so it
    would leave out methods the resource has."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:   # the path matched (a method mismatch is PARTIAL, not NONE)
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app answers, in the one JSON shape: ours, the request model's, Starlette's
    (404, 405, 413, a body that does not parse) and any crash."""

    @app.exception_handler(QAllocError)
    async def _on_qalloc(_: Request, exc: QAllocError) -> JSONResponse:
        if exc.details.get("unavailable"):
            return error_response("unavailable", exc.message, hint=exc.fix, headers={"Retry-After": "2"})
        return _qalloc_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        where = _field_of(tuple(first.get("loc", ())))
        return error_response("invalid_request", f"field {where!r}: {first.get('msg')}", field=where,
                              hint=_hint_for(where),
                              details={"errors": [{"field": _field_of(tuple(e.get("loc", ()))),
                                                   "message": str(e.get("msg"))} for e in errs[:20]]})

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "invalid_request")
        status = 422 if exc.status_code == 400 else exc.status_code   # a body that does not parse
        headers = dict(exc.headers or {})
        if exc.status_code == 405:   # RFC 9110: a 405 lists what the resource does support
            headers["Allow"] = allowed_methods(request)
        return error_response(code, str(exc.detail), status=status, headers=headers or None,
                              hint="see /docs for the routes." if exc.status_code in (404, 405) else None)

    @app.exception_handler(Exception)
    async def _on_crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the API")
        return error_response("internal", f"internal error ({type(exc).__name__}); nothing accepted was lost.",
                              hint="retry; if it persists, report it with the time of the request.")


__all__ = ["ERROR_STATUS", "ErrorDetail", "ErrorOut", "add_error_handlers", "allowed_methods", "error_response"]
