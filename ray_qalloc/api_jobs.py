"""The jobs routes: submit one or a batch, list, read, wait for the result, cancel, explain.

Why a router of its own: the job path's HTTP side — intake on the replica (validation and
limits before quotas), the tenant's quota, then one allocator call per request or batch — is
one concern, apart from the pool's, the tenants' and the operators' routes. ``create_app``
mounts it with its auth dependency.

Intake (parsing QASM) runs on the replica's event-loop thread, not in a thread pool ("intake
on the loop" below): in a Serve replica, Qiskit's OpenQASM 2 parser crashed the process
(SIGSEGV in its allocator) when called from an anyio worker thread. Parsing a job takes well
under a millisecond; more throughput comes from more replicas.
"""

import dataclasses
from typing import Annotated, Any, Callable

from fastapi import Depends, FastAPI, Header, Path, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ray_qalloc.api_errors import ErrorDetail, ErrorOut, error_response
from ray_qalloc.api_models import (BatchIn, BatchItem, BatchOut, JobAccepted, JobIn, JobOut, JobPage, Pending,
                                   ResultOut)
from ray_qalloc.api_state import AppState
from ray_qalloc.backends.pools import resolve_allowed
from ray_qalloc.exceptions import (Conflict, Forbidden, IdempotencyKeyReused, JobNotFound, LimitExceeded,
                                   QAllocError)
from ray_qalloc.jobs import JobState, PreparedJob, make_spec, prepare_job
from ray_qalloc.tenants import Principal

JobId = Annotated[str, Path(max_length=64, description="A job id as returned by POST /v1/jobs.")]


def add_job_routes(app: FastAPI, state: AppState, principal: Callable[..., Any]) -> None:
    """``principal`` is the auth dependency: the caller's ``Principal`` (its tenant owns the jobs).
    Intake first, then the reads: the order the routes (and the OpenAPI document) list them."""
    add_intake_routes(app, state, principal)
    add_read_routes(app, state, principal)


def add_intake_routes(app: FastAPI, state: AppState, principal: Callable[..., Any]) -> None:
    """``POST /v1/jobs`` and ``POST /v1/jobs:batch``: validation and intake on the replica."""
    settings = state.settings
    limits = state.api   # Serve's user_config replaces it live (ApiLimits.reconfigure)
    Caller = Annotated[Principal, Depends(principal)]

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


def add_read_routes(app: FastAPI, state: AppState, principal: Callable[..., Any]) -> None:
    """Listing, status, results, cancel and explain — each on the caller's own jobs only."""
    limits = state.api
    Caller = Annotated[Principal, Depends(principal)]

    def own(p: Principal, job_id: str) -> Any:
        rec = state.store.get(job_id)
        if rec.tenant != p.tenant:   # another tenant's job does not exist for this caller
            raise JobNotFound(f"no job with id {job_id!r}.", field="job_id")
        return rec

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


def _reused(key: str | None, job_id: str) -> QAllocError:
    return IdempotencyKeyReused(f"Idempotency-Key {key!r} was already used for a different job ({job_id}).",
                                field="Idempotency-Key", fix="use a new key for a new job.", job_id=job_id)


__all__ = ["JobId", "add_job_routes", "add_intake_routes", "add_read_routes"]
