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

Why a stop never uses ``ray.cancel(force=True)`` (measured with Ray 2.60, docs/notes.md): a
force-cancel makes the worker *start* exiting; a run that finishes in that window (a lost hedge
or a probe of a small circuit is often stopped as it finishes) still returns its result, the
pool actor — the owner — then reuses the leased worker for the next queued run of the same
scheduling class, and that innocent run dies with the worker (``WorkerCrashedError``). So every
run passes a **run gate** (``RunGate``): a per-run file on the node, locked with ``flock``, that
the task marks ``started`` before it simulates and ``done`` before it returns. A stop takes the
same lock and decides on what it reads:

* not started (queued in the owner, queued in a worker, or not past its gate yet): marked
  ``stopped`` and cancelled with ``force=False`` — Ray drops it from its queue, or interrupts it
  before the gate, or the task sees ``stopped`` at its gate and returns at once; nothing is
  killed;
* started: its own worker is sent SIGKILL *while the stop holds the lock*, so the run cannot
  reach ``done`` and return a result in between: the worker dies with its run and never serves
  another (its lease ends in an error, so neither the owner nor the raylet hands it out again),
  and the core is free at once;
* done: left alone; its result is on its way.

Why not give each run a scheduling class of its own instead (so the owner never queues a run
behind another's worker): Ray derives the class from the function, the resource shape, the
scheduling strategy and the runtime_env, and interns every class for the life of the process; a
class per run means a unique function or resource shape per run (an unbounded table, a function
export per run) or a runtime_env per run (a worker pool per run). And it would only narrow the
race: the lease of a worker that is exiting goes back to the raylet, which may grant it again
(a possibility read from Ray's lease protocol, not measured).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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
                seed: int | None, name: str, gate: str | None = None) -> dict[str, Any]:
    """One simulation in a task's worker process (the body of the Ray task).

    A job's own run options (``ray_qalloc.runopts``) come first: its seed replaces the
    allocator's, and an estimator job gets exact expectation values instead of counts. ``gate``
    is the run's ``RunGate`` path: the run says there when it starts and ends, so a stop kills
    this worker only while this run holds it (module docstring)."""
    from ray_qalloc.circuits import decode_payload
    from ray_qalloc.runopts import split_payload

    received = time.time()
    with run_gate(gate):
        inner, options = split_payload(payload)
        if options.seed is not None:
            seed = options.seed
        backend = _backend(method, threads, memory_bytes)
        circuit = _decoded(inner, decode_payload)
        res = (backend.estimate(circuit, options, seed=seed) if options.estimator
               else backend.run(circuit, shots, seed=seed))
    res.backend = name
    out = result_dict(res)
    ctx = ray.get_runtime_context()
    out["metadata"].update(received_at=received, finished_at=time.time(), pid=os.getpid(), node_id=_node_id(ctx),
                           threads=threads, resources=dict(ctx.get_assigned_resources()))
    return out


# Circuits decoded in this worker, by payload: a circuit sent again (the same job's next attempt,
# a hedge, a benchmark, a sweep's repeated point) skips QPY decoding (0.03 ms for a Bell pair,
# 0.26 ms for 160 gates, 0.8 ms for 280). Nothing downstream changes a circuit in place
# (``prepare`` and ``unmeasured`` copy, Aer compiles a copy), so one object serves every run.
_DECODED: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
_DECODED_KEEP = 32                 # circuits per worker process
_DECODED_MAX_PAYLOAD = 1 << 20     # larger payloads are decoded every time (memory over speed)
_NODE_ID: str | None = None


def _decoded(inner: bytes, decode: Any) -> Any:
    """The circuit of ``inner``, decoded once per worker while it stays among the last few."""
    circuit = _DECODED.get(inner)
    if circuit is not None:
        _DECODED.move_to_end(inner)
        return circuit
    circuit = decode(inner)
    if len(inner) <= _DECODED_MAX_PAYLOAD:
        _DECODED[inner] = circuit
        while len(_DECODED) > _DECODED_KEEP:
            _DECODED.popitem(last=False)
    return circuit


def _node_id(ctx: Any) -> str:
    """This worker's node: fixed for the life of the process, asked of Ray once."""
    global _NODE_ID
    if _NODE_ID is None:
        _NODE_ID = ctx.get_node_id()
    return _NODE_ID


def result_dict(res: Any) -> dict[str, Any]:
    """``RunResult.to_dict()`` without its deep copy: ``dataclasses.asdict`` copies the counts
    value by value (0.6 ms for 10 qubits at 1024 shots, 2 ms for 14), but every value here was
    made by this run and is not shared, so a shallow dict (and a metadata dict of its own, which
    the caller extends) is the same thing."""
    import dataclasses

    out = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}
    out["metadata"] = dict(out.get("metadata") or {})
    return out


# ---- the run gate: stop a run without touching another run's worker -----------------------------
_GATE_PREFIX = "qalloc-gates-"
_STATE_BYTES = 64
_STARTED, _DONE, _STOPPED, _KILLED = b"started", b"done", b"stopped", b"killed"
_SELF: tuple[int, float] | None = None   # this process's (pid, start time), read once per worker


def _self_identity() -> tuple[int, float]:
    """(pid, process start time): the start time tells a stop that the pid still names this
    process and not a later one that reused the number."""
    global _SELF
    if _SELF is None or _SELF[0] != os.getpid():
        import psutil

        _SELF = (os.getpid(), psutil.Process().create_time())
    return _SELF


