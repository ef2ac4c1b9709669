"""GpuPoolActor: one detached actor per GPU node; its runs are Ray tasks holding ``num_gpus``.

The CPU pool's shape (``pool_actor.PoolActor``: detached, named, restarted forever, pinned to
its node, runs as stoppable tasks it owns, re-attachment by (job, attempt)), with GPUs where
the CPU pool has cores:

* its budget is the node's GPUs — those NVML reports *and* Ray offers (``ray start
  --num-gpus`` may give Ray fewer) —, and a run holds the GPUs it uses (``num_gpus`` = 1, or
  all of them for a statevector split over several): Ray sets ``CUDA_VISIBLE_DEVICES`` for it,
  and other GPU work on the cluster sees the truth;
* a run holds no CPU (``num_cpus=0``, as the pool actor itself): the GPU pool's scheduler
  budget counts GPUs, and a run that also waited for a core the CPU pool holds would leave
  its GPU idle behind work the GPU pool cannot see;
* memory limits come from the GPU's own memory (``gpu_probe.per_gpu_budget_bytes``), and every
  ping reports NVML's reading (use, memory) through the node sampler, so placement waits when
  another process holds a GPU's memory and the monitor shows each GPU;
* it offers only the methods an installed engine can run (``methods`` in the ping).

GPU presence, memory and engines come from a ``GpuProbe``: NVML on a real node, a
``StaticProbe`` passed as a constructor argument in tests (it pickles, and Ray replays it on
restart).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_qalloc.backends.gpu_probe import GpuProbe, default_probe, free_gpu_bytes, per_gpu_budget_bytes, visible
from ray_qalloc.backends.pool_actor import PoolActor, result_dict, run_gate
from ray_qalloc.backends.pools import GPU_METHODS, POOL_RESOURCE_GPU

_SIMS: dict[tuple[str, int, int], Any] = {}


def gpu_methods_for(engines: frozenset[str]) -> tuple[str, ...]:
    """GPU methods an installed engine runs: statevector on cuStateVec or Aer's CUDA build,
    tensor networks on cuTensorNet."""
    out = []
    if engines & {"custatevec", "aer_gpu"}:
        out.append("statevector")
    if "cutensornet" in engines:
        out.append("tensor_network")
    return tuple(m for m in GPU_METHODS if m in out)


def _backend(method: str, gpus: int, memory_bytes: int, name: str, engines: frozenset[str]) -> Any:
    key = (method, gpus, memory_bytes)
    sim = _SIMS.get(key)
    if sim is None:
        from ray_qalloc.backends.gpu import GpuBackend

        sim = GpuBackend(method, gpus=gpus, memory_bytes=memory_bytes, name=name, engines=engines)
        sim.warm_up()      # CUDA context and first kernels: not part of the first job's timed run
        _SIMS[key] = sim
    return sim


def run_gpu_variant(method: str, gpus: int, memory_bytes: int, payload: bytes, shots: int,
                    seed: int | None, name: str, engines: frozenset[str], gate: str | None = None) -> dict[str, Any]:
    """One GPU simulation in a task's worker process (the body of the Ray task). ``gate``: the
    run's gate, as for a CPU run (``pool_actor.run_gate``): a stop kills this worker only while
    this run holds it."""
    from ray_qalloc.circuits import decode_payload
    from ray_qalloc.runopts import split_payload

    received = time.time()
    with run_gate(gate):
        inner, options = split_payload(payload)
        if options.seed is not None:
            seed = options.seed
        backend = _backend(method, gpus, memory_bytes, name, engines)
        circuit = decode_payload(inner)
        res = (backend.estimate(circuit, options, seed=seed) if options.estimator
               else backend.run(circuit, shots, seed=seed))
    res.backend = name
    out = result_dict(res)
    meta = out["metadata"]
    ctx = ray.get_runtime_context()
    meta.update(received_at=received, finished_at=time.time(), pid=os.getpid(), node_id=ctx.get_node_id(),
                threads=gpus, gpu_ids=[str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
                resources=dict(ctx.get_assigned_resources()))
    return out


_gpu_run_task = ray.remote(max_retries=0)(run_gpu_variant)


class GpuPoolActor(PoolActor):
    """Runs the GPU simulations of one node. Created through ``gpu_pool_actor_options``."""

    def __init__(self, pool: str, node_id: str, warm_methods: tuple[str, ...] = (),
                 probe: GpuProbe | None = None) -> None:
        from ray_qalloc.monitor.node import NodeSampler

        self._pool = pool
        self._node_id = node_id
        self._probe = probe or default_probe()
        devices = visible(self._probe.devices(), _node_gpus(node_id))
        self._engines = frozenset(self._probe.engines())
        self._methods = gpu_methods_for(self._engines)
        self._cores = float(len(devices))                      # the pool's budget: its GPUs
        self._memory_bytes = per_gpu_budget_bytes(devices) if self._methods else 0
        self._runs: dict[tuple[str, int], ray.ObjectRef] = {}
        self._stopped: set[tuple[str, int]] = set()
        self._done: collections.OrderedDict[tuple[str, int], dict[str, Any]] = collections.OrderedDict()
        self._started_at = time.time()
        self._init_gates()                                     # stops go through run gates, as on CPU
        self._sampler = NodeSampler(gpus=self._probe.devices)   # the same source as the budget
        self._warm: list[ray.ObjectRef] = []   # a GPU worker warms on its first run (CUDA context)

    def _task(self, fn: Any, threads: int, name: str) -> Any:
        return fn.options(num_gpus=threads, num_cpus=0, name=name,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(self._node_id, soft=False))

    def _per_run(self, threads: int) -> int:
        """One GPU's budget per GPU held (a statevector over k GPUs has k shares)."""
        return int(self._memory_bytes * max(threads, 1))

    async def ping(self) -> dict[str, Any]:
        out = await super().ping()
        devices = visible(self._probe.devices(), self._cores)
        out.update(kind="gpu", methods=list(self._methods), engines=sorted(self._engines),
                   gpus=[d.to_dict() for d in devices], gpu_free_bytes=free_gpu_bytes(devices))
        return out

    async def run(self, job_id: str, attempt: int, payload: bytes, shots: int, seed: int | None = None, *,
                  method: str, threads: int = 1, name: str = "") -> dict[str, Any]:
        """Run one attempt on ``threads`` GPUs; the same (job, attempt) twice waits on the same run."""
        key = (job_id, attempt)
        if key in self._done:
            return self._done[key]
        ref = self._runs.get(key)
        if ref is None:
            gpus = max(int(threads), 1)
            ref = self._task(_gpu_run_task, gpus, f"qalloc-gpu-run {job_id}#{attempt}").remote(
                method, gpus, self._per_run(gpus), payload, shots, seed, name or f"{self._pool}/{method}",
                self._engines, self._new_gate(key))
            self._runs[key] = ref
        return await self._wait(key, ref)


