"""Circuit intake: parse untrusted circuit text safely, count its real size, featurise it.

Why this module is paranoid: circuit text comes from tenants and is parsed inside the
allocator's process. Three classic attacks are refused *before* the expensive step:

* ``include "/etc/passwd";`` -- only the two standard libraries may be included, and the
  parsers are never given a search path, so no file is ever opened.
* nested gate definitions (``gate g1 a { g0 a; g0 a; } ... g40 q[0];``) that parse into a
  tiny circuit but expand into 2**40 gates -- sizes are counted over the definition DAG with
  memoisation, multiplying counts instead of materialising the expansion.
* ``qreg q[4000000000];`` -- register sizes are read from the text before the parser
  allocates anything.

The OpenQASM 3 importer materialises (copies) every custom-gate definition at every call
site, so for QASM 3 the definition DAG is also costed on the AST before conversion.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Iterator, NoReturn

from qiskit import QuantumCircuit, qasm2, qpy
from qiskit.circuit import Barrier, ControlFlowOp, ForLoopOp, Instruction
from qiskit.circuit.library.standard_gates import get_standard_gate_name_mapping

from ray_qalloc.config import Limits
from ray_qalloc.exceptions import ForbiddenInclude, InvalidCircuit, InvalidJobSpec, LimitExceeded
from ray_qalloc.gates import BOX, CLIFFORD_GATES, CONTROL_FLOW_BLOCKS, DIRECTIVES, NOT_GATES, ROTATION_GATES

#: 2 added the entanglement features (``ent_*``, ``mps_*``, ``lightcone_max``), the statevector
#: fusion estimate (``fused_blocks``) and the multi-controlled / transpile features; the
#: features of version 1 kept their meaning.
FEATURE_SCHEMA_VERSION: int = 2

#: Gates kept as themselves in the feature vector's per-kind counts (``count_<name>``).
_COUNTED_KINDS: dict[str, tuple[str, ...]] = {
    "count_ccx": ("ccx",),
    "count_cx": ("cx",),
    "count_cz": ("cz",),
    "count_h": ("h",),
    "count_rx": ("rx",),
    "count_ry": ("ry",),
    "count_rz": ("rz",),
    "count_swap": ("swap",),
    "count_t": ("t",),
    "count_u": ("u", "u1", "u2", "u3"),
    "count_x": ("x",),
}

#: Features added in schema 2 (see ``_Walk``): what the MPS bond dimension and the statevector's
#: passes over memory follow, which gate counts and the interaction graph do not tell.
ENTANGLEMENT_FEATURES: tuple[str, ...] = (
    "ent_gates", "ent_cut_max", "mps_chi_log2_max", "mps_chi_log2_mean", "mps_gate_work_log2",
    "mps_sample_work_log2", "lightcone_max", "fused_blocks", "max_gate_qubits", "mc_gate_qubits",
    "nonstandard_count", "basis_cx_estimate",
)

FEATURE_NAMES: tuple[str, ...] = tuple(sorted({
    "bandwidth", "clifford_fraction", "components", "cond_count", "count_other", "cut_max",
    "depth", "interaction_edges", "log2_shots", "max_component_size", "max_degree",
    "mean_degree", "measure_count", "mid_circuit_measure", "multi_qubit_count",
    "non_clifford_count", "num_clbits", "num_qubits", "reset_count", "rotation_count",
    "shots", "size", "t_count", "two_qubit_count", "two_qubit_depth", *_COUNTED_KINDS,
    *ENTANGLEMENT_FEATURES,
}))

_DIRECTIVES: frozenset[str] = DIRECTIVES
_NOT_GATES: frozenset[str] = NOT_GATES
_CONTROL_FLOW: frozenset[str] = CONTROL_FLOW_BLOCKS | {BOX}

_STANDARD: dict[str, Instruction] = {**get_standard_gate_name_mapping()}
#: Leaves that have a definition we must not expand (synthesising a unitary is expensive).
_OPAQUE_LEAVES: frozenset[str] = frozenset({"unitary"})

_ALLOWED_INCLUDES: dict[str, str] = {"qasm2": "qelib1.inc", "qasm3": "stdgates.inc"}
_MAX_NESTING = 256
_MAX_MESSAGE = 300
_DECOMPOSE_GUARD = 200_000
_POW_MAX_QUBITS = 10
_CTRL_WORK_FACTOR = 8
#: The QASM 3 importer deep-copies a custom gate's definition tree at every call site at
#: roughly 20 us per node (measured), so its budget is capped well below max_gates: this
#: bounds the worst case near 4 s, about what the ANTLR parser needs for 1 MB of text.
_QASM3_WORK_CAP = 200_000

_HEADER_FIX = 'start the text with "OPENQASM 2.0;" or "OPENQASM 3.0;".'


@dataclass(frozen=True)
class ParsedCircuit:
    """A circuit that passed intake, with its size measured as if fully expanded."""

    circuit: QuantumCircuit
    source_format: str            # "qasm2" | "qasm3" | "circuit"
    expanded_ops: dict[str, int]  # op name -> count after (virtually) expanding custom gates
    expanded_size: int            # sum of expanded_ops


# ---------------------------------------------------------------------------------------------
# Intake
# ---------------------------------------------------------------------------------------------

def parse_circuit(source: str | bytes | QuantumCircuit, limits: Limits) -> ParsedCircuit:
    """Turn untrusted input into a bounded circuit, or raise a typed IntakeError.

    Checks run cheapest first so that nothing expensive happens to a job that is refused.
    """
    if isinstance(source, QuantumCircuit):
        return _finish(source, "circuit", limits)
    if not isinstance(source, (str, bytes)):
        raise InvalidJobSpec(
            f"circuit: expected OpenQASM text (str or bytes) or a QuantumCircuit, got "
            f"{type(source).__name__}.", field="circuit",
            fix="pass the OpenQASM 2/3 program as a string, or a qiskit QuantumCircuit.")
    text = _decode(source)
    encoded_size = len(source) if isinstance(source, bytes) else len(_encode(text))
    if encoded_size > limits.max_qasm_bytes:
        raise LimitExceeded(
            f"circuit: text is {encoded_size} bytes, more than the limit max_qasm_bytes="
            f"{limits.max_qasm_bytes}.", field="circuit", limit=limits.max_qasm_bytes,
            fix="submit a smaller program (use gate definitions or loops), or raise "
                "limits.max_qasm_bytes.")
    _check_text(text)
    version = _detect_version(text)
    if version == "qasm2":
        _check_qasm2_includes(text)
        _check_qasm2_registers(text, limits)
        circuit = _load_qasm2(text)
    else:
        circuit = _load_qasm3(text, limits)
    return _finish(circuit, version, limits)


def _finish(circuit: QuantumCircuit, source_format: str, limits: Limits) -> ParsedCircuit:
    """Limits that need the parsed circuit, shared by text and QuantumCircuit input."""
    _check_bit_limits(circuit.num_qubits, circuit.num_clbits, limits)
    ops = _expanded_counts(circuit, limits)
    if circuit.parameters:
        names = ", ".join(sorted(p.name for p in circuit.parameters)[:5])
        raise InvalidCircuit(
            f"circuit: has unbound parameters ({names}).", field="circuit",
            fix="bind parameters before submitting (QuantumCircuit.assign_parameters), or "
                "write numeric angles in the OpenQASM text.")
    return ParsedCircuit(circuit=circuit, source_format=source_format, expanded_ops=ops,
                         expanded_size=sum(ops.values()))


def _encode(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidCircuit(f"circuit: text is not valid Unicode ({exc.reason}).", field="circuit",
                             fix="send the program as plain UTF-8 OpenQASM text.") from None


def _decode(source: str | bytes) -> str:
    if isinstance(source, str):
        return source
    try:
        return source.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCircuit(
            f"circuit: bytes are not UTF-8 text (bad byte at offset {exc.start}).",
            field="circuit", fix="send the OpenQASM program as UTF-8 text, not a binary file.") from None


_BINARY_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def _check_text(text: str) -> None:
    """Reject empty and binary input early, with a clearer message than the parser's."""
    if not text.strip():
        raise InvalidCircuit("circuit: text is empty.", field="circuit",
                             fix="send an OpenQASM program, " + _HEADER_FIX)
    if "\x00" in text:
        raise InvalidCircuit("circuit: text contains NUL bytes.", field="circuit",
                             fix="send the OpenQASM program as plain text, not a binary file.")
    bad = _BINARY_RE.search(text)
    if bad:
        raise InvalidCircuit(
            f"circuit: text contains a control character (0x{ord(bad.group()):02x}) at offset "
            f"{bad.start()}; it looks like binary data.", field="circuit",
            fix="send the OpenQASM program as plain text, not a binary file.")


