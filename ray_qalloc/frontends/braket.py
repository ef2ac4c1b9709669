"""Amazon Braket circuits and Braket's OpenQASM 3 into the Qiskit circuits intake runs.

Why through text: a Braket ``Circuit`` and the OpenQASM a Braket user sends over HTTP go the
same way — Braket's own serialiser (``Circuit.to_ir("OPENQASM")``) writes the program, this
module turns its Braket dialect into standard OpenQASM 3, and intake's paranoid parser
(``ray_qalloc.circuits.parse_circuit``: no includes but ``stdgates.inc``, size limits,
definition costing) reads it. One converter, tested once for both.

The dialect: Braket names gates its own way (``cnot``, ``phaseshift``, ``si``, ``v``, ``xy``,
``gpi``, ...). Each is defined here, once, as an exact OpenQASM 3 gate over ``stdgates.inc``
(the global phase included, so ``ctrl @`` modifiers stay right), and the definitions are
put in front of the program. ``#pragma braket`` lines ask for what counts cannot give
(result types, noise, verbatim boxes, ``unitary`` matrices) and are refused by name.

Bit order: Braket's counts list the measured qubits in measurement order, the first
leftmost. ``circuit_to_qiskit`` builds a circuit whose Qiskit counts already read that way.
Text over HTTP comes back in Qiskit's order (classical bit 0 rightmost); see
``ray_qalloc.frontends.framework_counts``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ray_qalloc.exceptions import InvalidCircuit

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

#: Braket gate -> exact OpenQASM 3 definition over stdgates.inc (Braket's matrices, with the
#: first target the most significant qubit; checked against ``Gate.to_matrix`` in the tests).
#: Parameters of multi-parameter gates are named p0, p1, ...: qiskit_qasm3_import binds a
#: definition's parameters in the alphabetical order of their names, not their positions.
BRAKET_GATES: dict[str, str] = {
    "i": "gate i a { U(0, 0, 0) a; }",
    "cnot": "gate cnot a, b { cx a, b; }",
    "ccnot": "gate ccnot a, b, c { ccx a, b, c; }",
    "si": "gate si a { sdg a; }",
    "ti": "gate ti a { tdg a; }",
    "v": "gate v a { sx a; }",
    "vi": "gate vi a { inv @ sx a; }",
    "cv": "gate cv a, b { ctrl @ sx a, b; }",
    "phaseshift": "gate phaseshift(l) a { p(l) a; }",
    "cphaseshift": "gate cphaseshift(l) a, b { cp(l) a, b; }",
    "cphaseshift00": "gate cphaseshift00(l) a, b { x a; x b; cp(l) a, b; x a; x b; }",
    "cphaseshift01": "gate cphaseshift01(l) a, b { x a; cp(l) a, b; x a; }",
    "cphaseshift10": "gate cphaseshift10(l) a, b { x b; cp(l) a, b; x b; }",
    "iswap": "gate iswap a, b { s a; s b; h a; cx a, b; cx b, a; h b; }",
    "pswap": "gate pswap(t) a, b { swap a, b; p(t) a; p(t) b; cp(-2 * t) a, b; }",
    "xx": "gate xx(t) a, b { h a; h b; cx a, b; rz(t) b; cx a, b; h a; h b; }",
    "yy": "gate yy(t) a, b { rx(pi / 2) a; rx(pi / 2) b; cx a, b; rz(t) b; cx a, b; rx(-pi / 2) a; rx(-pi / 2) b; }",
    "zz": "gate zz(t) a, b { cx a, b; rz(t) b; cx a, b; }",
    "xy": "gate xy(t) a, b { xx(-t / 2) a, b; yy(-t / 2) a, b; }",
    "ecr": "gate ecr a, b { s a; sx b; cx a, b; x a; gphase(-pi / 4); }",
    "gpi": "gate gpi(f) a { x a; rz(2 * f) a; }",
    "gpi2": "gate gpi2(f) a { rz(-f) a; rx(pi / 2) a; rz(f) a; }",
    "prx": "gate prx(p0, p1) a { rz(-p1) a; rx(p0) a; rz(p1) a; }",
    "ms": "gate ms(p0, p1, p2) a, b { rz(-p0) a; rz(-p1) b; xx(p2) a, b; rz(p0) a; rz(p1) b; }",
}
# Definitions that use others come after them.
_ORDER = ("xx", "yy")

_PRAGMA_RE = re.compile(r"^[ \t]*#pragma[ \t]+braket\b([^\n]*)$", re.M)
_HEADER_RE = re.compile(r"OPENQASM\s+3(?:\.\d+)?\s*;", re.A)
_INCLUDE_RE = re.compile(r"\binclude\b", re.A)
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.A)

_PRAGMA_FIX = {
    "result": "ray-qalloc returns measurement counts: remove the result types and measure the qubits "
              "(a Braket circuit without measurements is measured on every qubit).",
    "noise": "ray-qalloc runs ideal circuits on simulators and real noise on QPUs: remove the noise "
             "channels (choose a noisy backend with intent='quantum' instead).",
    "verbatim": "the allocator compiles every circuit for the backend it chooses: remove the verbatim "
                "box, or run it on Braket directly.",
    "unitary": "decompose the unitary into named gates before submitting.",
}


def translate_qasm(text: str) -> str:
    """Braket's OpenQASM 3 as standard OpenQASM 3 over ``stdgates.inc``.

    The program itself is not changed: the definitions of the Braket gates it names are put
    after its header (only those it names, so a program that defines its own ``cnot`` keeps
    it), and ``#pragma braket`` asking for anything counts cannot express is refused."""
    if not isinstance(text, str):
        raise InvalidCircuit(f"circuit: Braket OpenQASM must be text, got {type(text).__name__}.",
                             field="circuit", fix="pass the program as a string.")
    pragma = _PRAGMA_RE.search(text)
    if pragma is not None:
        words = pragma.group(1).split()
        what = words[0] if words else ""
        kind = "unitary" if what.startswith("unitary") else what
        line = text.count("\n", 0, pragma.start()) + 1
        raise InvalidCircuit(
            f"circuit: '#pragma braket {' '.join(words)[:60]}' on line {line} cannot be converted.",
            field="circuit",
            fix=_PRAGMA_FIX.get(kind, "remove the pragma; only plain gates and measurements convert."))
    if _INCLUDE_RE.search(text):
        raise InvalidCircuit("circuit: Braket OpenQASM with an include cannot be converted.", field="circuit",
                             fix="Braket programs need no include: remove it (the standard gates and "
                                 "Braket's own are known).")
    header = _HEADER_RE.search(text)
    if header is None:
        raise InvalidCircuit("circuit: Braket OpenQASM must start with 'OPENQASM 3.0;'.", field="circuit",
                             fix="send the program as Braket writes it (Circuit.to_ir('OPENQASM').source).")
    names = set(_WORD_RE.findall(text))
    defined = {m.group(1) for m in re.finditer(r"\bgate\s+([A-Za-z_]\w*)", text)}
    wanted = {g for g in BRAKET_GATES if g in names and g not in defined}
    if "xy" in wanted or "ms" in wanted:
        wanted |= {"xx", "yy"} - defined if "xy" in wanted else {"xx"} - defined
    ordered = [g for g in _ORDER if g in wanted] + sorted(g for g in wanted if g not in _ORDER)
    prelude = '\ninclude "stdgates.inc";\n' + "".join(BRAKET_GATES[g] + "\n" for g in ordered)
    return text[:header.end()] + prelude + text[header.end():]


