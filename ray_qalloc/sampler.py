"""``QAllocSampler``: a Qiskit ``BaseSamplerV2`` whose circuits run wherever the allocator puts them.

Why a Sampler: existing Qiskit code switches to ray-qalloc by one line
(``sampler = QAllocSampler()`` instead of ``StatevectorSampler()``) and keeps reading
``result[0].data.<creg>`` as ``BitArray``s.

How: every parameter setting of every pub becomes one bound circuit, and all bound circuits
of one ``run`` go to the client in ONE ``submit_many`` (one round trip, one store
transaction). The returned job waits for the handles in a background thread and turns each
job's counts into per-register ``BitArray``s shaped like the pub.

The client is anything with ``submit_many(list[dict]) -> list[handle]`` and
``handle.result(timeout=...)`` returning an object with ``.counts`` and ``.backend``
(the in-Ray ``QAlloc`` session and the HTTP client both do); nothing else of it is used.
"""

from __future__ import annotations

import math
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
from qiskit.primitives import BaseSamplerV2, BitArray, DataBin, PrimitiveResult, SamplerPubResult
from qiskit.primitives.base.base_primitive_job import BasePrimitiveJob
from qiskit.primitives.containers.sampler_pub import SamplerPub, SamplerPubLike
from qiskit.providers import JobStatus
from qiskit.providers.jobstatus import JOB_FINAL_STATES

from ray_qalloc.exceptions import InvalidJobSpec, JobFailed, JobTimeout
from ray_qalloc.jobs import make_spec

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit


class InvalidPub(InvalidJobSpec, ValueError):
    """A pub the sampler cannot run; a ValueError too, because that is what Qiskit code catches."""

    code = "invalid_pub"


class _Handle(Protocol):
    id: str

    def result(self, timeout: float | None = None) -> Any: ...


class SamplerClient(Protocol):
    """What the sampler needs of a client: bulk submit, and handles that wait for results."""

    def submit_many(self, jobs: list[dict[str, Any]]) -> Sequence[_Handle]: ...


