"""The HTTP API: a FastAPI app that Ray Serve runs as the ingress (see ``serving.py``).

Why the app holds no state of its own: any replica may answer any request, so every fact
lives in the job store (jobs, tenants, tokens, usage) or the allocator actor (the queue).
A replica parses and validates jobs itself (intake is CPU work that scales with replicas)
and sends only validated jobs to the allocator, one actor call per request or batch.

Every error is ``{"error": {"code", "message", "field"?, "hint"?, "details"?}}``; codes are
stable (see ``ERROR_STATUS``).
"""


import asyncio
import copy
import dataclasses
import logging
import math
import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ray_qalloc import __version__
from ray_qalloc.config import ApiSettings, Settings, load_settings
from ray_qalloc.api_admin import add_admin_routes
from ray_qalloc.api_events import add_event_routes
from ray_qalloc.api_stream import add_stream_routes
from ray_qalloc.api_threat import add_threat_routes
from ray_qalloc.exceptions import (ConfigError, Conflict, Forbidden, IdempotencyKeyReused, IntakeError,
                                   InvalidJobSpec, JobNotFound, LimitExceeded, QAllocError, QuotaExceeded,
                                   Unauthorized)
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.backends.pools import resolve_allowed
from ray_qalloc.jobs import JobState, PreparedJob, make_spec, prepare_job
from ray_qalloc.placement.filters import TenantFilter
from ray_qalloc.placement.model import BackendView, JobView
from ray_qalloc.metrics import metrics
from ray_qalloc.runopts import MAX_OBSERVABLES, MAX_SEED, MAX_TERMS, smallest_precision
from ray_qalloc.tenants import Principal, Quota, TenantStore
from ray_qalloc.wire import JsonFloat, JsonInt, json_integer_or_null

log = logging.getLogger("ray_qalloc.api")

# Intake (parsing QASM) runs on the replica's event-loop thread, not in a thread pool
# ("intake on the loop" below): in a Serve replica, Qiskit's OpenQASM 2 parser crashed the
# process (SIGSEGV in its allocator) when called from an anyio worker thread. Parsing a job
# takes well under a millisecond; more throughput comes from more replicas.

# stable error code -> HTTP status
ERROR_STATUS: dict[str, int] = {
    "invalid_request": 422, "invalid_job": 422, "invalid_job_spec": 422, "invalid_circuit": 422,
    "forbidden_include": 422, "limit_exceeded": 422, "no_feasible_backend": 422,
    "body_too_large": 413, "unauthorized": 401, "forbidden": 403, "not_found": 404,
    "job_not_found": 404, "unknown_backend": 404, "method_not_allowed": 405, "conflict": 409, "idempotency_key_reused": 409,
    "job_failed": 409, "job_cancelled": 409, "quota_exceeded": 429, "unavailable": 503, "internal": 500,
    "config_error": 422,
}

Priority = Literal["emergency", "high", "normal", "batch"]
Intent = Literal["auto", "quantum", "classical"]


# ---- request and response bodies ---------------------------------------------------------
PAULI_LABEL = r"^[IXYZ]+$"
_OBSERVABLE_SCHEMA = {
    "type": "object", "minProperties": 1, "propertyNames": {"pattern": PAULI_LABEL},
    "additionalProperties": {"type": "number"},
    "description": "Pauli label (one letter I/X/Y/Z per circuit qubit, rightmost = qubit 0) -> real coefficient.",
}
Observable = Annotated[
    dict[Annotated[str, Field(pattern=PAULI_LABEL)], Annotated[float, Field(strict=True, allow_inf_nan=False)]],
    Field(min_length=1),
    # pydantic writes a key pattern as `patternProperties`, which lets other keys through in the
    # document while the model refuses them: `propertyNames` says exactly what the model checks
    WithJsonSchema(_OBSERVABLE_SCHEMA)]
"""One observable: a Pauli sum as ``{label: coefficient}``. JSON numbers only (``"1"`` is refused)."""