def _relabelled(circuit: Any) -> Any:
    """The circuit on qubits 0..n-1 (Braket allows any labels; intake counts width by the
    largest), keeping measurement order."""
    from braket.circuits import Circuit

    qubits = sorted(int(q) for q in circuit.qubits)
    if qubits == list(range(len(qubits))):
        return circuit
    mapping = {q: i for i, q in enumerate(qubits)}
    return Circuit().add_circuit(circuit, target_mapping=mapping)


def circuit_to_qasm(circuit: Any) -> str:
    """A Braket ``Circuit`` as Braket's OpenQASM 3, on contiguous qubits."""
    if getattr(circuit, "parameters", None):
        names = ", ".join(sorted(str(p) for p in circuit.parameters)[:5])
        raise InvalidCircuit(f"circuit: the Braket circuit has free parameters ({names}).", field="circuit",
                             fix="bind them first: circuit.make_bound_circuit({'name': value, ...}).")
    if getattr(circuit, "result_types", None):
        raise InvalidCircuit("circuit: the Braket circuit has result types "
                             f"({', '.join(sorted({type(r).__name__ for r in circuit.result_types}))}).",
                             field="circuit", fix=_PRAGMA_FIX["result"])
    try:
        return _relabelled(circuit).to_ir("OPENQASM").source
    except Exception as exc:  # noqa: BLE001 - Braket's refusal is the user's input
        raise InvalidCircuit(f"circuit: Braket cannot serialise this circuit: {exc}", field="circuit",
                             fix="use Braket's standard gates and measurements.") from None


def circuit_to_qiskit(circuit: Any, limits: Any = None) -> "QuantumCircuit":
    """A Braket ``Circuit`` as a Qiskit circuit whose counts read in Braket's order."""
    from ray_qalloc.frontends.bits import framework_order, parse_trusted

    qc = parse_trusted(translate_qasm(circuit_to_qasm(circuit)), limits)
    return framework_order(qc)