_LEADING_RE = re.compile(r"(?:\s+|//[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_HEADER_RE = re.compile(r"OPENQASM\s+(\d+)(?:\.(\d+))?\s*;", re.A)


def _detect_version(text: str) -> str:
    start = _LEADING_RE.match(text).end()  # type: ignore[union-attr]  # always matches
    match = _HEADER_RE.match(text, start)
    if match is None:
        raise InvalidCircuit("circuit: no OpenQASM version header found.", field="circuit",
                             fix=_HEADER_FIX)
    major = match.group(1)
    if major == "2":
        return "qasm2"
    if major == "3":
        return "qasm3"
    raise InvalidCircuit(f"circuit: OpenQASM version {match.group(0)[8:-1].strip()} is not "
                         "supported.", field="circuit", fix=_HEADER_FIX)


def _strip_line_comments(text: str) -> str:
    """QASM 2 only has ``//`` comments; ``/*`` is not stripped, so hiding text fails closed."""
    return re.sub(r"//[^\n]*", "", text)


_INCLUDE_WORD_RE = re.compile(r"\binclude\b", re.A)
_QASM2_INCLUDE_OK_RE = re.compile(r'include\s*"qelib1\.inc"\s*;', re.A)


def _forbidden_include(what: str, fmt: str, line: int | None = None) -> NoReturn:
    where = f" on line {line}" if line else ""
    allowed = _ALLOWED_INCLUDES[fmt]
    raise ForbiddenInclude(
        f"circuit: include of {what}{where} is not allowed; only \"{allowed}\" may be "
        "included.", field="circuit", allowed=allowed,
        fix=f"paste the gate definitions into the program instead of including a file, and "
            f"include only \"{allowed}\".")


def _check_qasm2_includes(text: str) -> None:
    """Every ``include`` token must be exactly ``include "qelib1.inc";``: anything we cannot
    read with certainty is refused (fail closed), because the parser would open the file."""
    body = _strip_line_comments(text)
    for match in _INCLUDE_WORD_RE.finditer(body):
        if _QASM2_INCLUDE_OK_RE.match(body, match.start()) is None:
            snippet = body[match.start():match.start() + 60].split(";")[0].strip()
            _forbidden_include(repr(snippet[len("include"):].strip()), "qasm2",
                               body.count("\n", 0, match.start()) + 1)


_REG_WORD_RE = re.compile(r"\b(qreg|creg)\b", re.A)
_REG_DECL_RE = re.compile(r"\b(qreg|creg)\s+[A-Za-z_]\w*\s*\[\s*(\d+)\s*\]\s*;", re.A)


def _check_qasm2_registers(text: str, limits: Limits) -> None:
    """Sum register sizes from the text so a huge ``qreg`` is refused before allocation."""
    body = _strip_line_comments(text)
    decls = _REG_DECL_RE.findall(body)
    if len(decls) != len(_REG_WORD_RE.findall(body)):
        raise InvalidCircuit("circuit: a qreg/creg declaration could not be read.", field="circuit",
                             fix="declare registers as `qreg name[SIZE];` with a whole number SIZE.")
    qubits = sum(_size_literal(size) for kind, size in decls if kind == "qreg")
    clbits = sum(_size_literal(size) for kind, size in decls if kind == "creg")
    _check_bit_limits(qubits, clbits, limits)


def _size_literal(digits: str) -> int:
    return int(digits) if len(digits) <= 15 else 10 ** 15


def _check_bit_limits(qubits: int, clbits: int, limits: Limits) -> None:
    if qubits > limits.max_qubits:
        raise LimitExceeded(
            f"circuit: num_qubits={qubits} is more than the limit max_qubits={limits.max_qubits}.",
            field="circuit", limit=limits.max_qubits,
            fix=f"use at most {limits.max_qubits} qubits (remove unused registers), or raise "
                "limits.max_qubits.")
    if clbits > limits.max_clbits:
        raise LimitExceeded(
            f"circuit: num_clbits={clbits} is more than the limit max_clbits={limits.max_clbits}.",
            field="circuit", limit=limits.max_clbits,
            fix=f"use at most {limits.max_clbits} classical bits, or raise limits.max_clbits.")


def _parse_error(exc: BaseException) -> NoReturn:
    """Never let a parser's own exception type escape: callers only know IntakeError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE - 3] + "..."
    line = getattr(exc, "line", None) or getattr(getattr(exc, "span", None), "start_line", None)
    where = f" (line {line})" if line else ""
    raise InvalidCircuit(f"circuit: the program does not parse{where}: {text}", field="circuit",
                         fix="correct the OpenQASM syntax at the reported position.") from None


def _load_qasm2(text: str) -> QuantumCircuit:
    try:
        return qasm2.loads(text, include_path=(),
                           custom_instructions=qasm2.LEGACY_CUSTOM_INSTRUCTIONS)
    except RecursionError:
        raise InvalidCircuit("circuit: the program is nested too deeply to parse.", field="circuit",
                             fix="flatten deeply nested expressions or blocks.") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is the user's input
        _parse_error(exc)


def _load_qasm3(text: str, limits: Limits) -> QuantumCircuit:
    """Parse to an AST, cost it, and only then let the importer materialise it."""
    import openqasm3
    import qiskit_qasm3_import

    try:
        program = openqasm3.parse(text)
    except RecursionError:
        raise InvalidCircuit("circuit: the program is nested too deeply to parse.", field="circuit",
                             fix="flatten deeply nested expressions or blocks.") from None
    except Exception as exc:  # noqa: BLE001
        _parse_error(exc)
    _Qasm3Precheck(limits).run(program.statements)
    _positional_gate_parameters(program.statements)
    try:
        return qiskit_qasm3_import.convert(program)
    except RecursionError:
        raise InvalidCircuit("circuit: the program is nested too deeply to convert.",
                             field="circuit", fix="flatten deeply nested blocks.") from None
    except Exception as exc:  # noqa: BLE001
        _parse_error(exc)


def _positional_gate_parameters(statements: list[Any]) -> None:
    """Rename every custom gate's parameters so that their names sort in their declared order.

    Why: ``qiskit_qasm3_import`` 0.6 binds a call's arguments to a gate definition's parameters
    in the *alphabetical* order of the parameters' names, not by position — ``gate g(b, a) q
    {...}`` called as ``g(0.1, 0.7)`` gets ``b = 0.7``: a tenant's circuit would silently run
    with its angles swapped. Names ``_qalloc_p0000``, ``_qalloc_p0001``, ... sort as declared;
    the body's references (which shadow any global of the same name) follow the rename."""
    import openqasm3.ast as ast

    for stmt in statements:
        if not isinstance(stmt, ast.QuantumGateDefinition) or len(stmt.arguments) < 2:
            continue
        names = {arg.name: f"_qalloc_p{i:04d}" for i, arg in enumerate(stmt.arguments)}
        for arg in stmt.arguments:
            arg.name = names[arg.name]
        _rename_identifiers(stmt.body, names)


def _rename_identifiers(node: Any, names: dict[str, str]) -> None:
    """Rename ``Identifier`` nodes in an AST subtree (iteratively: bodies may be deep)."""
    import dataclasses

    import openqasm3.ast as ast

    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
        elif isinstance(n, ast.Identifier):
            if n.name in names:
                n.name = names[n.name]
        elif dataclasses.is_dataclass(n) and not isinstance(n, type):
            for f in dataclasses.fields(n):
                if f.name != "span":
                    stack.append(getattr(n, f.name))


def _gate_limit(total: int, limits: Limits, what: str = "expands to") -> NoReturn:
    raise LimitExceeded(
        f"circuit: {what} more than {limits.max_gates} operations (at least {total}); the limit "
        f"is max_gates={limits.max_gates}.", field="circuit", limit=limits.max_gates,
        fix="submit a smaller circuit (nested custom gates multiply: each level that calls the "
            "previous one twice doubles the size), or raise limits.max_gates.")


# ---------------------------------------------------------------------------------------------
# QASM 3: costing the AST before the importer copies definitions around
# ---------------------------------------------------------------------------------------------

_STDGATES3: frozenset[str] = frozenset({
    "p", "x", "y", "z", "h", "s", "sdg", "t", "tdg", "sx", "rx", "ry", "rz", "cx", "cy", "cz",
    "cp", "crx", "cry", "crz", "ch", "swap", "ccx", "cswap", "cu", "CX", "phase", "cphase",
    "id", "u1", "u2", "u3", "U", "gphase",
})


class _Qasm3Precheck:
    """Bounds what ``qiskit_qasm3_import`` will build, using only the AST.

    ``work`` approximates the number of instruction objects the importer creates: it copies
    a custom gate's whole definition tree at every call site, and ``inv``/``ctrl`` rebuild it.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.consts: dict[str, int] = {}
        self.registers: dict[str, int] = {}
        self.gates: dict[str, tuple[int, int]] = {}  # name -> (tree nodes, qubits)
        self.qubits = 0
        self.clbits = 0
        self.work = 0

    def run(self, statements: Iterable[Any]) -> None:
        self._block(statements, depth=0)

    def _block(self, statements: Iterable[Any], depth: int) -> None:
        if depth > _MAX_NESTING:
            raise InvalidCircuit(f"circuit: blocks are nested more than {_MAX_NESTING} deep.",
                                 field="circuit", fix="flatten the nested blocks.")
        for node in statements:
            self._statement(node, depth)

    def _statement(self, node: Any, depth: int) -> None:
        from openqasm3 import ast

        if isinstance(node, ast.Include):
            if node.filename != _ALLOWED_INCLUDES["qasm3"]:
                _forbidden_include(repr(node.filename), "qasm3", _line(node))
        elif isinstance(node, ast.ConstantDeclaration):
            value = self._const(node.init_expression)
            if value is not None:
                self.consts[node.identifier.name] = value
        elif isinstance(node, ast.QubitDeclaration):
            size = 1 if node.size is None else self._size(node.size)
            self.registers[node.qubit.name] = size
            self.qubits += size
            _check_bit_limits(self.qubits, self.clbits, self.limits)
        elif isinstance(node, (ast.ClassicalDeclaration, ast.IODeclaration)):
            if isinstance(node.type, ast.BitType):
                self.clbits += 1 if node.type.size is None else self._size(node.type.size)
                _check_bit_limits(self.qubits, self.clbits, self.limits)
        elif isinstance(node, ast.QuantumGateDefinition):
            self._define(node)
        elif isinstance(node, ast.QuantumGate):
            if node.name.name in self.gates or node.modifiers:  # plain calls are cheap
                self._add_work(self._call_cost(node) * self._broadcast(node.qubits))
        elif isinstance(node, (ast.ForInLoop, ast.WhileLoop)):
            self._block(node.block, depth + 1)
        elif isinstance(node, ast.BranchingStatement):
            self._block(node.if_block, depth + 1)
            self._block(node.else_block, depth + 1)
        elif isinstance(node, ast.Box):
            self._block(node.body, depth + 1)
        elif isinstance(node, ast.SwitchStatement):
            for _, block in node.cases:
                self._block(block.statements, depth + 1)
            if node.default is not None:
                self._block(node.default.statements, depth + 1)

    def _define(self, node: Any) -> None:
        from openqasm3 import ast

        nodes = 1
        for stmt in node.body:
            cost = self._call_cost(stmt) if isinstance(stmt, ast.QuantumGate) else 1
            if cost > 1:  # the importer materialises the body once, at the definition
                self._add_work(cost)
            nodes += cost
        self.gates[node.name.name] = (nodes, len(node.qubits))

    def _call_cost(self, node: Any) -> int:
        from openqasm3 import ast

        nodes, qubits = self.gates.get(node.name.name, (1, len(node.qubits)))
        custom = node.name.name in self.gates
        cost = nodes
        for modifier in node.modifiers:
            if modifier.modifier is ast.GateModifierName.pow:
                if custom and qubits > _POW_MAX_QUBITS:
                    raise LimitExceeded(
                        f"circuit: 'pow' modifier on custom gate {node.name.name!r} of {qubits} "
                        f"qubits (limit {_POW_MAX_QUBITS}); it would build a dense matrix.",
                        field="circuit", limit=_POW_MAX_QUBITS,
                        fix="repeat the gate call instead of using 'pow', or use fewer qubits.")
                cost += nodes
            elif modifier.modifier is ast.GateModifierName.inv:
                cost += nodes
            else:
                controls = 1 if modifier.argument is None else max(1, self._const(modifier.argument) or 1)
                qubits += controls
                if custom:
                    cost += _CTRL_WORK_FACTOR * controls * nodes
        return cost

    def _broadcast(self, qubits: Iterable[Any]) -> int:
        """Upper bound on how many calls one statement broadcasts to."""
        from openqasm3 import ast

        widest = 1
        for arg in qubits:
            if isinstance(arg, ast.Identifier):
                widest = max(widest, self.registers.get(arg.name, 1))
            elif isinstance(arg, ast.IndexedIdentifier):
                if any(not isinstance(i, ast.IntegerLiteral) for idx in arg.indices
                       for i in (idx if isinstance(idx, list) else [idx])):
                    widest = max(widest, self.registers.get(arg.name.name, 1))
        return widest

    def _add_work(self, amount: int) -> None:
        self.work += amount
        cap = min(self.limits.max_gates, _QASM3_WORK_CAP)
        if self.work > cap:
            raise LimitExceeded(
                f"circuit: the OpenQASM 3 importer would build more than {cap} operations for "
                f"custom gate definitions and calls (at least {self.work}); the limit is "
                f"min(max_gates={self.limits.max_gates}, {_QASM3_WORK_CAP}).",
                field="circuit", limit=cap,
                fix="use fewer levels of nested custom gates or fewer calls of large custom "
                    "gates (the QASM 3 importer copies a gate's whole definition at each call), "
                    "or submit the program as OpenQASM 2.0, which is counted without copying.")

    def _size(self, expr: Any) -> int:
        value = self._const(expr)
        if value is None or value < 0:
            raise InvalidCircuit("circuit: a register size is not a constant whole number.",
                                 field="circuit",
                                 fix="declare registers with a literal size, e.g. `qubit[5] q;`.")
        return value

    def _const(self, expr: Any) -> int | None:
        """Tiny constant folder: enough for register sizes, nothing clever."""
        from openqasm3 import ast

        if isinstance(expr, ast.IntegerLiteral):
            return expr.value
        if isinstance(expr, ast.Identifier):
            return self.consts.get(expr.name)
        if isinstance(expr, ast.BinaryExpression):
            left, right = self._const(expr.lhs), self._const(expr.rhs)
            if left is None or right is None or max(abs(left), abs(right)) > 10 ** 9:
                return None
            op = expr.op.name
            if op == "+":
                return left + right
            if op == "-":
                return left - right
            if op == "*":
                return left * right
        return None


def _line(node: Any) -> int | None:
    span = getattr(node, "span", None)
    return getattr(span, "start_line", None)


# ---------------------------------------------------------------------------------------------
# Expanded counts over the definition DAG
# ---------------------------------------------------------------------------------------------

class _Expander:
    """Counts operations as if every custom gate were expanded, without expanding.

    Memoised per *definition*, so a definition used 2**40 times is counted once. QASM 2
    gates build their definition lazily and freshly per instance, so they are keyed by the
    parser's per-definition gate table instead of object identity. ``visits`` bounds the
    distinct definitions walked, so even an unknown lazily-defined gate class cannot make
    this loop run forever.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.memo: dict[Any, dict[str, int]] = {}
        self.keepalive: list[Any] = []  # ids in memo keys must not be reused mid-walk
        self.visits = 0

    def circuit(self, circuit: QuantumCircuit, depth: int) -> dict[str, int]:
        if depth > _MAX_NESTING:
            raise LimitExceeded(
                f"circuit: custom gates are nested more than {_MAX_NESTING} levels deep.",
                field="circuit", limit=_MAX_NESTING,
                fix="flatten the gate definitions (fewer levels of gates calling gates).")
        total: dict[str, int] = {}
        running = 0
        for inst in circuit.data:
            counts = self.operation(inst.operation, depth)
            for name, count in counts.items():
                total[name] = total.get(name, 0) + count
                running += count
            if running > self.limits.max_gates:
                _gate_limit(running, self.limits)
        return total

    def operation(self, op: Instruction, depth: int) -> dict[str, int]:
        name = op.name
        if _is_leaf(op):
            return {name: 1}
        if isinstance(op, ControlFlowOp):
            return self._control_flow(op, depth)
        key, anchor = _definition_key(op)
        cached = self.memo.get(key)
        if cached is not None:
            return cached
        self.visits += 1
        if self.visits > self.limits.max_gates:
            _gate_limit(self.visits, self.limits)
        definition = op.definition
        counts = {name: 1} if definition is None else self.circuit(definition, depth + 1)
        self.keepalive.append(anchor if anchor is not None else definition)
        self.memo[key] = counts
        return counts

    def _control_flow(self, op: ControlFlowOp, depth: int) -> dict[str, int]:
        repeat = 1
        if isinstance(op, ForLoopOp):
            indexset = op.params[0]
            try:
                repeat = max(1, len(indexset))
            except TypeError:
                repeat = 1
        total: dict[str, int] = {op.name: 1}
        for block in op.blocks:
            for name, count in self.circuit(block, depth + 1).items():
                total[name] = total.get(name, 0) + count * repeat
        if sum(total.values()) > self.limits.max_gates:
            _gate_limit(sum(total.values()), self.limits)
        return total


def _is_leaf(op: Instruction) -> bool:
    """Standard gates count as themselves, but only if they really are the library class:
    a user gate that merely borrows the name ``h`` is expanded like any other custom gate."""
    name = op.name
    if name == "barrier":
        return isinstance(op, Barrier)
    std = _STANDARD.get(name)
    if std is not None:
        return getattr(op, "base_class", type(op)) is std.base_class
    return name in _OPAQUE_LEAVES


def _definition_key(op: Instruction) -> tuple[Any, Any]:
    gates = getattr(op, "_gates", None)
    if type(op).__name__ == "_DefinedGate" and gates is not None:
        # qiskit.qasm2: one `_gates` table object per `gate` statement, shared by all instances.
        return ("qasm2", op.name, op.num_qubits, id(gates), len(op._bytecode)), gates
    definition = op.definition
    return ("def", op.name, id(definition)), definition


def _expanded_counts(circuit: QuantumCircuit, limits: Limits) -> dict[str, int]:
    try:
        return _Expander(limits).circuit(circuit, 0)
    except RecursionError:
        raise LimitExceeded("circuit: custom gates are nested too deeply to count.", field="circuit",
                            limit=_MAX_NESTING, fix="flatten the gate definitions.") from None
    except (LimitExceeded, InvalidCircuit):
        raise
    except Exception as exc:  # noqa: BLE001 - a broken definition is the user's input
        _parse_error(exc)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

def _flat(circuit: QuantumCircuit, expand: bool) -> Iterator[tuple[str, tuple[int, ...], tuple[int, ...], Any]]:
    """Instructions as (name, qubit indices, clbit indices, params), custom gates inlined one level.

    Standard gates take a fast path that never builds the Python operation object.
    """
    qidx = {bit: i for i, bit in enumerate(circuit.qubits)}
    cidx = {bit: i for i, bit in enumerate(circuit.clbits)}
    for inst in circuit.data:
        name = inst.name
        qs = tuple([qidx[q] for q in inst.qubits])
        cs = tuple([cidx[c] for c in inst.clbits]) if inst.clbits else ()
        if expand and not inst.is_standard_gate() and name not in _NOT_GATES:
            op = inst.operation
            definition = None if _is_leaf(op) or isinstance(op, ControlFlowOp) else op.definition
            if definition is not None and definition.num_qubits == len(qs):
                inner_q = {bit: qs[i] for i, bit in enumerate(definition.qubits)}
                inner_c = {bit: cs[i] for i, bit in enumerate(definition.clbits)}
                for sub in definition.data:
                    yield (sub.name, tuple([inner_q[q] for q in sub.qubits]),
                           tuple([inner_c[c] for c in sub.clbits]), sub.params)
                continue
        yield name, qs, cs, inst.params


# Gate classes for the entanglement tracking (names as Qiskit spells them).
#: Diagonal multi-qubit gates: a qubit in a basis state only adds a phase, so it drops out.
_DIAGONAL_MQ: frozenset[str] = frozenset({"cz", "cp", "cu1", "crz", "ccz", "cs", "csdg", "mcphase", "mcp",
                                          "mcu1", "mcz", "mcrz", "rzz"})
#: Controlled gates whose target operation permutes basis states (X, Y): an idle control
#: leaves a basis-state target in a basis state.
_PERMUTING_CTRL: frozenset[str] = frozenset({"cx", "cy", "ccx", "rccx", "c3x", "c4x", "rcccx", "c3sqrtx",
                                             "mcx", "mcx_gray", "mcx_recursive", "mcx_vchain", "mcy"})
#: Native CX of a gate after decomposition to CX + one-qubit gates (Qiskit's synthesis, rounded);
#: multi-controlled gates of m qubits are costed 8·(m-1) below (linear-depth synthesis).
_CX_OF: dict[str, int] = {"swap": 3, "iswap": 2, "dcx": 2, "ecr": 1, "cx": 1, "cy": 1, "cz": 1, "ch": 2,
                          "cp": 2, "cu1": 2, "crz": 2, "crx": 2, "cry": 2, "cu": 2, "cu3": 2, "csx": 2,
                          "cs": 2, "csdg": 2, "rzz": 2, "rxx": 2, "ryy": 2, "rzx": 2, "xx_minus_yy": 2,
                          "xx_plus_yy": 2, "ccx": 6, "ccz": 6, "cswap": 8, "rccx": 3, "rcccx": 6}
#: Aer fuses runs of gates on at most this many qubits into one pass over the statevector
#: (``fusion_max_qubit``), from ``fusion_threshold`` (14) qubits up.
_FUSION_MAX_QUBITS = 5
_MPS_MAX_LOG2_CHI = 14.0


_CTRL_OF: dict[str, int] = {name: int(getattr(g, "num_ctrl_qubits", 0) or 0) for name, g in _STANDARD.items()}
_POW8: tuple[float, ...] = tuple(8.0 ** v for v in range(int(_MPS_MAX_LOG2_CHI) + 1))


def _controls(name: str, arity: int) -> int:
    """Control qubits of a controlled standard gate (the first operands); 0 if not controlled."""
    n = _CTRL_OF.get(name)
    if n is not None:
        return n
    return arity - 1 if name.startswith("mc") and arity >= 2 else 0


_TOL = 1e-9


@lru_cache(maxsize=4096)
def _matrix_cached(name: str, params: tuple[float, ...]) -> tuple[complex, ...] | None:
    std = _STANDARD.get(name)
    if std is None or name in _NOT_GATES:
        return None
    try:
        gate = std.base_class(*params) if params else std.base_class()
        return tuple(complex(x) for x in gate.to_matrix().ravel())
    except Exception:  # noqa: BLE001 - no matrix (unbound or odd parameters): track nothing
        return None


def _matrix(name: str, params: Any) -> tuple[complex, ...] | None:
    """Row-major matrix of a standard gate (Qiskit's little-endian qubit order), cached."""
    try:
        key = tuple(float(p) for p in params) if params else ()
    except (TypeError, ValueError):
        return None
    return _matrix_cached(name, key)


def _apply_2q(m: tuple[complex, ...], v0: tuple[complex, complex],
              v1: tuple[complex, complex]) -> tuple[tuple[complex, complex], tuple[complex, complex]] | None:
    """A two-qubit gate on |v1>⊗|v0> (index = b0 + 2·b1); its factors if the result is a product."""
    if len(m) != 16:
        return None
    psi = (v0[0] * v1[0], v0[1] * v1[0], v0[0] * v1[1], v0[1] * v1[1])
    out = [m[4 * r] * psi[0] + m[4 * r + 1] * psi[1] + m[4 * r + 2] * psi[2] + m[4 * r + 3] * psi[3]
           for r in range(4)]
    # amplitudes as a 2x2 matrix [b1][b0]: a product state iff its determinant vanishes
    if abs(out[0] * out[3] - out[1] * out[2]) > _TOL:
        return None
    if abs(out[0]) + abs(out[1]) >= abs(out[2]) + abs(out[3]):   # the row b1=0 carries q0's factor
        row, other = (out[0], out[1]), (out[2], out[3])
        pivot = 0 if abs(out[0]) >= abs(out[1]) else 1
        n0 = abs(row[0]) ** 2 + abs(row[1]) ** 2
        a = math.sqrt(n0)
        f0 = (row[0] / a, row[1] / a)
        f1 = (a, other[pivot] / row[pivot] * a)
    else:
        row, other = (out[2], out[3]), (out[0], out[1])
        pivot = 0 if abs(out[2]) >= abs(out[3]) else 1
        n1 = abs(row[0]) ** 2 + abs(row[1]) ** 2
        a = math.sqrt(n1)
        f0 = (row[0] / a, row[1] / a)
        f1 = (other[pivot] / row[pivot] * a, a)
    norm = math.sqrt(abs(f1[0]) ** 2 + abs(f1[1]) ** 2) or 1.0
    return f0, (f1[0] / norm, f1[1] / norm)


def _is_zero(v: tuple[complex, complex] | None) -> bool:
    return v is not None and abs(v[1]) < _TOL


def _is_basis(v: tuple[complex, complex] | None) -> bool:
    return v is not None and (abs(v[0]) < _TOL or abs(v[1]) < _TOL)


def _is_x_eigen(v: tuple[complex, complex] | None) -> bool:
    """|+> or |-> up to a global phase: an X-type target there only kicks a phase back."""
    return v is not None and abs(abs(v[0]) - abs(v[1])) < _TOL and (
        abs(v[0] - v[1]) < 1e-7 or abs(v[0] + v[1]) < 1e-7)


class _Walk:
    """One pass over the instructions: depth, interaction graph, cut profile, counts, and the
    entanglement the circuit can reach.

    Why the entanglement tracking: MPS costs χ³ per gate and χ² per shot, where χ is the bond
    dimension the state actually reaches, and gate counts do not say it: a QFT of |0…0⟩ stays
    a product state (MPS: 30 ms at 23 qubits) while a random circuit of the same size saturates
    χ. The walk keeps, per qubit, whether it is surely in a computational basis state (from
    |0⟩ through X, Z-diagonal gates, idle controls, resets): a controlled gate whose controls
    are all in basis states, or a diagonal gate on fewer than two non-basis qubits, entangles
    nothing. Each remaining ("effective") multi-qubit gate raises a bound on log2 χ of every
    cut it crosses (by 1 for controlled and diagonal gates, whose operator Schmidt rank is 2;
    by 2 otherwise), capped by the qubits on the smaller side; its χ³ over those cuts is the
    MPS gate work, and Σ χ² over the cuts at the end the sampling work. The backward light
    cone (qubits joined through effective gates) bounds the same from the other side.
    ``fused_blocks`` is a greedy estimate of Aer's gate fusion (≤ 5 qubits a block): the number
    of passes a statevector run makes over its 16·2ⁿ bytes, which a multi-controlled gate wider
    than a block always costs on its own.
    """

    def __init__(self, num_qubits: int, num_clbits: int) -> None:
        self.layer = [0] * (num_qubits + num_clbits)
        self.layer2 = [0] * num_qubits
        self.nq = num_qubits
        self.edges: set[tuple[int, int]] = set()
        self.used: set[int] = set()
        self.cut = [0] * (num_qubits + 1)
        self.measured = [False] * num_qubits
        self.mid_measure = False
        self.counts: dict[str, int] = {}
        self.arity: dict[str, int] = {}
        # per qubit: its exact one-qubit state (a, b) while the state is a known product, else None
        self.state: list[tuple[complex, complex] | None] = [(1.0 + 0j, 0j)] * num_qubits
        self.ecut = [0] * (num_qubits + 1)
        self.logchi = [0] * max(num_qubits - 1, 0)
        self.chicap = [min(c + 1, num_qubits - c - 1, int(_MPS_MAX_LOG2_CHI)) for c in range(num_qubits - 1)]
        self.cone = [1 << q for q in range(num_qubits)]
        self.ent_gates = 0
        self.mps_work = 0.0
        self.fused_blocks = 0
        self.block = 0          # qubit mask of the block being fused
        self.max_gate_qubits = 0
        self.mc_gate_qubits = 0
        self.basis_cx = 0

    def add(self, name: str, qs: tuple[int, ...], cs: tuple[int, ...], params: Any = ()) -> None:
        counts = self.counts
        if name in counts:
            counts[name] += 1
        else:
            counts[name] = 1
            self.arity[name] = len(qs)
        if name in _DIRECTIVES:
            return
        layer = self.layer
        wires = qs + tuple([self.nq + c for c in cs]) if cs else qs
        level = 0
        for w in wires:
            if layer[w] > level:
                level = layer[w]
        level += 1
        for w in wires:
            layer[w] = level
        self.used.update(qs)
        measured = self.measured
        if name == "measure" or name == "reset":
            for q in qs:
                if name == "measure":
                    measured[q] = True
                    self.state[q] = None   # collapsed, to an outcome we do not know
                else:
                    self.state[q] = (1.0 + 0j, 0j)
            if self.block:
                self.fused_blocks += 1
                self.block = 0
            return
        if not self.mid_measure:
            for q in qs:
                if measured[q]:
                    self.mid_measure = True
        k = len(qs)
        # Aer's fusion, greedily: extend the current block while it spans <= 5 qubits
        mask = 0
        for q in qs:
            mask |= 1 << q
        if k > self.max_gate_qubits:
            self.max_gate_qubits = k
        if k > _FUSION_MAX_QUBITS:      # a pass of its own
            self.fused_blocks += 2 if self.block else 1
            self.block = 0
        else:
            merged = self.block | mask
            if merged.bit_count() > _FUSION_MAX_QUBITS:
                self.fused_blocks += 1
                merged = mask
            self.block = merged
        if k >= 2:
            self._entangling(qs)
            self._track(name, qs, k, params)
        elif k == 1:
            v = self.state[qs[0]]
            if v is not None:
                m = _matrix(name, params)
                self.state[qs[0]] = None if m is None else (m[0] * v[0] + m[1] * v[1], m[2] * v[0] + m[3] * v[1])

    def _track(self, name: str, qs: tuple[int, ...], k: int, params: Any) -> None:
        """Entanglement bookkeeping of one multi-qubit gate (see the class docstring)."""
        state = self.state
        if k >= 3:
            self.mc_gate_qubits += k
        self.basis_cx += _CX_OF.get(name, 8 * (k - 1) if k >= 3 else 3)
        if k == 2 and state[qs[0]] is not None and state[qs[1]] is not None:
            m = _matrix(name, params)
            if m is not None:
                pair = _apply_2q(m, state[qs[0]], state[qs[1]])  # type: ignore[arg-type]
                if pair is not None:     # still a product state: nothing entangled
                    state[qs[0]], state[qs[1]] = pair
                    return
        nc = _controls(name, k)
        if 0 < nc < k and any(_is_zero(state[q]) for q in qs[:nc]):
            return                       # a control surely |0>: the gate is the identity
        if name in _DIAGONAL_MQ:
            live = [q for q in qs if not _is_basis(state[q])]
            if len(live) < 2:            # a basis-state qubit only adds a phase
                for q in live:
                    state[q] = None
                return
            for q in qs:
                state[q] = None
            self._effective(live, 1)
            return
        if name in _PERMUTING_CTRL and nc == k - 1 and _is_x_eigen(state[qs[-1]]):
            for q in qs[:nc]:            # phase kickback on the controls, nothing entangled
                state[q] = None if state[q] is not None and not _is_basis(state[q]) else state[q]
            return
        for q in qs:
            state[q] = None
        self._effective(list(qs), 1 if 0 < nc < k else 2)

    def _effective(self, active: list[int], rank_log2: int) -> None:
        self.ent_gates += 1
        lo, hi = min(active), max(active)
        self.ecut[lo + 1] += 1
        self.ecut[hi + 1] -= 1
        logchi, cap, pow8 = self.logchi, self.chicap, _POW8
        work = 0.0
        for c in range(lo, hi):
            v = logchi[c] + rank_log2
            if v > cap[c]:
                v = cap[c]
            logchi[c] = v
            work += pow8[v]
        self.mps_work += work
        cone = self.cone
        joined = 0
        for q in active:
            joined |= cone[q]
        for q in active:
            cone[q] = joined

    def _entangling(self, qs: tuple[int, ...]) -> None:
        layer2 = self.layer2
        level = max([layer2[q] for q in qs]) + 1
        for q in qs:
            layer2[q] = level
        if len(qs) == 2:
            a, b = qs
            self.edges.add((a, b) if a < b else (b, a))
        else:
            for i, a in enumerate(qs):
                for b in qs[i + 1:]:
                    self.edges.add((a, b) if a < b else (b, a))
        lo, hi = min(qs), max(qs)
        self.cut[lo + 1] += 1
        self.cut[hi + 1] -= 1

    def graph_features(self) -> dict[str, float]:
        degree: dict[int, int] = {}
        parent = {q: q for q in self.used}

        def find(q: int) -> int:
            while parent[q] != q:
                parent[q] = parent[parent[q]]
                q = parent[q]
            return q

        for a, b in self.edges:
            degree[a] = degree.get(a, 0) + 1
            degree[b] = degree.get(b, 0) + 1
            parent.setdefault(a, a)
            parent.setdefault(b, b)
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb
        sizes: dict[int, int] = {}
        for q in parent:
            root = find(q)
            sizes[root] = sizes.get(root, 0) + 1
        running, cut_max = 0, 0
        for delta in self.cut:
            running += delta
            cut_max = max(cut_max, running)
        used = len(parent)
        return {
            "interaction_edges": float(len(self.edges)),
            "max_degree": float(max(degree.values(), default=0)),
            "mean_degree": 2.0 * len(self.edges) / used if used else 0.0,
            "components": float(len(sizes)),
            "max_component_size": float(max(sizes.values(), default=0)),
            "bandwidth": float(max((b - a for a, b in self.edges), default=0)),
            "cut_max": float(cut_max),
            "depth": float(max(self.layer, default=0)),
            "two_qubit_depth": float(max(self.layer2, default=0)),
            "mid_circuit_measure": 1.0 if self.mid_measure else 0.0,
            **self.entanglement_features(),
        }

    def entanglement_features(self) -> dict[str, float]:
        running, ent_cut_max = 0, 0
        for delta in self.ecut:
            running += delta
            ent_cut_max = max(ent_cut_max, running)
        logchi = self.logchi
        sample = sum(4.0 ** v for v in logchi) if logchi else 1.0
        return {
            "ent_gates": float(self.ent_gates),
            "ent_cut_max": float(ent_cut_max),
            "mps_chi_log2_max": float(max(logchi, default=0.0)),
            "mps_chi_log2_mean": float(sum(logchi) / len(logchi)) if logchi else 0.0,
            "mps_gate_work_log2": math.log2(1.0 + self.mps_work),
            "mps_sample_work_log2": math.log2(max(sample, 1.0)),
            "lightcone_max": float(max((c.bit_count() for c in self.cone), default=0)),
            "fused_blocks": float(self.fused_blocks + (1 if self.block else 0)),
            "max_gate_qubits": float(self.max_gate_qubits),
            "mc_gate_qubits": float(self.mc_gate_qubits),
            "basis_cx_estimate": float(self.basis_cx),
        }


def circuit_features(circuit: QuantumCircuit, *, shots: int,
                     op_counts: dict[str, int] | None = None) -> dict[str, float]:
    """Fixed-schema numbers the cost model learns from; one pass, cheap enough for intake.

    ``op_counts`` (expanded counts from parse_circuit) wins for counts, because top-level
    instructions may be custom gates. Measurements and resets are taken as the larger of the
    two sources, because intake may append ``measure_all`` after parsing.
    """
    expand = op_counts is not None and sum(op_counts.values()) <= _DECOMPOSE_GUARD
    walk = _Walk(circuit.num_qubits, circuit.num_clbits)
    add = walk.add
    for name, qs, cs, params in _flat(circuit, expand):
        add(name, qs, cs, params)
    counts = dict(walk.counts) if op_counts is None else dict(op_counts)
    for name in ("measure", "reset"):
        counts[name] = max(counts.get(name, 0), walk.counts.get(name, 0))
    feats = _count_features(counts, walk.arity)
    feats.update(walk.graph_features())
    # top-level operations no Aer method runs as they are: the run pays a transpile for them
    feats["nonstandard_count"] = float(sum(
        1 for inst in circuit.data
        if not inst.is_standard_gate() and inst.name not in _NOT_GATES and inst.name not in _CONTROL_FLOW))
    cond = sum(c for n, c in counts.items() if n in _CONTROL_FLOW)
    feats.update({
        "num_qubits": float(circuit.num_qubits),
        "num_clbits": float(circuit.num_clbits),
        "shots": float(shots),
        "log2_shots": math.log2(shots) if shots > 0 else 0.0,
        "cond_count": float(max(cond, sum(c for n, c in walk.counts.items() if n in _CONTROL_FLOW))),
    })
    return {name: float(feats.get(name, 0.0)) for name in FEATURE_NAMES}


def _arity(name: str, seen: dict[str, int]) -> int:
    std = _STANDARD.get(name)
    return std.num_qubits if std is not None else seen.get(name, 1)


def _count_features(counts: dict[str, int], seen_arity: dict[str, int]) -> dict[str, float]:
    gate_items = [(n, c) for n, c in counts.items() if n not in _NOT_GATES and n not in _CONTROL_FLOW]
    gates = sum(c for _, c in gate_items)
    clifford = sum(c for n, c in gate_items if n in CLIFFORD_GATES)
    feats: dict[str, float] = {
        "size": float(gates + counts.get("reset", 0)),
        "measure_count": float(counts.get("measure", 0)),
        "reset_count": float(counts.get("reset", 0)),
        "clifford_fraction": clifford / gates if gates else 1.0,
        "non_clifford_count": float(gates - clifford),
        "t_count": float(counts.get("t", 0) + counts.get("tdg", 0)),
        "rotation_count": float(sum(c for n, c in gate_items if n in ROTATION_GATES)),
        "two_qubit_count": float(sum(c for n, c in gate_items if _arity(n, seen_arity) == 2)),
        "multi_qubit_count": float(sum(c for n, c in gate_items if _arity(n, seen_arity) >= 3)),
    }
    named = 0
    for feature, names in _COUNTED_KINDS.items():
        value = sum(counts.get(n, 0) for n in names)
        feats[feature] = float(value)
        named += value
    feats["count_other"] = float(gates - named)
    return feats


def feature_vector(features: dict[str, float]) -> list[float]:
    """Features in FEATURE_NAMES order, so models never depend on dict ordering."""
    return [float(features.get(name, 0.0)) for name in FEATURE_NAMES]


# ---------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------

def circuit_to_bytes(circuit: QuantumCircuit) -> bytes:
    """QPY, because it round-trips everything qiskit can represent (pickle is not safe to load)."""
    buffer = io.BytesIO()
    qpy.dump(circuit, buffer)
    return buffer.getvalue()


def circuit_from_bytes(data: bytes) -> QuantumCircuit:
    """Inverse of circuit_to_bytes; exactly one circuit is expected."""
    circuits = qpy.load(io.BytesIO(data))
    if len(circuits) != 1:
        raise InvalidCircuit(f"circuit: QPY data holds {len(circuits)} circuits, expected 1.",
                             field="circuit", fix="serialise one circuit per job.")
    return circuits[0]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Job payload: what the store keeps and the backend runs
# ---------------------------------------------------------------------------------------------

_PAYLOAD_SEP = b"\0"


def encode_payload(source: str | bytes | QuantumCircuit, parsed: ParsedCircuit) -> bytes:
    """The bytes a job carries from intake to its backend.

    OpenQASM input is kept as its (already validated, at most ``max_qasm_bytes``) text: QPY
    writes every custom-gate instance's definition in full, so a 1 kB nested program within
    the gate limit would serialise to hundreds of MB. A QuantumCircuit is kept as QPY.
    """
    if parsed.source_format in ("qasm2", "qasm3") and not isinstance(source, QuantumCircuit):
        text = source if isinstance(source, bytes) else _encode(source)
        return parsed.source_format.encode() + _PAYLOAD_SEP + text
    return b"qpy" + _PAYLOAD_SEP + circuit_to_bytes(parsed.circuit)


def decode_payload(data: bytes) -> QuantumCircuit:
    """Inverse of encode_payload, with the measurements intake promised (``ensure_measured``)."""
    fmt, _, body = data.partition(_PAYLOAD_SEP)
    if fmt == b"opts":   # a job with run options (ray_qalloc.runopts): the circuit is inside
        from ray_qalloc.runopts import split_payload

        return decode_payload(split_payload(data)[0])
    if fmt == b"qpy":
        circuit = circuit_from_bytes(body)
    elif fmt == b"qasm2":
        circuit = _load_qasm2(body.decode("utf-8"))
    elif fmt == b"qasm3":
        circuit = _load_qasm3(body.decode("utf-8"), Limits(max_gates=2**62))
    else:
        raise InvalidCircuit(f"circuit: unknown payload format {fmt[:16]!r}.", field="circuit",
                             fix="submit jobs through ray_qalloc intake.")
    return ensure_measured(circuit)


def has_measurement(circuit: QuantumCircuit) -> bool:
    """True if any measurement exists, control-flow blocks included."""
    for inst in circuit.data:
        op = inst.operation
        if op.name == "measure":
            return True
        for block in getattr(op, "blocks", ()):
            if has_measurement(block):
                return True
    return False


def ensure_measured(circuit: QuantumCircuit) -> QuantumCircuit:
    """A circuit without any measurement measures all its qubits into a new register.

    Why: a job without measurements would return no counts at all; measuring everything is
    what users of samplers expect (MQT Bench's qaoa, for one, has no measurements).
    """
    if has_measurement(circuit):
        return circuit
    # Share the instructions instead of QuantumCircuit.copy(): a deep copy of nested custom
    # definitions costs time proportional to their full expansion.
    measured = circuit.copy_empty_like()
    for inst in circuit.data:
        measured._append(inst)
    measured.measure_all(add_bits=True)
    return measured
