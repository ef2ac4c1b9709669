"""What ``QAllocSampler`` and ``QAllocEstimator`` share: the client contract, one submit per
``run``, and a Qiskit primitive job that collects the ray-qalloc jobs in a background thread.

Why shared: both primitives turn pubs into ray-qalloc jobs the same way (all jobs of one ``run``
in ONE ``submit_many``, idempotency keys of their own so a retried call makes no second job)
and wait for them the same way; only how a job's result becomes pub data differs.

Errors: everything wrong with the user's input raises ``InvalidPub``, which is a ``ValueError``
(what Qiskit's reference primitives raise for bad pubs, and what Qiskit code catches) and a
``ray_qalloc.exceptions.IntakeError`` (with a "To fix: ..." hint).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

from qiskit.primitives.base.base_primitive_job import BasePrimitiveJob
from qiskit.providers import JobStatus
from qiskit.providers.jobstatus import JOB_FINAL_STATES

from ray_qalloc.exceptions import IntakeError, InvalidJobSpec, JobFailed, JobTimeout

R = TypeVar("R")


class InvalidPub(InvalidJobSpec, ValueError):
    """A pub the primitive cannot run; a ValueError too, because that is what Qiskit code catches."""

    code = "invalid_pub"


class InvalidPubType(InvalidJobSpec, TypeError):
    """A pub part of the wrong type (e.g. not a QuantumCircuit): a TypeError, as Qiskit raises."""

    code = "invalid_pub"


def pub_error(exc: Exception, message: str, fix: str) -> InvalidJobSpec:
    """Qiskit's own error for a bad pub, as ours: the same class family (ValueError or TypeError)."""
    cls = InvalidPubType if isinstance(exc, TypeError) else InvalidPub
    return cls(message, field="pubs", fix=fix)


class _Handle(Protocol):
    id: str

    def result(self, timeout: float | None = None) -> Any: ...


class PrimitiveClient(Protocol):
    """What the primitives need of a client: bulk submit, and handles that wait for results
    (``handle.result(timeout=...)`` with ``.counts``, ``.backend`` and ``.metadata``)."""

    def submit_many(self, jobs: list[dict[str, Any]]) -> Sequence[_Handle]: ...


def submit_all(client: PrimitiveClient, jobs: list[dict[str, Any]], prefix: str) -> list[_Handle]:
    """All jobs of one ``run`` in one ``submit_many``; the client's intake errors become
    ``InvalidPub`` (a ValueError), so Qiskit code that catches ValueError catches them."""
    run_key = f"{prefix}-{uuid.uuid4().hex}"
    for n, job in enumerate(jobs):
        job["idempotency_key"] = f"{run_key}-{n}"
    if not jobs:
        return []
    try:
        handles = list(client.submit_many(jobs))
    except IntakeError as exc:
        if isinstance(exc, ValueError):
            raise
        raise InvalidPub(exc.message, fix=exc.fix, field=exc.field, **exc.details) from exc
    if len(handles) != len(jobs):
        raise JobFailed(f"the client returned {len(handles)} handles for {len(jobs)} jobs.",
                        fix="check the client's submit_many: it must return one handle per job, in order.")
    return handles


class QAllocPrimitiveJob(BasePrimitiveJob[R, JobStatus], Generic[R]):
    """The ray-qalloc jobs of one ``run``, collected in a background thread by ``assemble``
    (which gets the handles and their outcomes, in submission order)."""

    def __init__(self, handles: list[_Handle], timeout_s: float | None,
                 assemble: Callable[[list[_Handle], list[Any]], R], timeout_fix: str) -> None:
        super().__init__(uuid.uuid4().hex, job_ids=[h.id for h in handles])
        self._handles = handles
        self._timeout_s = timeout_s
        self._assemble = assemble
        self._timeout_fix = timeout_fix
        self._cancel_requested = False
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qalloc-primitive")
        self._future: Future[R] = executor.submit(self._collect)
        executor.shutdown(wait=False)

    @property
    def job_ids(self) -> list[str]:
        """ray-qalloc job ids, pub by pub, each pub's settings in C order."""
        return [h.id for h in self._handles]

    def result(self) -> R:
        return self._future.result()

    def status(self) -> JobStatus:
        if not self._future.done():
            return JobStatus.RUNNING
        if self._future.cancelled() or (self._cancel_requested and self._future.exception() is not None):
            return JobStatus.CANCELLED
        return JobStatus.DONE if self._future.exception() is None else JobStatus.ERROR

    def done(self) -> bool:
        return self.status() == JobStatus.DONE

    def running(self) -> bool:
        return self.status() == JobStatus.RUNNING

    def cancelled(self) -> bool:
        return self.status() == JobStatus.CANCELLED

    def in_final_state(self) -> bool:
        return self.status() in JOB_FINAL_STATES

    def cancel(self) -> bool:
        """Cancel the jobs not yet finished, where the client's handles can (``handle.cancel()``)."""
        self._cancel_requested = True
        cancelled = False
        for handle in self._handles:
            cancel = getattr(handle, "cancel", None)
            if callable(cancel):
                try:
                    cancelled = bool(cancel()) or cancelled
                except Exception:  # noqa: BLE001 - best effort: a finished job cannot be cancelled
                    pass
        return cancelled

    def _collect(self) -> R:
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        outcomes = []
        for handle in self._handles:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                outcomes.append(handle.result(timeout=left))
            except JobTimeout as exc:
                raise JobTimeout(f"primitive job {self.job_id()}: {exc.message}", fix=self._timeout_fix) from exc
        return self._assemble(self._handles, outcomes)


def check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
        raise InvalidPub(f"timeout_s={timeout_s!r} must be a positive number of seconds.",
                         field="timeout_s", fix="pass a positive timeout, or None to wait forever.")


def check_seed(seed: Any) -> int | None:
    """Qiskit's reference primitives take an int (or a numpy Generator, which a remote run cannot
    share: refused with a hint)."""
    from ray_qalloc.runopts import check_seed as _check

    if seed is None:
        return None
    try:
        import numpy as np

        if isinstance(seed, np.integer):
            seed = int(seed)
        return _check(seed)
    except InvalidJobSpec as exc:
        raise InvalidPub(f"seed={seed!r:.60} cannot be sent to remote simulators; it must be an int in "
                         "0..2**63-1.", field="seed", fix="pass an int seed (a numpy Generator stays in this "
                                                          "process).") from exc


__all__ = ["InvalidPub", "InvalidPubType", "pub_error", "PrimitiveClient", "QAllocPrimitiveJob", "check_seed", "check_timeout", "submit_all"]
