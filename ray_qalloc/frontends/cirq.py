"""Cirq circuits into the Qiskit circuits intake runs, and a ``cirq.Sampler`` over the allocator.

Why through Cirq's own OpenQASM: Cirq knows how to decompose every gate it has (FSim,
PhasedXZ, ISWAP**t, controlled and matrix gates) into standard ones, and keeps those
decompositions right as it grows; re-implementing them here would be a second, worse copy.
``cirq.qasm`` writes OpenQASM 2 over ``qelib1.inc`` (at full float precision here), intake's
parser reads it with the same checks as any tenant's text, and ``framework_order`` lays out
the classical bits so that Qiskit's counts read in Cirq's order: one space-separated group
per measurement key, in the order the keys are first measured, each key's bits in the order
of its qubits. ``counts_to_measurements`` turns those counts into Cirq's per-key arrays.

What does not convert (a clear ``InvalidCircuit``): unresolved parameters (resolve them, or
use the sampler, which does), a key measured more than once, classically controlled
operations, noise channels and anything else Cirq cannot write as OpenQASM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import cirq
import numpy as np

from ray_qalloc.exceptions import InvalidCircuit, JobFailed

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

#: The key a circuit without any measurement is measured into (every qubit, sorted).
DEFAULT_KEY = "m"
_PRECISION = 17   # digits Cirq writes for an angle: a double's worth, so nothing is rounded away


@dataclass(frozen=True)
class CirqConversion:
    """A converted circuit and how to read its counts back: ``keys`` are (key, number of bits)
    in the order their groups appear in a counts string."""

    circuit: "QuantumCircuit"
    keys: tuple[tuple[str, int], ...]


def _measurement_keys(circuit: cirq.AbstractCircuit) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    seen: set[str] = set()
    for op in circuit.all_operations():
        if cirq.is_measurement(op):
            gate = getattr(op, "gate", None)
            if not isinstance(gate, cirq.MeasurementGate):
                raise InvalidCircuit(f"circuit: the measurement {op!r} is not a plain cirq.measure.",
                                     field="circuit", fix="measure with cirq.measure(*qubits, key=...).")
            if gate.confusion_map:
                raise InvalidCircuit("circuit: measurements with a confusion map cannot be converted.",
                                     field="circuit", fix="drop the confusion_map; QPUs bring their own readout error.")
            key = str(gate.key)
            if key in seen:
                raise InvalidCircuit(f"circuit: measurement key {key!r} is measured more than once.",
                                     field="circuit", fix="give every measurement its own key.")
            seen.add(key)
            keys.append((key, gate.num_qubits()))
        elif cirq.control_keys(op):
            raise InvalidCircuit(f"circuit: {op!r} is classically controlled.", field="circuit",
                                 fix="remove the classical control; measure at the end instead.")
    return keys


def circuit_to_qiskit(circuit: cirq.AbstractCircuit, limits: Any = None) -> CirqConversion:
    """A resolved ``cirq.Circuit`` as a Qiskit circuit whose counts read in Cirq's key order."""
    from ray_qalloc.frontends.bits import framework_order, parse_trusted

    if not isinstance(circuit, cirq.AbstractCircuit):
        raise InvalidCircuit(f"circuit: expected a cirq.Circuit, got {type(circuit).__name__}.", field="circuit",
                             fix="pass a cirq.Circuit (wrap a moment or operation list in cirq.Circuit(...)).")
    if cirq.is_parameterized(circuit):
        names = ", ".join(sorted(str(p) for p in cirq.parameter_names(circuit))[:5])
        raise InvalidCircuit(f"circuit: the Cirq circuit has unresolved parameters ({names}).", field="circuit",
                             fix="resolve them (cirq.resolve_parameters(circuit, {...})), or run it through "
                                 "QAllocCirqSampler with a sweep.")
    circuit = circuit.unfreeze(copy=False) if isinstance(circuit, cirq.FrozenCircuit) else circuit
    keys = _measurement_keys(circuit)
    if not keys:
        qubits = sorted(circuit.all_qubits())
        if not qubits:
            raise InvalidCircuit("circuit: the Cirq circuit acts on no qubits.", field="circuit",
                                 fix="add operations on at least one qubit.")
        circuit = circuit + cirq.Circuit(cirq.measure(*qubits, key=DEFAULT_KEY))
        keys = [(DEFAULT_KEY, len(qubits))]
    try:
        text = circuit.to_qasm(precision=_PRECISION)
    except Exception as exc:  # noqa: BLE001 - Cirq's refusal names the operation
        raise InvalidCircuit(f"circuit: Cirq cannot write this circuit as OpenQASM: {exc}", field="circuit",
                             fix="use unitary gates and measurements (no noise channels or custom "
                                 "operations without a decomposition).") from None
    qc = framework_order(parse_trusted(text, limits))
    if len(qc.cregs) != len(keys):   # Cirq writes one creg per key, in first-measured order
        raise InvalidCircuit(f"circuit: {len(keys)} measurement keys became {len(qc.cregs)} registers.",
                             field="circuit", fix="report this circuit to the ray-qalloc maintainers.")
    return CirqConversion(qc, tuple(keys))


