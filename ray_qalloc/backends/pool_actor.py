"""PoolActor: one detached actor per node that runs simulator jobs as Ray tasks.

Why tasks and not threads of a long-lived actor: a run must be stoppable. Aer cannot be
interrupted inside ``run()``, so a run in a thread keeps its core until Aer returns; a run
in a Ray task is stopped by killing its worker (``ray.cancel(force=True)``), which frees the
core at once — for a cancel, a hedge that lost, or a preemption.

Why every task holds ``num_cpus=threads``: Ray, the autoscaler and other work on the node
see what simulations really use (the old per-method actors held ``num_cpus=0``).

Why the actor owns the tasks: a task dies with its owner. The allocator may crash and
restart; the pool actor is detached and keeps the refs of in-flight runs, so a restarted
allocator re-attaches (``attach``) instead of running the same circuit twice. When the pool
actor itself dies, its runs die with it and the allocator fails them over (a simulation is
idempotent).

Each task is pinned to the pool's node (hard node affinity): memory is measured there, and
that is where placement believed the run would go.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_qalloc.backends.pools import POOL_RESOURCE_CPU
from ray_qalloc.exceptions import BackendError

log = logging.getLogger(__name__)

_DONE_KEEP = 4096            # finished results kept for re-attachment by a restarted allocator
_MEMORY_FRACTION = 0.5       # of the memory available on the node, for all runs together

# Simulators built in this worker process, reused by later tasks on the same worker.
_SIMS: dict[tuple[str, int, int], Any] = {}


class RunStopped(BackendError):
    """The run was stopped on purpose (cancel, lost hedge, preemption): not a backend failure."""


def _backend(method: str, threads: int, memory_bytes: int) -> Any:
    key = (method, threads, memory_bytes)
    sim = _SIMS.get(key)
    if sim is None:
        from ray_qalloc.backends.aer import AerBackend

        sim = AerBackend(method, threads=threads, memory_bytes=memory_bytes, name=f"aer_{method}")
        # first-use costs (simulator, pass manager, the method's first run) are paid here, not
        # inside the first job's timed run: a cold worker's 0.5-1 s must not be learned as the
        # circuit's runtime (run memory and the online correction read wall_s)
        sim.warm_up()
        _SIMS[key] = sim
    return sim


def run_variant(method: str, threads: int, memory_bytes: int, payload: bytes, shots: int,
                seed: int | None, name: str) -> dict[str, Any]:
    """One simulation in a task's worker process (the body of the Ray task).

    A job's own run options (``ray_qalloc.runopts``) come first: its seed replaces the
    allocator's, and an estimator job gets exact expectation values instead of counts."""
    from ray_qalloc.circuits import decode_payload
    from ray_qalloc.runopts import split_payload

    received = time.time()
    inner, options = split_payload(payload)
    if options.seed is not None:
        seed = options.seed
    backend = _backend(method, threads, memory_bytes)
    circuit = decode_payload(inner)
    res = backend.estimate(circuit, options, seed=seed) if options.estimator else backend.run(circuit, shots, seed=seed)
    res.backend = name
    out = res.to_dict()
    meta = out.setdefault("metadata", {})
    meta.update(received_at=received, finished_at=time.time(), pid=os.getpid(),
                node_id=ray.get_runtime_context().get_node_id(), threads=threads,
                resources=dict(ray.get_runtime_context().get_assigned_resources()))
    return out


def warm(methods: tuple[str, ...], memory_bytes: int) -> int:
    """Import Qiskit and Aer and run a Bell pair per method, so no job pays first-use costs."""
    from ray_qalloc.backends.pools import GPU_ONLY_METHODS

    for m in methods:
        if m in GPU_ONLY_METHODS:        # run by GPU pools only (backends.gpu_pool_actor)
            continue
        _backend(m, 1, memory_bytes)     # built and warmed in this worker
    return os.getpid()


_run_task = ray.remote(max_retries=0)(run_variant)
_warm_task = ray.remote(max_retries=0)(warm)