@contextmanager
def _locked(path: str) -> Iterator[int]:
    """The run's state file, open and exclusively locked. Every holder keeps the lock for one
    read and one write (microseconds), so a blocking ``flock`` costs the pool actor's loop nothing
    worth awaiting; the kernel drops the lock with the descriptor, also when its holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _read_state(fd: int) -> list[bytes]:
    return os.pread(fd, _STATE_BYTES, 0).split()


def _write_state(fd: int, *words: bytes) -> None:
    os.pwrite(fd, b" ".join(words).ljust(_STATE_BYTES), 0)


@contextmanager
def run_gate(path: str | None) -> Iterator[None]:
    """Task side of the gate: ``started`` (with this worker's pid) before the simulation,
    ``done`` after it — also when it raised, so a stop never kills a worker that is only
    reporting an error. A run stopped before it got here returns at once (``RunStopped``)."""
    if not path:
        yield
        return
    pid, born = _self_identity()
    with _locked(path) as fd:
        state = _read_state(fd)
        if state and state[0] in (_STOPPED, _KILLED):
            raise RunStopped("this run was stopped before it started.",
                             fix="nothing to do: it was stopped on purpose.")
        _write_state(fd, _STARTED, str(pid).encode(), repr(born).encode())
    try:
        yield
    finally:
        with _locked(path) as fd:
            _write_state(fd, _DONE)


def stop_gated(path: str) -> str:
    """Stop side of the gate: what the run was doing, and what was done about it, in one locked
    step. ``"not_started"``: marked stopped (the caller cancels the task without force);
    ``"killed"``: its worker got SIGKILL while the run was still inside the gate, so it cannot
    have returned a result, nor can its worker have been handed another run; ``"done"``: it
    finished, nothing to do; ``"stopped"``: an earlier stop already did it; ``"gone"``: its
    process had died by itself (the task fails on its own)."""
    import psutil

    with _locked(path) as fd:
        state = _read_state(fd)
        if not state:
            _write_state(fd, _STOPPED)
            return "not_started"
        head = state[0]
        if head == _DONE:
            return "done"
        if head in (_STOPPED, _KILLED):
            return "stopped"
        try:
            pid, born = int(state[1]), float(state[2])
        except (IndexError, ValueError):   # not written by run_gate: leave it alone
            return "gone"
        try:
            if abs(psutil.Process(pid).create_time() - born) > 1e-3:
                return "gone"
            os.kill(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            return "gone"
        _write_state(fd, _KILLED)
        return "killed"


def gate_root() -> Path:
    """Where this pool actor keeps its runs' state files: node-local memory (``/dev/shm``) where
    there is some, else the temp dir. Directories left by pool actors that died are removed."""
    base = Path("/dev/shm")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        base = Path(tempfile.gettempdir())
    for old in base.glob(f"{_GATE_PREFIX}*"):
        try:
            owner = int(old.name[len(_GATE_PREFIX):].split("-", 1)[0])
            os.kill(owner, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except OSError:           # EPERM: alive, someone else's
            continue
    return Path(tempfile.mkdtemp(prefix=f"{_GATE_PREFIX}{os.getpid()}-", dir=base))


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
        self._init_gates()
        from ray_qalloc.monitor.node import NodeSampler

        self._sampler = NodeSampler()   # what the node really has free: other work on it counts
        self._warm: list[ray.ObjectRef] = []
        if warm_methods:   # one warm-up task per core: each starts (and keeps) a warm worker
            self._warm = [self._task(_warm_task, 1, "qalloc-warm-up").remote(tuple(warm_methods), self._per_run(1))
                          for _ in range(max(int(self._cores), 1))]

    def _init_gates(self) -> None:
        """Each run's gate file (``RunGate``), by (job, attempt); a fresh name per submission."""
        self._gate_dir = gate_root()
        self._gates: dict[tuple[str, int], str] = {}
        self._gate_seq = 0

    def _new_gate(self, key: tuple[str, int]) -> str:
        self._gate_seq += 1
        path = f"{self._gate_dir}/{self._gate_seq}"
        self._gates[key] = path
        return path

    def _drop_gate(self, key: tuple[str, int]) -> None:
        path = self._gates.pop(key, None)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

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
                method, threads, self._per_run(threads), payload, shots, seed, name or f"{self._pool}/{method}",
                self._new_gate(key))
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
                self._drop_gate(key)
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
        """Stop a run now, for every reason there is (cancel, a lost hedge, a probe giving its core
        back, preemption, restart), through its gate (module docstring): a run that has not
        started is cancelled without force, which kills nothing; a started run's own worker is
        killed, which frees its cores at once and cannot take another run's worker with it.
        False when the run is not (or no longer) running here, or had already finished."""
        key = (job_id, attempt)
        ref = self._runs.get(key)
        if ref is None:
            return False
        gate = self._gates.get(key)
        outcome = stop_gated(gate) if gate is not None else "not_started"
        if outcome == "done":
            return False
        self._stopped.add(key)
        if outcome == "not_started":
            # queued in the owner or in a worker: dropped from the queue; running but not past
            # its gate yet: interrupted there, or it reads "stopped" at the gate and returns
            ray.cancel(ref, force=False)
        return True

    async def running(self) -> list[tuple[str, int]]:
        return list(self._runs)

    async def run_state(self, job_id: str, attempt: int) -> str | None:
        """Where a run stands at its gate: ``queued`` (not started), ``started``, ``done``,
        ``stopped`` or ``killed``; None when this actor does not hold the run."""
        gate = self._gates.get((job_id, attempt))
        if gate is None:
            return None
        try:
            with _locked(gate) as fd:
                state = _read_state(fd)
        except OSError:
            return None
        return state[0].decode() if state else "queued"


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