@dataclass(frozen=True)
class QAllocSamplerOptions:
    """Job options applied to every circuit; ``None`` leaves the field to the client's default."""

    default_shots: int = 1024
    priority: str | None = None
    intent: str | None = None
    fidelity_min: float | None = None
    deadline_s: float | None = None
    backends: tuple[str, ...] | None = None
    tenant: str | None = None
    timeout_s: float | None = None

    def job_fields(self) -> dict[str, Any]:
        """The set options as submit keywords (unset ones left out, so any client accepts them)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("default_shots", "timeout_s") and v is not None}
        if "backends" in out:
            out["backends"] = list(out["backends"])
        return out


@dataclass(frozen=True)
class _PubPlan:
    """One coerced pub, its bound circuits (flattened in C order) and how to read its counts."""

    pub: SamplerPub
    circuits: list["QuantumCircuit"]
    registers: list[tuple[str, list[int]]]  # creg name -> its bits' indices among circuit.clbits


class QAllocSampler(BaseSamplerV2):
    """A SamplerV2 that submits its circuits to ray-qalloc.

    Args:
        client: anything following the client contract (module docstring); ``None`` connects
            with ``ray_qalloc.connect()``.
        default_shots: shots when neither the pub nor ``run`` says.
        priority, intent, fidelity_min, deadline_s, backends, tenant: job options, as for
            ``QAlloc.submit``; ``None`` leaves each to the client's default.
        timeout_s: how long ``job.result()`` waits for all circuits of one ``run`` (None: forever).
    """

    def __init__(self, client: SamplerClient | None = None, *, default_shots: int = 1024,
                 priority: str | None = None, intent: str | None = None, fidelity_min: float | None = None,
                 deadline_s: float | None = None, backends: Iterable[str] | None = None,
                 tenant: str | None = None, timeout_s: float | None = None) -> None:
        _check_shots(default_shots, "default_shots")
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidPub(f"timeout_s={timeout_s!r} must be a positive number of seconds.",
                             field="timeout_s", fix="pass a positive timeout, or None to wait forever.")
        if isinstance(backends, str):  # a bare name would otherwise become a list of letters
            backends = [backends]
        self._options = QAllocSamplerOptions(
            default_shots=int(default_shots), priority=priority, intent=intent, fidelity_min=fidelity_min,
            deadline_s=deadline_s, backends=tuple(backends) if backends is not None else None,
            tenant=tenant, timeout_s=timeout_s)
        # Refuse bad options now, not at the first run (same rules as intake).
        make_spec(circuit="", shots=self._options.default_shots, **self._options.job_fields())
        if client is None:
            from ray_qalloc.session import connect

            client = connect()
        self._client = client

    @property
    def options(self) -> QAllocSamplerOptions:
        return self._options

    @property
    def client(self) -> SamplerClient:
        return self._client

    def run(self, pubs: Iterable[SamplerPubLike], *, shots: int | None = None) -> "QAllocSamplerJob":
        """Validate every pub, submit all bound circuits in one ``submit_many``, return the job.

        Intake errors (bad pub, limits, no feasible backend) raise here; backend failures and
        timeouts raise from ``job.result()``.
        """
        if shots is None:
            shots = self._options.default_shots
        _check_shots(shots, "shots")
        plans = [_plan(i, pub, shots) for i, pub in enumerate(_as_list(pubs))]
        run_key = f"sampler-{uuid.uuid4().hex}"
        fields = self._options.job_fields()
        # Keys of our own make a retried submit_many (by any client) create no second job.
        jobs = [dict(fields, circuit=circuit, shots=int(plan.pub.shots)) for plan in plans for circuit in plan.circuits]
        for n, job in enumerate(jobs):
            job["idempotency_key"] = f"{run_key}-{n}"
        handles = list(self._client.submit_many(jobs)) if jobs else []
        if len(handles) != len(jobs):
            raise JobFailed(f"the client returned {len(handles)} handles for {len(jobs)} circuits.",
                            fix="check the client's submit_many: it must return one handle per job, in order.")
        return QAllocSamplerJob(plans, handles, self._options.timeout_s)


class QAllocSamplerJob(BasePrimitiveJob[PrimitiveResult[SamplerPubResult], JobStatus]):
    """The ray-qalloc jobs of one ``run``, collected in a background thread into a PrimitiveResult."""

    def __init__(self, plans: list[_PubPlan], handles: list[_Handle], timeout_s: float | None) -> None:
        super().__init__(uuid.uuid4().hex, job_ids=[h.id for h in handles])
        self._plans = plans
        self._handles = handles
        self._timeout_s = timeout_s
        self._cancel_requested = False
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qalloc-sampler")
        self._future: Future[PrimitiveResult[SamplerPubResult]] = executor.submit(self._collect)
        executor.shutdown(wait=False)

    @property
    def job_ids(self) -> list[str]:
        """ray-qalloc job ids, pub by pub, each pub's settings in C order."""
        return [h.id for h in self._handles]

    def result(self) -> PrimitiveResult[SamplerPubResult]:
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
        """Cancel the circuits not yet finished, where the client's handles can (``handle.cancel()``)."""
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

    def _collect(self) -> PrimitiveResult[SamplerPubResult]:
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        outcomes = []
        for handle in self._handles:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                outcomes.append(handle.result(timeout=left))
            except JobTimeout as exc:
                raise JobTimeout(f"sampler job {self.job_id()}: {exc.message}",
                                 fix=f"raise QAllocSampler(timeout_s=...) (now {self._timeout_s} s).") from exc
        results, start = [], 0
        for plan in self._plans:
            n = len(plan.circuits)
            results.append(_pub_result(plan, self._handles[start:start + n], outcomes[start:start + n]))
            start += n
        return PrimitiveResult(results, metadata={"version": 2})


# ---------------------------------------------------------------------------------------------
# Pubs in
# ---------------------------------------------------------------------------------------------

def _as_list(pubs: Iterable[SamplerPubLike]) -> list[SamplerPubLike]:
    from qiskit import QuantumCircuit

    if isinstance(pubs, (QuantumCircuit, SamplerPub)):
        raise InvalidPub("run() takes a list of pubs, got a single one.", field="pubs",
                         fix="wrap it in a list: sampler.run([circuit]) or sampler.run([(circuit, values)]).")
    return list(pubs)


def _check_shots(shots: Any, name: str) -> None:
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise InvalidPub(f"{name}={shots!r} must be a positive whole number.", field=name,
                         fix="pass the number of shots as a positive int.")


