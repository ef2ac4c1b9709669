"""Health and readiness: ``/healthz`` (this replica is up) and ``/readyz`` (it can accept jobs).

Why a router of its own: probes from a load balancer or Kubernetes need no token and must say
only what they check — the replica, then the job store and the allocator — with a
``Retry-After`` when something does not answer.
"""

from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ray_qalloc.api_errors import ErrorOut, error_response
from ray_qalloc.api_state import AppState
from ray_qalloc.exceptions import QAllocError


def add_health_routes(app: FastAPI, state: AppState) -> None:
    """No auth: a probe (a load balancer, Kubernetes) holds no token."""

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


__all__ = ["add_health_routes"]
