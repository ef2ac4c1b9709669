"""BackendActor: one detached Ray actor per backend, wrapping one executor.

Why an actor per backend: it owns the expensive per-backend state (a simulator instance,
a device's noise models, a provider session) and keeps it warm between jobs; Ray restarts
it after a crash (``max_restarts=-1``) while the allocator fails its jobs over elsewhere.

Why detached: an actor dies with its owner. The allocator creates these, and the
allocator itself may crash and restart; detached backends keep running through that, and
the restarted allocator re-attaches to their in-flight runs (``attach``) instead of
running the same circuit twice.

Slots: the actor holds its node's custom resource ``qalloc_backend_<name>`` (one unit per
slot), so Ray places it on a node that offers that backend, and runs at most ``slots``
jobs at once, each in a worker thread so that health checks answer while a circuit runs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from ray_qalloc.backends.base import BackendSpec, Reattachable, RunResult, resource_name

log = logging.getLogger(__name__)

_DONE_KEEP = 4096   # finished results kept for re-attachment by a restarted allocator


class BackendActor:
    """Runs circuits for one backend. Created through ``backend_actor_options``."""

    def __init__(self, backend_name: str, backend_kwargs: dict[str, Any] | None = None,
                 namespace: str = "qalloc", allocator_name: str = "qalloc-allocator") -> None:
        from ray_qalloc.backends.registry import make_backend

        self._backend = make_backend(backend_name, **(backend_kwargs or {}))
        self._spec: BackendSpec = self._backend.spec()
        self._namespace = namespace
        self._allocator_name = allocator_name
        self._pool = ThreadPoolExecutor(max_workers=max(self._spec.slots, 1),
                                        thread_name_prefix=f"qalloc-{self._spec.name}")
        self._runs: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self._done: collections.OrderedDict[tuple[str, int], dict[str, Any]] = collections.OrderedDict()
        self._started_at = time.time()
        self._node_id = ray.get_runtime_context().get_node_id()
        self._resources = dict(ray.get_runtime_context().get_assigned_resources())

    # ---- introspection --------------------------------------------------------------------
    async def spec(self) -> BackendSpec:
        return self._spec

    async def calibration(self) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._backend.calibration)

    async def ping(self) -> dict[str, Any]:
        """Health check: answers while circuits run (they run in worker threads)."""
        return {"name": self._spec.name, "running": len(self._runs), "node_id": self._node_id,
                "pid": os.getpid(), "started_at": self._started_at}

    # ---- running --------------------------------------------------------------------------
    async def run(self, job_id: str, attempt: int, payload: bytes, shots: int,
                  seed: int | None = None) -> dict[str, Any]:
        """Run one attempt of a job; the same (job, attempt) twice returns the same run."""
        key = (job_id, attempt)
        if key in self._done:
            return self._done[key]
        if key in self._runs:
            return await asyncio.shield(self._runs[key])
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.run_in_executor(
            self._pool, self._run_sync, job_id, attempt, payload, shots, seed)
        self._runs[key] = fut
        fut.add_done_callback(lambda f: self._finished(key, f))
        return await asyncio.shield(fut)

    def _finished(self, key: tuple[str, int], fut: asyncio.Future[dict[str, Any]]) -> None:
        self._runs.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self._remember(key, fut.result())

    async def attach(self, job_id: str, attempt: int) -> dict[str, Any] | None:
        """A restarted allocator asks for a run it started before it crashed.

        Returns the result (waiting if still running), or None if this actor never saw the
        attempt (it was restarted itself, or the dispatch never arrived).
        """
        key = (job_id, attempt)
        if key in self._done:
            return self._done[key]
        fut = self._runs.get(key)
        if fut is None:
            return None
        return await asyncio.shield(fut)

    async def reattach(self, job_id: str, attempt: int, provider_job_id: str, shots: int) -> dict[str, Any]:
        """Wait again on a provider job (QPU): never submit a paid job twice."""
        if not isinstance(self._backend, Reattachable):
            raise RuntimeError(f"backend {self._spec.name} cannot re-attach to provider jobs")
        loop = asyncio.get_running_loop()
        res: RunResult = await loop.run_in_executor(self._pool, self._backend.reattach, provider_job_id, shots)
        out = self._with_context(res)
        self._remember((job_id, attempt), out)
        return out

    def _remember(self, key: tuple[str, int], result: dict[str, Any]) -> None:
        self._done[key] = result
        while len(self._done) > _DONE_KEEP:
            self._done.popitem(last=False)

    def _run_sync(self, job_id: str, attempt: int, payload: bytes, shots: int,
                  seed: int | None) -> dict[str, Any]:
        from ray_qalloc.circuits import decode_payload

        received = time.time()
        circuit = decode_payload(payload)

        def submitted(provider_job_id: str) -> None:
            # Stored before waiting, so a restarted actor re-attaches instead of paying twice.
            alloc = ray.get_actor(self._allocator_name, namespace=self._namespace)
            ray.get(alloc.record_provider_job.remote(job_id, attempt, provider_job_id), timeout=60)

        res = self._backend.run(circuit, shots, seed=seed, on_submitted=submitted)
        res.metadata["received_at"] = received
        res.metadata["finished_at"] = time.time()
        return self._with_context(res)

    def _with_context(self, res: RunResult) -> dict[str, Any]:
        out = res.to_dict()
        meta = out.setdefault("metadata", {})
        meta["node_id"] = self._node_id
        meta["pid"] = os.getpid()
        meta["resources"] = self._resources
        return out


def backend_actor_options(spec: BackendSpec, namespace: str, *, use_resource: bool = True) -> dict[str, Any]:
    """Ray options for a backend's actor: detached, named, restarted forever, holding its slots."""
    opts: dict[str, Any] = {
        "name": actor_name(spec.name), "namespace": namespace, "lifetime": "detached",
        "get_if_exists": True, "max_restarts": -1, "max_task_retries": 0, "num_cpus": 0,
        "max_concurrency": 1000,
    }
    if use_resource:
        opts["resources"] = {resource_name(spec.name): float(spec.slots)}
    return opts


def actor_name(backend_name: str) -> str:
    return f"qalloc-backend-{backend_name}"


RemoteBackendActor = ray.remote(BackendActor)
