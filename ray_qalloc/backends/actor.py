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
jobs at once, each on its own actor thread so that health checks answer while a circuit runs.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import threading
from typing import Any

import ray

from ray_qalloc.backends.base import BackendSpec, ProviderStatus, Reattachable, RunResult, resource_name

log = logging.getLogger(__name__)

_DONE_KEEP = 4096   # finished results kept for re-attachment by a restarted allocator


class _Run:
    """One attempt in flight: waited on by ``run`` and by a re-attaching allocator."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def wait(self) -> dict[str, Any]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class BackendActor:
    """Runs circuits for one backend. Created through ``backend_actor_options``.

    A threaded actor (``max_concurrency`` = slots + spare threads): each run executes on its
    own Ray worker thread, with no hand-off, while pings and re-attachments answer on the
    spare threads.
    """

    def __init__(self, backend_name: str, backend_kwargs: dict[str, Any] | None = None,
                 namespace: str = "qalloc", allocator_name: str = "qalloc-allocator") -> None:
        from ray_qalloc.backends.registry import make_backend

        self._backend = make_backend(backend_name, **(backend_kwargs or {}))
        self._spec: BackendSpec = self._backend.spec()
        warm = getattr(self._backend, "warm_up", None)
        if warm is not None:  # first-use costs are paid at start-up, not by the first job
            warm()
        self._namespace = namespace
        self._allocator_name = allocator_name
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(self._spec.slots, 1))
        self._runs: dict[tuple[str, int], _Run] = {}
        self._done: collections.OrderedDict[tuple[str, int], dict[str, Any]] = collections.OrderedDict()
        self._started_at = time.time()
        self._node_id = ray.get_runtime_context().get_node_id()
        self._resources = dict(ray.get_runtime_context().get_assigned_resources())
        self._provider: ProviderStatus | None = None
        self._provider_reader: threading.Thread | None = None

    # ---- introspection --------------------------------------------------------------------
    def spec(self) -> BackendSpec:
        return self._spec

    def calibration(self) -> Any:
        return self._backend.calibration()

    def calibration_if_newer(self, taken_at: float | None) -> Any:
        """The calibration when it is newer than ``taken_at``, else None: the allocator polls
        often and providers publish rarely, so most polls carry a few bytes, not the device."""
        cal = self._backend.calibration()
        if cal is None or (taken_at is not None and float(cal.taken_at) <= float(taken_at)):
            return None
        return cal

    def qubit_gate_errors(self) -> dict[str, tuple[float, ...]] | None:
        """Per-qubit single-qubit gate errors where the backend knows them (None: it does not)."""
        fn = getattr(self._backend, "qubit_gate_errors", None)
        return fn() if callable(fn) else None

    def ping(self) -> dict[str, Any]:
        """Health check: answers while circuits run (they run on other threads), with the
        provider's last word on the device (in service, jobs ahead) where it gives one."""
        out: dict[str, Any] = {"name": self._spec.name, "running": len(self._runs), "node_id": self._node_id,
                               "pid": os.getpid(), "started_at": self._started_at}
        provider = self._provider_status()
        if provider is not None:
            out["provider"] = provider.to_dict()
        return out

    def _provider_status(self) -> ProviderStatus | None:
        """The last reading; a fresh one is asked for on a thread of its own, so that a slow
        provider never makes a ping miss its deadline (a missed ping means "down")."""
        read = getattr(self._backend, "provider_status", None)
        if read is None:
            return None
        with self._lock:
            reader = self._provider_reader
            if reader is None or not reader.is_alive():
                reader = self._provider_reader = threading.Thread(
                    target=self._read_provider, args=(read,), name="qalloc-provider-status", daemon=True)
                reader.start()
        if self._provider is None:     # the first reading: worth a short wait (cached from then on)
            reader.join(timeout=0.2)
        return self._provider

    def _read_provider(self, read: Any) -> None:
        try:
            status = read()
        except Exception as exc:  # noqa: BLE001 - the provider's failure is not the actor's
            log.debug("provider status of %s unavailable: %s", self._spec.name, exc)
            return
        if status is not None:
            self._provider = status

    # ---- running --------------------------------------------------------------------------
    def run(self, job_id: str, attempt: int, payload: bytes, shots: int,
            seed: int | None = None) -> dict[str, Any]:
        """Run one attempt of a job; the same (job, attempt) twice returns the same run."""
        key = (job_id, attempt)
        with self._lock:
            if key in self._done:
                return self._done[key]
            existing = self._runs.get(key)
            if existing is None:
                run = self._runs[key] = _Run()
        if existing is not None:
            return existing.wait()
        try:
            with self._slots:
                run.result = self._run_sync(job_id, attempt, payload, shots, seed)
            self._remember(key, run.result)
            return run.result
        except BaseException as exc:
            run.error = exc
            raise
        finally:
            with self._lock:
                self._runs.pop(key, None)
            run.done.set()

    def attach(self, job_id: str, attempt: int) -> dict[str, Any] | None:
        """A restarted allocator asks for a run it started before it crashed.

        Returns the result (waiting if still running), or None if this actor never saw the
        attempt (it was restarted itself, or the dispatch never arrived).
        """
        key = (job_id, attempt)
        with self._lock:
            if key in self._done:
                return self._done[key]
            run = self._runs.get(key)
        return None if run is None else run.wait()

    def reattach(self, job_id: str, attempt: int, provider_job_id: str, shots: int,
                 payload: bytes | None = None) -> dict[str, Any]:
        """Wait again on a provider job (QPU): never submit a paid job twice.

        ``payload`` (the job's): an estimator job's expectation values are computed again from
        the provider job's counts of every measurement basis; without it, counts only."""
        if not isinstance(self._backend, Reattachable):
            raise RuntimeError(f"backend {self._spec.name} cannot re-attach to provider jobs")
        res = self._backend.reattach(provider_job_id, shots)
        if payload is not None:
            from ray_qalloc.expectation import expectation_from_reattached

            res = expectation_from_reattached(res, payload)
        out = self._with_context(res)
        self._remember((job_id, attempt), out)
        return out

    def _remember(self, key: tuple[str, int], result: dict[str, Any]) -> None:
        with self._lock:
            self._done[key] = result
            while len(self._done) > _DONE_KEEP:
                self._done.popitem(last=False)

    def _run_sync(self, job_id: str, attempt: int, payload: bytes, shots: int,
                  seed: int | None) -> dict[str, Any]:
        from ray_qalloc.circuits import decode_payload
        from ray_qalloc.runopts import split_payload

        received = time.time()
        inner, options = split_payload(payload)   # a job's own seed and observables (runopts)
        if options.seed is not None:
            seed = options.seed
        circuit = decode_payload(inner)

        def submitted(provider_job_id: str) -> None:
            # Stored before waiting, so a restarted actor re-attaches instead of paying twice.
            alloc = ray.get_actor(self._allocator_name, namespace=self._namespace)
            ray.get(alloc.record_provider_job.remote(job_id, attempt, provider_job_id), timeout=60)

        if options.estimator:
            from ray_qalloc.expectation import estimate_by_sampling

            res = estimate_by_sampling(self._backend, circuit, options, seed=seed, on_submitted=submitted)
        else:
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
        "max_concurrency": spec.slots + 8,   # runs, plus threads for pings and re-attachments
    }
    if use_resource:
        opts["resources"] = {resource_name(spec.name): float(spec.slots)}
    return opts


def actor_name(backend_name: str) -> str:
    return f"qalloc-backend-{backend_name}"


RemoteBackendActor = ray.remote(BackendActor)