def _plan(index: int, pub_like: SamplerPubLike, shots: int) -> _PubPlan:
    """Coerce, check and bind one pub, with errors that say which pub and what is wrong."""
    from ray_qalloc.circuits import has_measurement

    where = f"pub {index}"
    try:
        pub = SamplerPub.coerce(pub_like, shots)
    except (ValueError, TypeError) as exc:
        raise InvalidPub(f"{where}: {exc}{_parameters_note(pub_like)}", field="pubs",
                         fix="give (circuit,), (circuit, parameter_values) or (circuit, parameter_values, "
                             "shots), with one value per circuit parameter on the last axis.") from None
    circuit = pub.circuit
    if not circuit.cregs or not has_measurement(circuit):
        raise InvalidPub(f"{where}: the circuit has no {'classical registers' if not circuit.cregs else 'measurements'}"
                         f", so there is nothing to sample.", field="pubs",
                         fix="measure the qubits you want, e.g. circuit.measure_all().")
    layout = [bit for creg in circuit.cregs for bit in creg]
    if layout != list(circuit.clbits):
        raise InvalidPub(f"{where}: the classical registers ({', '.join(c.name for c in circuit.cregs)}) do not hold "
                         f"each of the circuit's {circuit.num_clbits} classical bits exactly once, in order, so "
                         "the backends' counts cannot be split into registers.", field="pubs",
                         fix="measure into registers created as ClassicalRegister(size, name), without loose "
                             "or shared bits.")
    try:
        bound = pub.parameter_values.bind_all(circuit)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidPub(f"{where}: cannot bind the parameter values: {exc}", field="pubs",
                         fix="give one value per circuit parameter, keyed by parameter (or in circuit.parameters "
                             "order).") from None
    circuits = [bound[idx] for idx in np.ndindex(pub.shape)]
    unbound = next((c for c in circuits if c.num_parameters), None)
    if unbound is not None:
        raise InvalidPub(f"{where}: parameters left unbound: {', '.join(p.name for p in unbound.parameters)}.",
                         field="pubs", fix="give a value for every circuit parameter.")
    registers = [(creg.name, [circuit.find_bit(bit).index for bit in creg]) for creg in circuit.cregs]
    return _PubPlan(pub=pub, circuits=circuits, registers=registers)


def _parameters_note(pub_like: Any) -> str:
    """Name the circuit's parameters: Qiskit's own messages often do not say how many it wants."""
    from qiskit import QuantumCircuit

    circuit = pub_like if isinstance(pub_like, QuantumCircuit) else None
    if circuit is None and isinstance(pub_like, (tuple, list)) and pub_like:
        circuit = pub_like[0] if isinstance(pub_like[0], QuantumCircuit) else None
    if circuit is None:
        return ""
    names = ", ".join(p.name for p in circuit.parameters)
    return f" (the circuit has {circuit.num_parameters} parameter(s){': ' + names if names else ''})."


# ---------------------------------------------------------------------------------------------
# Counts out
# ---------------------------------------------------------------------------------------------

def _pub_result(plan: _PubPlan, handles: Sequence[_Handle], outcomes: Sequence[Any]) -> SamplerPubResult:
    pub = plan.pub
    shots = int(pub.shots)
    num_clbits = pub.circuit.num_clbits
    rng = np.random.default_rng()
    arrays = {name: np.zeros(pub.shape + (shots, math.ceil(len(bits) / 8)), dtype=np.uint8)
              for name, bits in plan.registers}
    for idx, handle, outcome in zip(np.ndindex(pub.shape), handles, outcomes):
        samples = _samples(outcome.counts, num_clbits, shots, handle.id)
        # Counts have no shot order; shuffled, any slice of shots is a fair sample.
        samples = samples[rng.permutation(shots)]
        for name, bits in plan.registers:
            arrays[name][idx] = BitArray.from_bool_array(samples[:, bits], order="little").array
    data = DataBin(**{name: BitArray(arrays[name], len(bits)) for name, bits in plan.registers},
                   shape=pub.shape)
    metadata = {"shots": shots, "circuit_metadata": pub.circuit.metadata,
                "job_ids": [h.id for h in handles],
                "backends": [str(getattr(o, "backend", "")) for o in outcomes]}
    return SamplerPubResult(data, metadata=metadata)


def _samples(counts: Mapping[Any, int], num_clbits: int, shots: int, job_id: str) -> np.ndarray:
    """One row per shot, column i = classical bit i (``circuit.clbits`` order)."""
    total = sum(int(v) for v in counts.values())
    if total != shots:
        raise JobFailed(f"job {job_id} returned {total} shots, {shots} were asked for.",
                        fix="check the backend that ran it (`qalloc explain JOB`).")
    keys = list(counts)
    rows = np.array([_key_bits(k, num_clbits, job_id) for k in keys], dtype=bool).reshape(len(keys), num_clbits)
    return np.repeat(rows, [int(counts[k]) for k in keys], axis=0)


def _key_bits(key: Any, num_clbits: int, job_id: str) -> list[bool]:
    """A counts key as bits, bit i first: Qiskit bitstrings (registers space-separated, last
    register leftmost, bit 0 rightmost), ``0x`` hex strings, or ints."""
    if isinstance(key, str) and not key.startswith("0x"):
        text = key.replace(" ", "")
        if len(text) == num_clbits and set(text) <= {"0", "1"}:
            return [c == "1" for c in reversed(text)]
        value = -1
    else:
        value = int(key, 16) if isinstance(key, str) else int(key)
    if not 0 <= value < (1 << num_clbits):
        raise JobFailed(f"job {job_id} returned the outcome {key!r}, which is not {num_clbits} classical bits.",
                        fix="check the backend that ran it (`qalloc explain JOB`).")
    return [bool(value >> i & 1) for i in range(num_clbits)]


__all__ = ["InvalidPub", "QAllocSampler", "QAllocSamplerJob", "QAllocSamplerOptions", "SamplerClient"]
