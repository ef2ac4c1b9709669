"""``QAllocSampler``: a Qiskit ``BaseSamplerV2`` whose circuits run wherever the allocator puts them.

Why a Sampler: existing Qiskit code switches to ray-qalloc by one line
(``sampler = QAllocSampler()`` instead of ``StatevectorSampler()``) and keeps reading
``result[0].data.<creg>`` as ``BitArray``s.

How: every parameter setting of every pub becomes one bound circuit, and all bound circuits
of one ``run`` go to the client in ONE ``submit_many`` (one round trip, one store
transaction). The returned job waits for the handles in a background thread and turns each
job's counts into per-register ``BitArray``s shaped like the pub.

Where it follows Qiskit's reference samplers (``StatevectorSampler``, Aer's ``SamplerV2``):
``seed`` (sent to every simulator run: the same seed on the same method gives the same counts,
and the same shot order), ``default_shots``, a circuit without classical registers (a
``UserWarning`` and an empty ``DataBin``, nothing submitted), registers that share classical
bits or leave some out (the circuit travels with one register of all its bits; each register
is read back from it), registers never measured (zeros), and ``ValueError`` for bad pubs.

The client is anything with ``submit_many(list[dict]) -> list[handle]`` and
``handle.result(timeout=...)`` returning an object with ``.counts`` and ``.backend``
(the in-Ray ``QAlloc`` session and the HTTP client both do); nothing else of it is used.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np
from qiskit.primitives import BaseSamplerV2, BitArray, DataBin, PrimitiveResult, SamplerPubResult
from qiskit.primitives.containers.sampler_pub import SamplerPub, SamplerPubLike

from ray_qalloc.exceptions import JobFailed
from ray_qalloc.primitive_base import PrimitiveOptions, QAllocPrimitive, make_options
from ray_qalloc.primitive_job import InvalidPub, PrimitiveClient, QAllocPrimitiveJob, _Handle, pub_error, submit_all

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

SamplerClient = PrimitiveClient   # the name this module exported before the Estimator shared it

NO_REGISTERS_WARNING = ("One of your circuits has no output classical registers and so the result will be empty. "
                        "Did you mean to add measurement instructions?")   # Qiskit's own words


@dataclass(frozen=True)
class QAllocSamplerOptions(PrimitiveOptions):
    """Job options applied to every circuit, and the shots when neither the pub nor ``run`` says."""

    default_shots: int = 1024

    run_default: ClassVar[str] = "default_shots"


@dataclass(frozen=True)
class _PubPlan:
    """One coerced pub, its bound circuits (flattened in C order) and how to read its counts.

    ``circuits`` is empty when nothing needs running: no classical registers (empty result) or
    no measurements (every register reads zeros)."""

    pub: SamplerPub
    circuits: list["QuantumCircuit"]
    registers: list[tuple[str, list[int]]]  # creg name -> its bits' indices among circuit.clbits
    measured: bool = True


class QAllocSampler(QAllocPrimitive, BaseSamplerV2):
    """A SamplerV2 that submits its circuits to ray-qalloc.

    Args:
        client: anything following the client contract (module docstring); ``None`` connects
            with ``ray_qalloc.connect()``.
        default_shots: shots when neither the pub nor ``run`` says.
        seed: an int sent to every simulator run (as Qiskit's reference samplers take it); real
            QPUs ignore it. ``None``: each run draws its own.
        priority, intent, fidelity_min, deadline_s, backends, tenant: job options, as for
            ``QAlloc.submit``; ``None`` leaves each to the client's default.
        timeout_s: how long ``job.result()`` waits for all circuits of one ``run`` (None: forever).
    """

    def __init__(self, client: PrimitiveClient | None = None, *, default_shots: int = 1024,
                 seed: int | None = None, priority: str | None = None, intent: str | None = None,
                 fidelity_min: float | None = None, deadline_s: float | None = None,
                 backends: Iterable[str] | None = None, tenant: str | None = None,
                 timeout_s: float | None = None) -> None:
        _check_shots(default_shots, "default_shots")
        options = make_options(QAllocSamplerOptions, priority=priority, intent=intent, fidelity_min=fidelity_min,
                               deadline_s=deadline_s, backends=backends, tenant=tenant, timeout_s=timeout_s,
                               seed=seed, default_shots=int(default_shots))
        self._init_primitive(client, options, shots=int(default_shots))

    @property
    def options(self) -> QAllocSamplerOptions:
        return self._options  # type: ignore[return-value]

    @property
    def default_shots(self) -> int:
        """Shots when neither the pub nor ``run`` says (as ``StatevectorSampler.default_shots``)."""
        return self.options.default_shots

    def run(self, pubs: Iterable[SamplerPubLike], *, shots: int | None = None) -> "QAllocSamplerJob":
        """Validate every pub, submit all bound circuits in one ``submit_many``, return the job.

        Intake errors (bad pub, limits) raise here as ``ValueError``; backend failures and
        timeouts raise from ``job.result()``.
        """
        if shots is None:
            shots = self.options.default_shots
        _check_shots(shots, "shots")
        plans = [_plan(i, pub, shots) for i, pub in enumerate(_as_list(pubs))]
        if any(not plan.pub.circuit.cregs for plan in plans):
            warnings.warn(NO_REGISTERS_WARNING, UserWarning, stacklevel=2)
        fields = self._options.job_fields()
        jobs = [dict(fields, circuit=circuit, shots=int(plan.pub.shots)) for plan in plans for circuit in plan.circuits]
        handles = submit_all(self._client, jobs, "sampler")
        return QAllocSamplerJob(plans, handles, self._options.timeout_s, self._options.seed)


class QAllocSamplerJob(QAllocPrimitiveJob[PrimitiveResult[SamplerPubResult]]):
    """The ray-qalloc jobs of one ``run``, collected in a background thread into a PrimitiveResult."""

    def __init__(self, plans: list[_PubPlan], handles: list[_Handle], timeout_s: float | None,
                 seed: int | None = None) -> None:
        self._plans = plans
        self._seed = seed
        super().__init__(handles, timeout_s, self._results,
                         timeout_fix=f"raise QAllocSampler(timeout_s=...) (now {timeout_s} s).")

    def _results(self, handles: list[_Handle], outcomes: list[Any]) -> PrimitiveResult[SamplerPubResult]:
        results, start = [], 0
        for plan in self._plans:
            n = len(plan.circuits)
            results.append(_pub_result(plan, handles[start:start + n], outcomes[start:start + n], self._seed))
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
        raise pub_error(exc, f"{where}: {exc}{_parameters_note(pub_like)}",
                        fix="give (circuit,), (circuit, parameter_values) or (circuit, parameter_values, "
                            "shots), with one value per circuit parameter on the last axis.") from None
    circuit = pub.circuit
    registers = [(creg.name, [circuit.find_bit(bit).index for bit in creg]) for creg in circuit.cregs]
    try:
        bound = pub.parameter_values.bind_all(circuit)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidPub(f"{where}: cannot bind the parameter values: {exc}", field="pubs",
                         fix="give one value per circuit parameter, keyed by parameter (or in circuit.parameters "
                             "order).") from None
    if not circuit.cregs or not has_measurement(circuit):
        # Nothing to sample: no registers gives an empty result, unmeasured registers read 0
        # (as StatevectorSampler): no backend is needed for either.
        return _PubPlan(pub=pub, circuits=[], registers=registers, measured=False)
    circuits = [bound[idx] for idx in np.ndindex(pub.shape)]
    unbound = next((c for c in circuits if c.num_parameters), None)
    if unbound is not None:
        raise InvalidPub(f"{where}: parameters left unbound: {', '.join(p.name for p in unbound.parameters)}.",
                         field="pubs", fix="give a value for every circuit parameter.")
    layout = [bit for creg in circuit.cregs for bit in creg]
    if layout != list(circuit.clbits):
        circuits = [_one_register(c, where) for c in circuits]
    return _PubPlan(pub=pub, circuits=circuits, registers=registers)


def _one_register(circuit: "QuantumCircuit", where: str) -> "QuantumCircuit":
    """The circuit with its classical bits in one fresh register, in ``circuit.clbits`` order.

    Why: registers that share bits (aliasing) or bits in no register have no single counts
    format that every backend writes the same way; with one register, counts keys are the
    clbits, and each original register is read back from its bits' indices."""
    from qiskit import ClassicalRegister, QuantumCircuit

    if any(inst.operation.name in ("if_else", "while_loop", "for_loop", "switch_case", "box")
           or getattr(inst.operation, "_condition", None) is not None for inst in circuit.data):
        raise InvalidPub(f"{where}: the circuit's classical registers share bits (or leave bits out) and it "
                         "has classical control flow; ray-qalloc runs such circuits only without control flow.",
                         field="pubs", fix="give each classical bit to exactly one register, or remove the "
                                           "control flow.")
    out = QuantumCircuit(circuit.num_qubits, name=circuit.name, global_phase=circuit.global_phase,
                         metadata=circuit.metadata)
    out.add_register(ClassicalRegister(circuit.num_clbits, "c"))
    qmap = {q: out.qubits[i] for i, q in enumerate(circuit.qubits)}
    cmap = {c: out.clbits[i] for i, c in enumerate(circuit.clbits)}
    for inst in circuit.data:
        out.append(inst.operation, [qmap[q] for q in inst.qubits], [cmap[c] for c in inst.clbits], copy=False)
    return out


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

def _pub_result(plan: _PubPlan, handles: Sequence[_Handle], outcomes: Sequence[Any],
                seed: int | None = None) -> SamplerPubResult:
    pub = plan.pub
    shots = int(pub.shots)
    num_clbits = pub.circuit.num_clbits
    # Counts have no shot order; shuffled, any slice of shots is a fair sample (seeded: the same
    # seed gives the same BitArrays, not only the same counts).
    rng = np.random.default_rng(seed)
    arrays = {name: np.zeros(pub.shape + (shots, math.ceil(len(bits) / 8)), dtype=np.uint8)
              for name, bits in plan.registers}
    for idx, handle, outcome in zip(np.ndindex(pub.shape), handles, outcomes):
        samples = _samples(outcome.counts, num_clbits, shots, handle.id)
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


__all__ = ["NO_REGISTERS_WARNING", "InvalidPub", "QAllocSampler", "QAllocSamplerJob", "QAllocSamplerOptions",
           "SamplerClient"]
