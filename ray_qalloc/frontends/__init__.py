"""Circuits from other frameworks (Cirq, Amazon Braket) into ray-qalloc's intake.

Why caller-side: a framework object is converted where it was made, into the Qiskit circuit
intake already knows, so the allocator, the store and every backend see one kind of job.
Recognising an object never imports its framework: ``framework_of`` reads the object's
type's module name, and a frontend module (which imports Cirq or Braket) loads only when an
object of that framework, or text that says it is one, is handed in. ``import ray_qalloc``
therefore never imports either package.

Text from a framework (over HTTP, ``format``):

* ``qasm``   -- standard OpenQASM 2 or 3 (the default);
* ``cirq``   -- what ``cirq.qasm`` writes: standard OpenQASM 2 over ``qelib1.inc`` (or 3), read as is;
* ``braket`` -- what ``Circuit.to_ir("OPENQASM")`` writes: OpenQASM 3 with Braket's gate names,
  translated by ``ray_qalloc.frontends.braket.translate_qasm``.

Bit order: circuits converted from framework *objects* come back with counts in the
framework's order (Cirq: one group per key, first measured first; Braket: measured qubits in
measurement order, leftmost first). Text keeps Qiskit's order (classical bit 0 rightmost);
``to_framework_counts`` turns such counts round.
"""

from __future__ import annotations

from typing import Any, Literal

from ray_qalloc.exceptions import InvalidJobSpec
from ray_qalloc.frontends.bits import to_framework_counts

Format = Literal["qasm", "cirq", "braket"]
FORMATS: tuple[str, ...] = ("qasm", "cirq", "braket")

__all__ = ["FORMATS", "Format", "framework_of", "to_framework_counts", "to_intake", "translate_text"]


def framework_of(obj: Any) -> str | None:
    """``"cirq"`` or ``"braket"`` for a circuit object of that framework, else None (no import)."""
    module = type(obj).__module__ or ""
    if module == "cirq" or module.startswith("cirq."):
        return "cirq"
    if module.startswith("braket.circuits"):
        return "braket"
    return None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidJobSpec(f"field 'format' is {fmt!r}, not one of {', '.join(FORMATS)}.", field="format",
                             fix="use 'qasm' for standard OpenQASM, 'cirq' for cirq.qasm output, 'braket' for "
                                 "Braket's OpenQASM 3.")


def translate_text(text: Any, fmt: str = "qasm") -> Any:
    """Framework OpenQASM as text intake reads; anything else is passed on untouched (intake
    refuses what is not text with its own message)."""
    _check_format(fmt)
    if fmt == "braket" and isinstance(text, (str, bytes)):
        from ray_qalloc.circuits import _decode   # the same UTF-8 check and message as intake
        from ray_qalloc.frontends.braket import translate_qasm

        return translate_qasm(_decode(text))
    return text   # 'cirq': Cirq writes standard OpenQASM


def to_intake(circuit: Any, fmt: str = "qasm", limits: Any = None) -> Any:
    """What ``make_spec(circuit=...)`` takes: a Cirq or Braket circuit converted to a Qiskit
    circuit, framework text translated, anything else as it is."""
    framework = framework_of(circuit)
    if framework == "cirq":
        from ray_qalloc.frontends.cirq import circuit_to_qiskit

        return circuit_to_qiskit(circuit, limits).circuit
    if framework == "braket":
        from ray_qalloc.frontends.braket import circuit_to_qiskit as braket_to_qiskit

        return braket_to_qiskit(circuit, limits)
    return translate_text(circuit, fmt)