def _node_gpus(node_id: str) -> float:
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return float(node.get("Resources", {}).get("GPU", 0.0))
    return 0.0


def gpu_pool_actor_options(pool: str, node_id: str, namespace: str, *, use_resource: bool = True) -> dict[str, Any]:
    """Detached, named, restarted forever, pinned to its node; holds the node's ``qalloc_pool_gpu``."""
    from ray_qalloc.backends.pool_actor import pool_actor_name

    opts: dict[str, Any] = {
        "name": pool_actor_name(pool), "namespace": namespace, "lifetime": "detached", "get_if_exists": True,
        "max_restarts": -1, "max_task_retries": 0, "num_cpus": 0, "max_concurrency": 10_000,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }
    if use_resource:
        opts["resources"] = {POOL_RESOURCE_GPU: 1.0}
    return opts


def offers_gpu_pool(resources: dict[str, float], declared: bool) -> bool:
    """A node gets a GPU pool when it offers ``qalloc_pool_gpu`` (a cluster that declares qalloc
    resources), or any Ray GPU (a plain cluster: an HPC centre's Ray job)."""
    if declared:
        return resources.get(POOL_RESOURCE_GPU, 0.0) >= 1.0
    return resources.get("GPU", 0.0) > 0


RemoteGpuPoolActor = ray.remote(GpuPoolActor)