class PoolActor:
    """Runs the simulations of one node's pool. Created through ``pool_actor_options``."""

    def __init__(self, pool: str, node_id: str, warm_methods: tuple[str, ...] = ()) -> None:
        import psutil

        self._pool = pool
        self._node_id = node_id
        here = ray.get_runtime_context().get_node_id()
        if here != node_id:  # hard affinity makes this impossible; say so loudly if it happens
            log.error("pool %s expected node %s, runs on %s", pool, node_id, here)
        self._cores = float(_node_cpus(node_id))
        self._memory_bytes = int(psutil.virtual_memory().available * _MEMORY_FRACTION)
        self._runs: dict[tuple[str, int], ray.ObjectRef] = {}
        self._stopped: set[tuple[str, int]] = set()
        self._done: collections.OrderedDict[tuple[str, int], dict[str, Any]] = collections.OrderedDict()
        self._started_at = time.time()
        from ray_qalloc.monitor.node import NodeSampler

        self._sampler = NodeSampler()   # what the node really has free: other work on it counts
        self._warm: list[ray.ObjectRef] = []
        if warm_methods:   # one warm-up task per core: each starts (and keeps) a warm worker
            self._warm = [self._task(_warm_task, 1, "qalloc-warm-up").remote(tuple(warm_methods), self._per_run(1))
                          for _ in range(max(int(self._cores), 1))]

    def _task(self, fn: Any, threads: int, name: str) -> Any:
        return fn.options(num_cpus=threads, name=name,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(self._node_id, soft=False))

    def _per_run(self, threads: int) -> int:
        """A run's memory budget: its share of the pool's, by the cores it holds (a run that needs
        the whole node's memory must also take the whole node's cores)."""
        return int(self._memory_bytes * min(max(threads, 1) / max(self._cores, 1.0), 1.0))

    # ---- introspection --------------------------------------------------------------------
    async def ping(self) -> dict[str, Any]:
        """Health check, and what placement needs to know of the node."""
        try:
            node = self._sampler.sample().to_dict()
        except Exception:  # noqa: BLE001 - a failed reading must not fail the health check
            node = None
        return {"name": self._pool, "node_id": self._node_id, "pid": os.getpid(), "running": len(self._runs),
                "cores": self._cores, "memory_bytes": self._memory_bytes, "started_at": self._started_at,
                "node": node}

    async def warmed(self, timeout_s: float = 60.0) -> bool:
        """Wait for the warm-up tasks (the allocator's first probe waits for this on a fresh start)."""
        if not self._warm:
            return True
        done, _ = await asyncio.wait([asyncio.ensure_future(_await(r)) for r in self._warm], timeout=timeout_s)
        ok = len(done) == len(self._warm)
        if ok:
            self._warm = []
        return ok

    async def calibration(self) -> None:
        return None

    # ---- running --------------------------------------------------------------------------
    async def run(self, job_id: str, attempt: int, payload: bytes, shots: int, seed: int | None = None, *,
                  method: str, threads: int = 1, name: str = "") -> dict[str, Any]:
        """Run one attempt of a job; the same (job, attempt) twice waits on the same run."""
        key = (job_id, attempt)
        if key in self._done:
            return self._done[key]
        ref = self._runs.get(key)
        if ref is None:
            threads = max(int(threads), 1)
            ref = self._task(_run_task, threads, f"qalloc-run {job_id}#{attempt}").remote(
                method, threads, self._per_run(threads), payload, shots, seed, name or f"{self._pool}/{method}")
            self._runs[key] = ref
        return await self._wait(key, ref)

    async def _wait(self, key: tuple[str, int], ref: ray.ObjectRef) -> dict[str, Any]:
        try:
            out = await ref
        except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError) as exc:
            if key in self._stopped:
                raise RunStopped(f"run {key[0]}#{key[1]} on pool {self._pool} was stopped.",
                                 fix="nothing to do: it was stopped on purpose.") from None
            raise BackendError(f"the run's worker on pool {self._pool} died: {type(exc).__name__}",
                               fix="the allocator places the job again.") from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BackendError):
                raise cause from None
            raise
        finally:
            if self._runs.get(key) is ref:
                self._runs.pop(key, None)
        self._done[key] = out
        while len(self._done) > _DONE_KEEP:
            self._done.popitem(last=False)
        self._stopped.discard(key)
        return out

    async def attach(self, job_id: str, attempt: int) -> dict[str, Any] | None:
        """A restarted allocator asks for a run it started before it crashed: the result (waiting
        if still running), or None if this actor never saw the attempt."""
        key = (job_id, attempt)
        if key in self._done:
            return self._done[key]
        ref = self._runs.get(key)
        return None if ref is None else await self._wait(key, ref)

    async def stop(self, job_id: str, attempt: int) -> bool:
        """Stop a run now: its worker is killed and its cores are free at once. False when the
        run is not (or no longer) running here."""
        key = (job_id, attempt)
        ref = self._runs.get(key)
        if ref is None:
            return False
        self._stopped.add(key)
        ray.cancel(ref, force=True)
        return True

    async def running(self) -> list[tuple[str, int]]:
        return list(self._runs)


async def _await(ref: ray.ObjectRef) -> Any:
    return await ref


def _node_cpus(node_id: str) -> float:
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return float(node.get("Resources", {}).get("CPU", 1.0))
    return 1.0


def pool_actor_name(pool: str) -> str:
    return f"qalloc-pool-{pool}"


def pool_actor_options(pool: str, node_id: str, namespace: str, *, use_resource: bool = True) -> dict[str, Any]:
    """Detached, named, restarted forever, pinned to its node; holds the node's pool resource."""
    opts: dict[str, Any] = {
        "name": pool_actor_name(pool), "namespace": namespace, "lifetime": "detached", "get_if_exists": True,
        "max_restarts": -1, "max_task_retries": 0, "num_cpus": 0, "max_concurrency": 10_000,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }
    if use_resource:
        opts["resources"] = {POOL_RESOURCE_CPU: 1.0}
    return opts


RemotePoolActor = ray.remote(PoolActor)
