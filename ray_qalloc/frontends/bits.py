"""Classical bit order between Qiskit and the frameworks, and the parse every frontend shares.

Qiskit writes counts with classical bit 0 rightmost and the last register first; Cirq
(per measurement key) and Braket (per measured qubit) write the first bit leftmost. A
frontend therefore hands intake a circuit whose classical bits are laid out so that
Qiskit's own counts already read in the framework's order (``framework_order``): results
need no translation on the way back, over Ray or over HTTP, whoever reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_qalloc.exceptions import InvalidCircuit

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit


def parse_trusted(text: str, limits: Any = None) -> "QuantumCircuit":
    """Parse framework-written OpenQASM through intake's parser (same limits and checks as
    any tenant's text: a framework object may come from anywhere too)."""
    from ray_qalloc.circuits import ensure_measured, parse_circuit
    from ray_qalloc.config import Limits

    return ensure_measured(parse_circuit(text, limits or Limits()).circuit)


def framework_order(circuit: "QuantumCircuit") -> "QuantumCircuit":
    """The same circuit with registers declared last-first and each register's bits reversed,
    so that Qiskit's counts string lists register 0 first, each with its bit 0 leftmost.

    Refuses classical conditions: they compare a register's integer value, which a reversed
    bit order would change (neither Cirq's nor Braket's converters produce them for
    circuits without classical control)."""
    from qiskit import ClassicalRegister, QuantumCircuit

    if not circuit.cregs or all(len(r) <= 1 for r in circuit.cregs) and len(circuit.cregs) == 1:
        return circuit
    for inst in circuit.data:
        if getattr(inst.operation, "condition", None) is not None or getattr(inst.operation, "blocks", ()):
            raise InvalidCircuit("circuit: classically controlled operations cannot be converted.",
                                 field="circuit", fix="remove the classical control (measure at the end).")
    new_regs = [ClassicalRegister(len(r), r.name) for r in circuit.cregs]
    out = QuantumCircuit(*circuit.qregs, *reversed(new_regs), name=circuit.name,
                         global_phase=circuit.global_phase)
    mapping = {}
    for old, new in zip(circuit.cregs, new_regs):
        for i, bit in enumerate(old):
            mapping[bit] = new[len(old) - 1 - i]
    loose = [b for b in circuit.clbits if b not in mapping]
    if loose:
        raise InvalidCircuit("circuit: classical bits outside any register cannot be converted.",
                             field="circuit", fix="measure into named classical registers.")
    for inst in circuit.data:
        out.append(inst.operation, inst.qubits, [mapping[c] for c in inst.clbits])
    return out


def to_framework_counts(counts: dict[str, int]) -> dict[str, int]:
    """Qiskit-order counts turned round: each register's bits reversed, registers first-first.

    For results of framework OpenQASM text sent as plain text (``format`` over HTTP), where
    the server keeps Qiskit's order."""
    out: dict[str, int] = {}
    for key, n in counts.items():
        parts = key.split(" ")
        flipped = " ".join(p[::-1] for p in reversed(parts))
        out[flipped] = out.get(flipped, 0) + n
    return out