# A JSON integer or null. Why not ``JsonInt | None``: pydantic then writes the bounds of the
# integer branch into the document as `ge`/`le`, which no JSON Schema reader understands.
Seed = Annotated[Annotated[int, Field(ge=0, le=MAX_SEED)] | None, BeforeValidator(json_integer_or_null)]


class JobIn(BaseModel):
    """One job, in the field names of the trace format (DESIGN.md). The tenant is the token's.

    Numbers are ``wire`` types: ``"5"`` or ``true`` for ``shots`` is refused, not coerced."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "qasm": 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\n'
                "measure q -> c;\n", "shots": 1000, "priority": "normal"}]})

    qasm: str = Field(min_length=1, description="OpenQASM 2 or 3 text (no includes but qelib1.inc / stdgates.inc).")
    format: Literal["qasm", "cirq", "braket"] = Field("qasm", description=(
        "What wrote `qasm`: `qasm` standard OpenQASM 2/3; `cirq` what `cirq.qasm` writes (standard OpenQASM, "
        "read as is); `braket` Braket's OpenQASM 3 (`Circuit.to_ir('OPENQASM')`, Braket gate names such as "
        "`cnot`, `phaseshift`, `xy`; no includes; `#pragma braket` result types, noise, verbatim boxes and "
        "unitaries are refused). Counts use Qiskit's bit order (classical bit 0 rightmost) for every format."))
    shots: JsonInt = Field(1024, ge=1, description="Number of shots.")
    priority: Priority = Field("normal", description="Priority class; `emergency` only where granted.")
    deadline_s: JsonFloat | None = Field(None, gt=0, description="Seconds from submission to the wanted result.")
    intent: Intent = Field("auto", description="`quantum` needs a QPU, `classical` a simulator, `auto` either.")
    fidelity_min: JsonFloat | None = Field(None, gt=0, le=1, description="Lowest acceptable estimated fidelity.")
    backends: list[str] | None = Field(None, max_length=64, description=(
        "Only these may run the job: backend or candidate names (`cpu-1a2b3c4d/mps`), pool names "
        "(`cpu-1a2b3c4d`: every method there) or method names (`statevector`, `mps`, `stabilizer`, "
        "`density_matrix`: that method on every pool)."))
    tenant: str | None = Field(None, description="Optional; must be the token's tenant when given.")
    id: str | None = Field(None, max_length=200, description="A trace's own job id; echoed as `client_id`.")
    arrival_s: JsonFloat | None = Field(None, description="Trace replay field; ignored.")
    observables: list[Observable] | None = Field(None, min_length=1, description=(
        "Makes it an estimator job: the result carries `expectation` (one value per observable, in this order), "
        "not counts. Each observable is `{pauli_label: coefficient}`, one letter per circuit qubit "
        f"(rightmost = qubit 0). At most {MAX_OBSERVABLES:,} observables and {MAX_TERMS:,} Pauli terms in all; "
        "final measurements are ignored, earlier ones refused."))
    precision: JsonFloat | None = Field(None, ge=0, allow_inf_nan=False, description=(
        "Estimator jobs only: the wanted standard error. A QPU spends ceil(1/precision^2) shots per "
        "measurement basis (at most `max_shots`); simulators compute exact values. 0: exact values, "
        "simulators only. Left out: `shots` per basis."))
    seed: Seed = Field(None, description=(
        "Simulator seed: the same seed on the same method gives the same counts (pin the method with "
        "`backends`); QPUs ignore it."))


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    jobs: list[JobIn] = Field(min_length=1, description="The jobs, answered in the same order.")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    hint: str | None = None
    details: dict[str, Any] | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


class JobAccepted(BaseModel):
    id: str
    created: bool = Field(description="False when the Idempotency-Key named an earlier job.")
    state: str
    flag: str | None = Field(None, description="Why it is predicted to miss its deadline, if it is.")
    client_id: str | None = None
    simulators_only: bool = Field(False, description="Limited to simulators: the tenant's QPU time is spent.")


class BatchItem(BaseModel):
    id: str | None = None
    created: bool | None = None
    client_id: str | None = None
    error: ErrorDetail | None = None


class BatchOut(BaseModel):
    jobs: list[BatchItem]
    accepted: int
    refused: int


class JobOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    tenant: str
    state: str
    priority: str
    intent: str
    shots: int
    deadline_s: float | None = None
    fidelity_min: float | None = None
    num_qubits: int
    created_at: float
    updated_at: float
    backend: str | None = None
    attempts: int
    error: str | None = None
    flag: str | None = None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class ExpectationOut(BaseModel):
    """An estimator job's values, one per submitted observable, in order."""

    evs: list[float] = Field(description="Expectation values.")
    stds: list[float] = Field(description="Their standard errors: 0 where computed exactly.")
    exact: bool = Field(description="Computed exactly (a simulator), not from shots.")
    groups: int = Field(0, description="Measurement bases run (qubit-wise commuting groups); 0 when exact.")
    shots_per_group: int = Field(0, description="Shots per measurement basis; 0 when exact.")
    precision: float | None = Field(None, description="The standard error asked for (from `precision` or `shots`).")


