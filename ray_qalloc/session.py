"""``ray_qalloc.connect()``: the Python entry point, inside an existing Ray job or standalone.

Intake runs here, in the caller's process, before anything reaches the allocator: a bad
job raises a typed error at ``submit`` and nothing is stored. Every submit carries an
idempotency key (made up when the caller gives none), so Ray's automatic retry of a call
to a restarting allocator can never create a second job.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import ray
from ray.exceptions import GetTimeoutError

from ray_qalloc.allocator import RemoteAllocator, allocator_options
from ray_qalloc.resources import node_resources
from ray_qalloc.config import Settings, load_settings
from ray_qalloc.exceptions import ConfigError, JobFailed, JobTimeout, NoFeasibleBackend, QAllocError
from ray_qalloc.jobs import JobState, make_spec, prepare_job

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

log = logging.getLogger("ray_qalloc")


@dataclass(frozen=True)
class JobResult:
    """Counts and measured timings of a completed job."""

    job_id: str
    counts: dict[str, int]
    shots: int
    backend: str
    wall_s: float
    queue_s: float
    qpu_s: float | None
    attempts: int
    failover_history: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def probabilities(self) -> dict[str, float]:
        total = sum(self.counts.values()) or 1
        return {k: v / total for k, v in self.counts.items()}


def _result_from(record: dict[str, Any]) -> JobResult:
    res = record["result"] or {}
    return JobResult(job_id=record["id"], counts=dict(res.get("counts", {})), shots=record["shots"],
                     backend=res.get("backend", record.get("backend") or ""), wall_s=float(res.get("wall_s", 0.0)),
                     queue_s=float(res.get("queue_s", 0.0)), qpu_s=res.get("qpu_s"),
                     attempts=record.get("attempts", 1), failover_history=record.get("attempt_history", []),
                     metadata=res.get("metadata", {}))


class JobHandle:
    """A submitted job: ask for its status, result or placement explanation."""

    def __init__(self, client: "QAlloc", job_id: str, created: bool = True) -> None:
        self._client = client
        self.id = job_id
        self.created = created

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def status(self) -> dict[str, Any]:
        return self._client._call("status", self.id)

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the result; raise JobTimeout after ``timeout`` seconds, JobFailed if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            step = 30.0 if left is None else min(left, 30.0)
            rec = self._client._call("wait", self.id, step, timeout=step + self._client.settings.call_timeout_s)
            state = JobState(rec["state"])
            if state == JobState.COMPLETED:
                return _result_from(rec)
            if state.terminal:
                raise JobFailed(f"job {self.id} ended {state.value}: {rec.get('error') or 'no detail'}",
                                fix="see `qalloc explain JOB` for the placement and failover history.",
                                state=state.value)
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.id} is still {state.value} after {timeout} s.",
                                 fix="wait longer (result(timeout=...)) or check `qalloc status JOB`.",
                                 state=state.value)

    def explain(self) -> dict[str, Any]:
        return self._client._call("explain", self.id)

    def cancel(self) -> bool:
        return self._client._call("cancel", self.id)


class QAlloc:
    """A connection to the allocator of one Ray cluster."""

    def __init__(self, settings: Settings, allocator: Any, started_ray: bool) -> None:
        self.settings = settings
        self._allocator = allocator
        self._started_ray = started_ray

    # ---- jobs ---------------------------------------------------------------------------
    def submit(self, circuit: "str | QuantumCircuit | Any", *, shots: int = 1024, priority: str = "normal",
               deadline_s: float | None = None, intent: str = "auto", fidelity_min: float | None = None,
               tenant: str = "default", idempotency_key: str | None = None,
               backends: list[str] | None = None, observables: list[Any] | None = None,
               precision: float | None = None, seed: int | None = None, format: str = "qasm") -> JobHandle:
        """Validate the job here, store it through the allocator, return its handle.

        ``observables`` (``[{pauli_label: coeff}, ...]``) make it an estimator job: its result's
        ``metadata["expectation"]`` holds ``evs`` and ``stds``; ``precision`` sets the QPU shots
        (``ray_qalloc.jobs.JobSpec``). ``seed`` seeds simulator runs.

        ``circuit`` may also be a ``cirq.Circuit`` or a Braket ``Circuit`` (converted here; the
        counts then read in that framework's bit order, see ``ray_qalloc.frontends``); ``format``
        names framework OpenQASM text: ``cirq`` or ``braket``."""
        job = self._prepare(circuit, shots=shots, priority=priority, deadline_s=deadline_s, intent=intent,
                            fidelity_min=fidelity_min, tenant=tenant, idempotency_key=idempotency_key,
                            backends=backends, observables=observables, precision=precision, seed=seed,
                            format=format)
        out = self._call("submit", job)
        return JobHandle(self, out["id"], out["created"])

    def _prepare(self, circuit: "str | QuantumCircuit", *, shots: int = 1024, priority: str = "normal",
                 deadline_s: float | None = None, intent: str = "auto", fidelity_min: float | None = None,
                 tenant: str = "default", idempotency_key: str | None = None,
                 backends: list[str] | None = None, observables: list[Any] | None = None,
                 precision: float | None = None, seed: int | None = None, format: str = "qasm") -> Any:
        from ray_qalloc.frontends import to_intake   # Cirq / Braket load only for their own objects

        circuit = to_intake(circuit, format, self.settings.limits)
        spec = make_spec(circuit=circuit, shots=shots, priority=priority, deadline_s=deadline_s, intent=intent,
                         fidelity_min=fidelity_min, tenant=tenant,
                         idempotency_key=idempotency_key or f"auto-{uuid.uuid4().hex}",
                         backends=tuple(backends) if backends else None, observables=observables,
                         precision=precision, seed=seed)
        return prepare_job(spec, self.settings.limits)

    def submit_many(self, jobs: Iterable[dict[str, Any]]) -> list[JobHandle]:
        """Many jobs in one round trip and one store transaction (keyword dicts as for ``submit``).

        Intake errors raise before anything is sent; a job that no backend can run raises
        NoFeasibleBackend after the others were accepted (their handles are on the error as
        ``accepted``)."""
        prepared = [self._prepare(**j) for j in jobs]
        answers = self._call("submit_many", prepared,
                             timeout=self.settings.call_timeout_s + len(prepared) / 500.0)
        handles = [JobHandle(self, a["id"], a["created"]) for a in answers if "id" in a]
        errors = [a["error"] for a in answers if "error" in a]
        if errors:
            raise NoFeasibleBackend(f"{len(errors)} of {len(prepared)} jobs were refused: {errors[0]['message']}",
                                    fix=errors[0].get("hint"), accepted=[h.id for h in handles], errors=errors)
        return handles

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id, created=False)

    # ---- pool ---------------------------------------------------------------------------
    def backends(self) -> list[dict[str, Any]]:
        return self._call("backends")

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def flush_history(self) -> int:
        return self._call("flush_history")

    @property
    def allocator(self) -> Any:
        return self._allocator

    def drain(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Start no new runs and wait (bounded) for the running ones; queued jobs stay in the
        store. Returns what is still running and queued."""
        return self._call("drain", timeout_s, timeout=timeout_s + self.settings.call_timeout_s)

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop Ray if this connection started it (the store keeps every accepted job). With
        ``drain_s`` > 0, running jobs get that long to finish first."""
        if self._started_ray and ray.is_initialized():
            if drain_s > 0:
                try:
                    self.drain(drain_s)
                except Exception as exc:  # shutting down anyway: the store keeps the jobs
                    log.warning("drain before shutdown failed: %s", exc)
            ray.shutdown()

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """One allocator call, bounded in time (a restarting allocator answers within seconds;
        a hung one must not hang the caller)."""
        limit = timeout if timeout is not None else self.settings.call_timeout_s
        try:
            return ray.get(getattr(self._allocator, method).remote(*args), timeout=limit)
        except GetTimeoutError:
            raise QAllocError(f"the allocator did not answer {method} within {limit:g} s.",
                              fix="retry; accepted jobs are kept in the store.", unavailable=True) from None


def connect(address: str | None = None, *, data_dir: str | Path | None = None,
            pool: list[str] | None = None, num_cpus: int | None = None,
            ray_temp_dir: str | None = None, settings: Settings | None = None,
            **overrides: Any) -> QAlloc:
    """Connect to (or start) ray-qalloc on a Ray cluster.

    - Inside a running Ray job (``ray.is_initialized()``): use that cluster.
    - ``address`` given (or ``RAY_ADDRESS`` set): attach to that cluster.
    - Otherwise: start a local Ray with this pool's custom resources.
    The allocator is created on first use and found by name afterwards.
    """
    if settings is None:
        settings = load_settings(data_dir=Path(data_dir) if data_dir else None, pool=pool, **overrides)
    started = False
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, namespace=settings.namespace, logging_level=logging.WARNING,
                     log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 2, resources=node_resources(settings),
                     namespace=settings.namespace, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, _temp_dir=ray_temp_dir)
            started = True
    allocator = RemoteAllocator.options(**allocator_options(settings)).remote(settings)
    info = ray.get(allocator.ready.remote())
    if Path(info["data_dir"]) != settings.data_dir:
        raise ConfigError(
            f"the allocator of this Ray cluster uses data dir {info['data_dir']}, not {settings.data_dir}.",
            fix="connect with the same data dir (or QALLOC_DATA_DIR), or use another namespace.")
    return QAlloc(settings, allocator, started)