def counts_to_measurements(counts: dict[str, int], keys: Sequence[tuple[str, int]],
                           rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Counts (as the converted circuit writes them) as Cirq's ``{key: (shots, bits) int8 array}``.

    Backends return counts, not shots in order, so the rows are the counts expanded and
    shuffled (``rng``), as a sampler's rows are independent draws."""
    rows: list[list[str]] = []
    for bitstring, n in counts.items():
        parts = bitstring.split(" ")
        if len(parts) != len(keys) or any(len(p) != k for p, (_, k) in zip(parts, keys)):
            raise JobFailed(f"counts key {bitstring!r} does not match the measurement keys {list(keys)}.",
                            fix="report this to the ray-qalloc maintainers.", state="completed")
        rows.extend([parts] * n)
    order = (rng or np.random.default_rng()).permutation(len(rows)) if rows else np.arange(0)
    out: dict[str, np.ndarray] = {}
    for i, (key, width) in enumerate(keys):
        arr = np.zeros((len(rows), width), dtype=np.int8)
        for r, j in enumerate(order):
            arr[r] = [1 if c == "1" else 0 for c in rows[j][i]]
        out[key] = arr
    return out


class QAllocCirqSampler(cirq.Sampler):
    """A ``cirq.Sampler`` whose circuits run wherever the allocator puts them.

    Cirq code switches by one line (``sampler = QAllocCirqSampler()`` instead of
    ``cirq.Simulator()``) and keeps ``run``, ``run_sweep`` and ``sample``; results are
    ``cirq.ResultDict`` with the circuit's own measurement keys. Every resolver of a sweep is
    one ray-qalloc job, all sent in one ``submit_many``. ``client`` is the ``connect()`` session
    by default, or the HTTP ``Client``; job options (``priority``, ``intent``, ``backends``,
    ``fidelity_min``, ``deadline_s``, ``tenant``) apply to every job.
    """

    def __init__(self, client: Any = None, *, timeout_s: float | None = 600.0, seed: int | None = None,
                 **job_options: Any) -> None:
        allowed = {"priority", "intent", "fidelity_min", "deadline_s", "backends", "tenant"}
        unknown = sorted(set(job_options) - allowed)
        if unknown:
            raise TypeError(f"QAllocCirqSampler got unknown option(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(allowed))}.")
        self._client = client
        self._timeout_s = timeout_s
        self._rng = np.random.default_rng(seed)
        self._options = {k: v for k, v in job_options.items() if v is not None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from ray_qalloc.session import connect

            self._client = connect()
        return self._client

    def run_sweep(self, program: cirq.AbstractCircuit, params: cirq.Sweepable,
                  repetitions: int = 1) -> Sequence[cirq.Result]:
        resolvers = list(cirq.to_resolvers(params))
        conversions = [circuit_to_qiskit(cirq.resolve_parameters(program, r)) for r in resolvers]
        if repetitions == 0:
            return [cirq.ResultDict(params=r, measurements={k: np.zeros((0, n), dtype=np.int8) for k, n in c.keys})
                    for r, c in zip(resolvers, conversions)]
        jobs = [{"circuit": c.circuit, "shots": int(repetitions), **self._options} for c in conversions]
        handles = self.client.submit_many(jobs)
        results: list[cirq.Result] = []
        for resolver, conv, handle in zip(resolvers, conversions, handles):
            res = handle.result(timeout=self._timeout_s)
            results.append(cirq.ResultDict(params=resolver,
                                           measurements=counts_to_measurements(res.counts, conv.keys, self._rng)))
        return results