class ResultOut(BaseModel):
    id: str
    state: str
    counts: dict[str, int] = Field(description="Measured outcomes; empty for an estimator job (see `expectation`).")
    shots: int
    backend: str
    wall_s: float
    queue_s: float
    qpu_s: float | None = None
    attempts: int
    failover_history: list[dict[str, Any]] = Field(default_factory=list)
    expectation: ExpectationOut | None = Field(None, description="An estimator job's values; null for a sampler job.")


class Pending(BaseModel):
    id: str
    state: str


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    admin: bool = Field(False, strict=True)   # `0` or "no" is refused, not read as false
    scopes: list[Literal["soar"]] = Field(default_factory=list, max_length=4, description=(
        "Grants beyond the tenant's own jobs: `soar` takes threat actions (boost, reserve, pause, resume)."))


class TokenOut(BaseModel):
    tenant: str
    admin: bool
    token: str = Field(description="Shown once; only its hash is stored.")


class TenantOut(BaseModel):
    tenant: str
    quota: Quota
    usage: dict[str, float]


# ---- errors --------------------------------------------------------------------------------
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


# ---- state of one replica ------------------------------------------------------------------
API_LIVE_FIELDS = ("max_body_bytes", "max_batch_jobs", "max_result_wait_s", "max_page")
"""The API's settings that Serve's ``user_config`` changes on running replicas."""


class ApiLimits:
    """The API's own limits in force on this replica.

    Why Serve's ``user_config`` and not the allocator's live config: these limits belong to
    the replicas, which Serve owns; ``serve deploy`` with a changed ``user_config`` reaches
    every replica through ``reconfigure`` without a restart, the same way on one node or
    fifty. The new value is validated by the same typed model as at start-up; an invalid one
    is refused whole (Serve reports the deploy failed and the replicas keep the old limits)."""

    def __init__(self, api: ApiSettings) -> None:
        self.current = api
        self.changes = 0

    def reconfigure(self, config: dict[str, Any] | None) -> ApiSettings:
        given = dict((config or {}).get("api", config or {}))
        unknown = sorted(set(given) - set(API_LIVE_FIELDS))
        if unknown:
            raise ConfigError(f"user_config names API setting(s) Serve cannot change live: {', '.join(unknown)}.",
                              field=f"api.{unknown[0]}",
                              fix=f"use {', '.join(API_LIVE_FIELDS)}; the others are deployment options.")
        try:
            new = ApiSettings.model_validate({**self.current.model_dump(), **given})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"user_config api.{where}: {err['msg']}.", field=f"api.{where}",
                              fix="give a value the settings model accepts (see `qalloc config get api`).") from None
        self.current = new
        self.changes += 1
        return new

    @staticmethod
    def check(name: str, value: float, limit: float, setting: str) -> None:
        if value > limit:
            raise InvalidJobSpec(f"query parameter {name!r} is {value:g}, over this API's limit of {limit:g}.",
                                 field=name, fix=f"ask for at most {limit:g} (the API's `{setting}`).")


class AppState:
    """What a replica opens lazily in its own process: the stores and the allocator handle."""

    def __init__(self, settings: Settings, allocator: Any = None) -> None:
        self.settings = settings
        self.api = ApiLimits(settings.api)
        self._allocator = allocator
        self._store: Any = None
        self._tenants: TenantStore | None = None
        self._backends: tuple[float, list[dict[str, Any]]] | None = None
        self._feed: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from ray_qalloc.store import JobStore

            self._store = JobStore(self.settings.resolved_store_url)
        return self._store

    def changefeed(self) -> Any:
        """The change stream's reader, on the job store's database (opened on first use)."""
        if self._feed is None:
            from ray_qalloc.changefeed import ChangeFeed

            self._feed = ChangeFeed(self.store.engine)
        return self._feed

    @property
    def tenants(self) -> TenantStore:
        if self._tenants is None:
            self._tenants = TenantStore(self.settings.resolved_store_url)
        return self._tenants

    @property
    def allocator(self) -> Any:
        if self._allocator is None:
            import ray

            try:
                self._allocator = ray.get_actor(self.settings.allocator_name, namespace=self.settings.namespace)
            except ValueError:
                raise QAllocError("the allocator is not running.", fix="start it with `qalloc serve` "
                                  "or ray_qalloc.connect() on this cluster.", unavailable=True) from None
        return self._allocator

    async def call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """One allocator call, bounded in time; a dead or missing allocator answers 503."""
        try:
            return await asyncio.wait_for(getattr(self.allocator, method).remote(*args), timeout)
        except QAllocError as exc:
            if exc.details.get("unavailable"):
                raise
            raise _plain(exc) from None
        except asyncio.TimeoutError:
            raise QAllocError(f"the allocator did not answer {method} within {timeout:g} s.",
                              fix="retry shortly; see /readyz.", unavailable=True) from None
        except Exception as exc:  # RayActorError and friends: the actor is restarting
            self._allocator = None
            raise QAllocError(f"the allocator is unavailable ({type(exc).__name__}).",
                              fix="retry shortly; accepted jobs are kept in the store.", unavailable=True) from None

    async def backends(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        if self._backends is None or now - self._backends[0] > 10.0:
            self._backends = (now, await self.call("backends"))
        return self._backends[1]


def _plain(exc: QAllocError) -> QAllocError:
    """Ray re-raises an actor's error as a subclass of it and RayTaskError: rebuild the plain one."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("ray_qalloc"):
            return cls(exc.message, fix=exc.fix, field=exc.field, **exc.details)
    return exc


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
    _document_live_limits(app, settings, limits)

    # -- error handlers: every error is the same JSON shape
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

    Caller = Annotated[Principal, Depends(principal)]
    Admin = Annotated[Principal, Depends(admin)]
    JobId = Annotated[str, Path(max_length=64, description="A job id as returned by POST /v1/jobs.")]

    def own(p: Principal, job_id: str) -> Any:
        rec = state.store.get(job_id)
        if rec.tenant != p.tenant:   # another tenant's job does not exist for this caller
            raise JobNotFound(f"no job with id {job_id!r}.", field="job_id")
        return rec

    # -- intake
    async def _simulators() -> list[str]:
        return [b["name"] for b in await state.backends() if b["kind"] == "simulator"]

    def _prepare(p: Principal, job: JobIn, key: str | None) -> PreparedJob:
        if job.tenant is not None and job.tenant != p.tenant:
            raise Forbidden(f"field 'tenant' is {job.tenant!r} but the token belongs to {p.tenant!r}.",
                            field="tenant", fix="leave 'tenant' out; it comes from the token.")
        from ray_qalloc.frontends import translate_text   # Braket's dialect -> standard OpenQASM 3

        spec = make_spec(circuit=translate_text(job.qasm, job.format), shots=job.shots, priority=job.priority, deadline_s=job.deadline_s,
                         intent=job.intent, fidelity_min=job.fidelity_min, tenant=p.tenant,
                         idempotency_key=key, backends=tuple(job.backends) if job.backends else None,
                         observables=job.observables, precision=job.precision, seed=job.seed)
        return prepare_job(spec, settings.limits)

    def _charged(job: JobIn, prepared: PreparedJob | ErrorDetail) -> dict[str, Any]:
        """What the quota check reads of a job. Why the prepared shots: an estimator job runs
        ⌈1/precision²⌉ shots per measurement basis, not its `shots` field."""
        shots = prepared.shots if isinstance(prepared, PreparedJob) else job.shots
        return {"shots": shots, "priority": job.priority, "intent": job.intent}

    def _on_simulators(job: PreparedJob, sims: list[str] | None) -> PreparedJob:
        """The tenant's QPU time is spent: an ``auto`` job may still run, on simulators only."""
        if sims is None or job.intent.value != "auto":
            return job
        allowed = sorted(resolve_allowed(job.backends, sims)) if job.backends else sims
        return dataclasses.replace(job, backends=tuple(allowed or sims))

    def _same_request(rec: Any, job: PreparedJob) -> bool:
        return (rec.payload == job.payload and rec.shots == job.shots and rec.priority == job.priority
                and rec.intent == job.intent and rec.deadline_s == job.deadline_s
                and rec.fidelity_min == job.fidelity_min)

    @app.post("/v1/jobs", status_code=201, response_model=JobAccepted, tags=["jobs"],
              responses={200: {"model": JobAccepted, "description": "The Idempotency-Key named an earlier job."},
                         403: {"model": ErrorOut}, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}})
    async def submit(job: JobIn, p: Caller,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
        """Validate, store and queue one job. With `Idempotency-Key`, a retry returns the same job."""
        prepared = _prepare(p, job, idempotency_key)   # intake on the loop; limits before quotas
        usage = state.tenants.admit(p.tenant, [_charged(job, prepared)])
        sims = await _simulators() if usage["qpu_exhausted"] else None
        prepared = _on_simulators(prepared, sims)
        out = await state.call("submit", prepared)
        job_state = out.get("state")
        if not out["created"]:
            rec = await run_in_threadpool(state.store.get, out["id"], with_circuit=True)
            if not _same_request(rec, prepared):
                raise _reused(idempotency_key, out["id"])
            job_state = rec.state.value
        body = JobAccepted(id=out["id"], created=out["created"], state=job_state or "queued", flag=out.get("flag"),
                           client_id=job.id, simulators_only=sims is not None and job.intent == "auto")
        return JSONResponse(body.model_dump(), status_code=201 if out["created"] else 200,
                            headers={"Location": f"/v1/jobs/{out['id']}"})

    @app.post("/v1/jobs:batch", response_model=BatchOut, tags=["jobs"],
              responses={403: {"model": ErrorOut}, 413: {"model": ErrorOut}})
    async def submit_batch(batch: BatchIn, p: Caller,
                           idempotency_key: Annotated[str | None, Header(max_length=180)] = None) -> BatchOut:
        """Many jobs in one round trip and one store transaction. Each job is answered on its
        own: accepted (`id`) or refused (`error`); a refused job does not stop the others.
        With `Idempotency-Key: K`, job *i* uses the key `K/i`."""
        api = limits.current
        if len(batch.jobs) > api.max_batch_jobs:
            raise LimitExceeded(f"the batch has {len(batch.jobs)} jobs, more than max_batch_jobs="
                                f"{api.max_batch_jobs}.", field="jobs", fix="split it into smaller batches.",
                                limit=api.max_batch_jobs)
        def prepare_all() -> list[PreparedJob | ErrorDetail]:
            out: list[PreparedJob | ErrorDetail] = []
            for i, j in enumerate(batch.jobs):
                try:
                    out.append(_prepare(p, j, f"{idempotency_key}/{i}" if idempotency_key else None))
                except QAllocError as exc:
                    out.append(ErrorDetail(**{k: v for k, v in exc.to_dict().items() if k != "details"}))
            return out

        prepared = prepare_all()   # intake on the loop; limits before quotas
        usage = state.tenants.admit(p.tenant, [_charged(j, x) for j, x in zip(batch.jobs, prepared)])
        sims = await _simulators() if usage["qpu_exhausted"] else None
        prepared = [_on_simulators(x, sims) if isinstance(x, PreparedJob) else x for x in prepared]
        good = [x for x in prepared if isinstance(x, PreparedJob)]
        answers = iter(await state.call("submit_many", good, timeout=120.0) if good else [])
        items: list[BatchItem] = []
        for j, x in zip(batch.jobs, prepared):
            if isinstance(x, ErrorDetail):
                items.append(BatchItem(error=x, client_id=j.id))
                continue
            a = next(answers)
            if "error" not in a and not a["created"]:
                rec = await run_in_threadpool(state.store.get, a["id"], with_circuit=True)
                if not _same_request(rec, x):
                    a = {"error": _reused(idempotency_key, a["id"]).to_dict()}
            if "error" in a:
                e = a["error"]
                items.append(BatchItem(error=ErrorDetail(code=e["code"], message=e["message"], field=e.get("field"),
                                                         hint=e.get("hint")), client_id=j.id))
            else:
                items.append(BatchItem(id=a["id"], created=a["created"], client_id=j.id))
        refused = sum(1 for i in items if i.error is not None)
        return BatchOut(jobs=items, accepted=len(items) - refused, refused=refused)

    @app.get("/v1/jobs", response_model=JobPage, tags=["jobs"])
    async def list_jobs(p: Caller, limit: Annotated[int, Query(ge=1, description=(
                            "Jobs per page, at most the API's `max_page` (500 unless configured)."))] = 50,
                        cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,9}$")] = None) -> JobPage:
        """The caller's own jobs, newest first."""
        limits.check("limit", limit, limits.current.max_page, "max_page")
        offset = int(cursor or 0)
        recs = await run_in_threadpool(state.store.list_jobs, tenant=p.tenant, limit=limit + 1, offset=offset)
        more = len(recs) > limit
        return JobPage(jobs=[JobOut(**r.public()) for r in recs[:limit]],
                       next_cursor=str(offset + limit) if more else None)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses={404: {"model": ErrorOut}})
    async def get_job(job_id: JobId, p: Caller) -> JobOut:
        rec = await run_in_threadpool(own, p, job_id)
        return JobOut(**rec.public())

    @app.get("/v1/jobs/{job_id}/result", response_model=ResultOut, tags=["jobs"],
             responses={202: {"model": Pending, "description": "Not finished yet; ask again."},
                        404: {"model": ErrorOut}, 409: {"model": ErrorOut}})
    async def get_result(job_id: JobId, p: Caller,
                         wait: Annotated[float, Query(ge=0, description=(
                             "Seconds to wait for the result, at most the API's `max_result_wait_s` "
                             "(60 unless configured)."))] = 10.0
                         ) -> Any:
        """The result once the job completed; waits up to `wait` seconds, then answers 202."""
        limits.check("wait", wait, limits.current.max_result_wait_s, "max_result_wait_s")
        rec = await run_in_threadpool(own, p, job_id)
        if not rec.state.terminal and wait > 0:
            data = await state.call("wait", job_id, wait, timeout=wait + 30.0)
            state_now, result = JobState(data["state"]), data.get("result")
            attempts, history = data.get("attempts", 1), data.get("attempt_history", [])
        else:
            state_now, result, attempts = rec.state, rec.result, rec.attempts
            history = await run_in_threadpool(state.store.attempt_history, job_id)
        if state_now == JobState.COMPLETED and result:
            return ResultOut(id=job_id, state=state_now.value, counts=result.get("counts", {}), shots=rec.shots,
                             backend=result.get("backend", rec.backend or ""), wall_s=float(result.get("wall_s", 0)),
                             queue_s=float(result.get("queue_s", 0)), qpu_s=result.get("qpu_s"),
                             attempts=attempts, failover_history=history,
                             expectation=(result.get("metadata") or {}).get("expectation"))
        if state_now == JobState.FAILED:
            return error_response("job_failed", f"job {job_id} failed: {rec.error or 'no detail'}.",
                                  hint="see GET /v1/jobs/{id}/explain for placement and failover history.")
        if state_now == JobState.CANCELLED:
            return error_response("job_cancelled", f"job {job_id} was cancelled.")
        return JSONResponse(Pending(id=job_id, state=state_now.value).model_dump(), status_code=202,
                            headers={"Retry-After": "1"})

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"],
                responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}})
    async def cancel(job_id: JobId, p: Caller) -> JobOut:
        """Cancel a queued or running job; a finished job answers 409."""
        rec = await run_in_threadpool(own, p, job_id)
        if not await state.call("cancel", job_id):
            rec = await run_in_threadpool(state.store.get, job_id)
            raise Conflict(f"job {job_id} is already {rec.state.value}; it cannot be cancelled.", field="job_id",
                           state=rec.state.value)
        rec = await run_in_threadpool(state.store.get, job_id)
        return JobOut(**rec.public())

    @app.get("/v1/jobs/{job_id}/explain", tags=["jobs"], responses={404: {"model": ErrorOut}})
    async def explain_job(job_id: JobId, p: Caller) -> dict[str, Any]:
        """Every backend considered: filtered out (why) or scored (per scorer), and the choice."""
        await run_in_threadpool(own, p, job_id)
        return await state.call("explain", job_id)

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

    @app.get("/v1/admin/stats", tags=["admin"], responses={403: {"model": ErrorOut}})
    async def stats(_: Admin) -> dict[str, Any]:
        return await state.call("stats")

    add_admin_routes(app, state.call, admin, {403: {"model": ErrorOut}, 404: {"model": ErrorOut}})
    add_event_routes(app, state, principal, {422: {"model": ErrorOut}})
    add_stream_routes(app, state.changefeed, principal, {422: {"model": ErrorOut}})
    add_threat_routes(app, state.call, principal, {403: {"model": ErrorOut}, 409: {"model": ErrorOut},
                                                   422: {"model": ErrorOut}})

    # -- health
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """This replica is up (says nothing of the allocator)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorOut}})
    async def readyz() -> Any:
        """Ready to accept jobs: the store answers and the allocator answers."""
        try:
            await run_in_threadpool(state.store.counts_by_state)
        except Exception as exc:
            return error_response("unavailable", f"the job store does not answer ({type(exc).__name__}).",
                                  headers={"Retry-After": "2"})
        try:
            await state.call("backends", timeout=5.0)
        except QAllocError as exc:
            return error_response("unavailable", exc.message, hint=exc.fix, headers={"Retry-After": "2"})
        return {"status": "ready"}

    return app


def _document_live_limits(app: FastAPI, settings: Settings, limits: ApiLimits) -> None:
    """Make the served OpenAPI document state the limits this replica enforces by hand.

    Why by hand and not in the models: the intake limits are settings and the API's own limits
    change live (``ApiLimits.reconfigure``), while a model's constraints are fixed when the
    module is imported. The checks stay where they are (they answer with their own codes,
    `limit_exceeded` and `invalid_job_spec`, naming the setting); the document is rebuilt
    after a reconfigure, so a client or fuzzer reading it sees the bounds in force."""
    build = app.openapi
    built_for = [-1]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None or built_for[0] != limits.changes:
            app.openapi_schema = None
            doc = build()
            intake, api = settings.limits, limits.current
            schemas = doc["components"]["schemas"]
            # a batch answers a job over a limit on its own (its `error`), not with a 422 for all:
            # its items keep the unbounded shape
            schemas["BatchJobIn"] = copy.deepcopy(schemas["JobIn"])
            schemas["BatchJobIn"]["title"] = "BatchJobIn"
            schemas["BatchJobIn"]["description"] = (
                "As JobIn; a job over an intake limit (shots, deadline, circuit size) is refused on its "
                "own in the answer's `jobs[i].error`, and the others go on.")
            schemas["BatchIn"]["properties"]["jobs"]["items"] = {"$ref": "#/components/schemas/BatchJobIn"}
            for model in ("JobIn", "BatchJobIn"):
                _exact_seed_bound(schemas[model]["properties"]["seed"])
            job = schemas["JobIn"]["properties"]
            job["qasm"]["maxLength"] = intake.max_qasm_bytes   # bytes of UTF-8: a bound on characters too
            job["shots"]["maximum"] = intake.max_shots
            for branch in job["deadline_s"].get("anyOf", []):
                if branch.get("type") == "number":
                    branch["maximum"] = intake.max_deadline_s
            _document_estimator_limits(job, intake.max_shots, intake.max_qubits)
            schemas["BatchIn"]["properties"]["jobs"]["maxItems"] = api.max_batch_jobs
            for path, name, bound in (("/v1/jobs", "limit", api.max_page), ("/v1/events", "limit", api.max_page),
                                      ("/v1/jobs/{job_id}/result", "wait", api.max_result_wait_s)):
                for param in doc["paths"].get(path, {}).get("get", {}).get("parameters", []):
                    if param["name"] == name:
                        param["schema"]["maximum"] = bound
            built_for[0] = limits.changes
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _exact_seed_bound(seed: dict[str, Any]) -> None:
    """The seed's maximum as the integer it is. Why: FastAPI's OpenAPI model holds bounds as
    floats, and 2**63-1 as a float is 2**63, a seed the server refuses."""
    for branch in seed.get("anyOf", []):
        if branch.get("type") == "integer":
            branch["minimum"], branch["maximum"] = 0, MAX_SEED


def _document_estimator_limits(job: dict[str, Any], max_shots: int, max_qubits: int) -> None:
    """The estimator fields' intake limits, in JobIn's document (batch items are refused one by one).

    ``precision`` is 0 (exact) or at least the value whose shots per basis fit ``max_shots``; an
    observable has at most ``MAX_OBSERVABLES`` entries and labels of at most ``max_qubits`` letters
    (a label has one letter per circuit qubit)."""
    for branch in job["observables"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = MAX_OBSERVABLES
            branch["items"] = copy.deepcopy(branch["items"])
            branch["items"]["propertyNames"]["maxLength"] = max_qubits
    branches = job["precision"].get("anyOf", [])
    for i, branch in enumerate(branches):
        if branch.get("type") == "number":
            branches[i:i + 1] = [{"type": "number", "const": 0},
                                 {"type": "number", "minimum": smallest_precision(max_shots)}]
            break


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


def _reused(key: str | None, job_id: str) -> QAllocError:
    return IdempotencyKeyReused(f"Idempotency-Key {key!r} was already used for a different job ({job_id}).",
                                field="Idempotency-Key", fix="use a new key for a new job.", job_id=job_id)


def openapi_document() -> str:
    """The OpenAPI document as committed in docs/openapi.json (stable key order)."""
    import json

    from ray_qalloc.config import Settings

    return json.dumps(create_app(Settings(data_dir="/nonexistent")).openapi(), indent=2, sort_keys=True) + "\n"
