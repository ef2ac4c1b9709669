"""Intake of untrusted circuits: every refusal is typed and explained, every bomb is cheap."""

from __future__ import annotations

import builtins
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qiskit import QuantumCircuit, qasm2
from qiskit.circuit import Gate, Parameter
from qiskit.circuit.library import QFTGate

from ray_qalloc.circuits import (CLIFFORD_GATES, FEATURE_NAMES, FEATURE_SCHEMA_VERSION, ParsedCircuit,
                                 circuit_features, circuit_from_bytes, circuit_to_bytes,
                                 decode_payload, feature_vector, parse_circuit)
from ray_qalloc.config import Limits
from ray_qalloc.exceptions import (ForbiddenInclude, IntakeError, InvalidCircuit, InvalidJobSpec,
                                   LimitExceeded)
from ray_qalloc.jobs import make_spec, prepare_job

LIMITS = Limits()
Q2 = 'OPENQASM 2.0;\ninclude "qelib1.inc";\n'
Q3 = 'OPENQASM 3.0;\ninclude "stdgates.inc";\n'


def ghz_qasm2(n: int) -> str:
    body = "".join(f"cx q[{i}],q[{i + 1}];\n" for i in range(n - 1))
    return f"{Q2}qreg q[{n}];\ncreg c[{n}];\nh q[0];\n{body}measure q -> c;\n"


def ghz_circuit(n: int, measure: bool = True) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    if measure:
        qc.measure_all()
    return qc


def bomb(levels: int, version: int = 2) -> str:
    """``g_k`` calls ``g_{k-1}`` twice: 2**(levels+1) x gates from a few hundred bytes."""
    head = f"{Q2}qreg q[1];\n" if version == 2 else f"{Q3}qubit[1] q;\n"
    defs = "gate g0 a { x a; x a; }\n" + "".join(
        f"gate g{i} a {{ g{i - 1} a; g{i - 1} a; }}\n" for i in range(1, levels + 1))
    return f"{head}{defs}g{levels} q[0];\n"


def assert_refusal(exc: IntakeError, *words: str) -> None:
    text = str(exc)
    assert "To fix" in text, text
    assert exc.field == "circuit", exc.field
    for word in words:
        assert word in text, (word, text)


# --------------------------------------------------------------------------------------------
# Accepted inputs
# --------------------------------------------------------------------------------------------

QASM3_PROGRAM = f"""{Q3}qubit[3] q;
bit[3] c;
gate g(t) a, b {{ crx(t) a, b; h a; }}
for int i in [0:2:10] {{ h q[0]; }}
g(0.5) q[0], q[1];
c[0] = measure q[0];
if (c[0]) {{ x q[2]; }} else {{ y q[2]; }}
c = measure q;
"""


@pytest.mark.parametrize("source, fmt, ops", [
    (ghz_qasm2(3), "qasm2", {"h": 1, "cx": 2, "measure": 3}),
    (ghz_qasm2(3).encode(), "qasm2", {"h": 1, "cx": 2, "measure": 3}),
    ("// leading comment\n" + ghz_qasm2(2), "qasm2", {"h": 1, "cx": 1, "measure": 2}),
    (f"{Q3}qubit[2] q;\nbit[2] c;\nh q[0];\ncx q[0], q[1];\nc = measure q;\n", "qasm3",
     {"h": 1, "cx": 1, "measure": 2}),
    # for-loop [0:2:10] runs 6 times; g expands to crx + h; if/else counts both branches.
    (QASM3_PROGRAM, "qasm3",
     {"for_loop": 1, "h": 7, "crx": 1, "measure": 4, "if_else": 1, "x": 1, "y": 1}),
    (ghz_circuit(3), "circuit", {"h": 1, "cx": 2, "barrier": 1, "measure": 3}),
])
def test_valid_inputs(source: Any, fmt: str, ops: dict[str, int]) -> None:
    parsed = parse_circuit(source, LIMITS)
    assert isinstance(parsed, ParsedCircuit)
    assert parsed.source_format == fmt
    assert parsed.expanded_ops == ops
    assert parsed.expanded_size == sum(ops.values())


def test_custom_gates_are_counted_expanded() -> None:
    text = f"{Q2}qreg q[3];\ngate pair a, b {{ h a; cx a, b; }}\ngate quad a, b, c {{ pair a, b; pair b, c; t c; }}\nquad q[0], q[1], q[2];\nquad q[2], q[1], q[0];\n"
    parsed = parse_circuit(text, LIMITS)
    assert parsed.expanded_ops == {"h": 4, "cx": 4, "t": 2}
    feats = circuit_features(parsed.circuit, shots=100, op_counts=parsed.expanded_ops)
    assert feats["size"] == 10 and feats["two_qubit_count"] == 4 and feats["t_count"] == 2
    assert feats["clifford_fraction"] == pytest.approx(0.8)
    assert feats["interaction_edges"] == 2  # quad inlined one level: pair(0,1), pair(1,2)
    top = circuit_features(parsed.circuit, shots=100)  # no expansion: quad is one 3-qubit op
    assert top["interaction_edges"] == 3 and top["multi_qubit_count"] == 2


def test_user_gate_borrowing_a_standard_name_is_expanded() -> None:
    """A gate merely *named* h must not hide its definition from the counter."""
    inner = QuantumCircuit(1)
    for _ in range(5):
        inner.x(0)
    fake_h = Gate("h", 1, [])
    fake_h.definition = inner
    qc = QuantumCircuit(1)
    qc.append(fake_h, [0])
    assert parse_circuit(qc, LIMITS).expanded_ops == {"x": 5}


def test_nested_bomb_that_fits_is_counted_without_expansion() -> None:
    parsed = parse_circuit(bomb(19), LIMITS)  # 2**20 gates, counted from 20 definitions
    assert parsed.expanded_ops == {"x": 2 ** 20}


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

_rng = random.Random(1234)
GARBAGE = bytes(_rng.getrandbits(8) for _ in range(256))


@pytest.mark.parametrize("source, limits, error, words", [
    (42, LIMITS, InvalidJobSpec, ["int", "QuantumCircuit"]),
    ({"qasm": "x"}, LIMITS, InvalidJobSpec, ["dict"]),
    ([ghz_qasm2(2)], LIMITS, InvalidJobSpec, ["list"]),
    (None, LIMITS, InvalidJobSpec, ["NoneType"]),
    (b"\xff\xfe\x00OPENQASM", LIMITS, InvalidCircuit, ["UTF-8"]),
    (GARBAGE, LIMITS, InvalidCircuit, []),
    ("OPENQASM 2.0;\x00qreg q[1];", LIMITS, InvalidCircuit, ["NUL"]),
    ("OPENQASM 2.0;\x01\x02qreg q[1];", LIMITS, InvalidCircuit, ["binary"]),
    ("", LIMITS, InvalidCircuit, ["empty", "OPENQASM 2.0;"]),
    ("   \n\t ", LIMITS, InvalidCircuit, ["empty"]),
    ("qreg q[1];\nh q[0];", LIMITS, InvalidCircuit, ["header", "OPENQASM 2.0;", "OPENQASM 3.0;"]),
    ("OPENQASM 4.0;\nqubit q;", LIMITS, InvalidCircuit, ["not supported"]),
    ("x" * 101, Limits(max_qasm_bytes=100), LimitExceeded, ["max_qasm_bytes=100", "101 bytes"]),
    (ghz_qasm2(5), Limits(max_qubits=4), LimitExceeded, ["num_qubits=5", "max_qubits=4"]),
    (ghz_qasm2(5), Limits(max_clbits=4), LimitExceeded, ["num_clbits=5", "max_clbits=4"]),
    (f"{Q2}qreg q[4000000000];", LIMITS, LimitExceeded, ["num_qubits=4000000000"]),
    (f"{Q2}qreg q[1];\ncreg c[99999999999999999999999];", LIMITS, LimitExceeded, ["max_clbits"]),
    (f"{Q3}qubit[4000000000] q;", LIMITS, LimitExceeded, ["max_qubits"]),
    (f"{Q3}const int n = 100000; qubit[n * n] q;", LIMITS, LimitExceeded, ["max_qubits"]),
    (ghz_circuit(6), Limits(max_qubits=5), LimitExceeded, ["num_qubits=6"]),
    (ghz_circuit(3), Limits(max_gates=5), LimitExceeded, ["max_gates=5"]),
    (bomb(20), Limits(max_gates=1000), LimitExceeded, ["max_gates=1000"]),
    (bomb(20, 3), Limits(max_gates=1000), LimitExceeded, ["max_gates=1000"]),
    (f"{Q3}qubit[1] q;\nfor int i in [0:9999999] {{ x q[0]; }}", LIMITS, LimitExceeded, ["max_gates"]),
    (f"{Q2}qreg q[1];\nh q[0]\nx q[0];", LIMITS, InvalidCircuit, ["does not parse"]),
    (f"{Q2}qreg q[1];\nfoo q[0];", LIMITS, InvalidCircuit, ["does not parse"]),
    (f"{Q3}qubit[1] q;\nh q[0]\nx q[0];", LIMITS, InvalidCircuit, ["does not parse"]),
    (f"{Q3}qubit[1] q;\nnotagate q[0];", LIMITS, InvalidCircuit, ["does not parse"]),
    (f"{Q3}qubit[1] q;\ninput float theta;\nrx(theta) q[0];", LIMITS, InvalidCircuit,
     ["bind parameters"]),
    (f"{Q2}qreg q[1];\nopaque o q;\nu3(1,2,3) q[0];\nrx(" + "(" * 100 + "1" + ")" * 99 + " q[0];",
     LIMITS, InvalidCircuit, ["does not parse"]),
], ids=lambda v: type(v).__name__ if not isinstance(v, (str, bytes)) else None)
def test_refusals(source: Any, limits: Limits, error: type[IntakeError], words: list[str]) -> None:
    with pytest.raises(error) as info:
        parse_circuit(source, limits)
    assert type(info.value) is error
    assert_refusal(info.value, "circuit", *words)


def test_unbound_parameters_in_circuit() -> None:
    qc = QuantumCircuit(1)
    qc.rx(Parameter("theta"), 0)
    with pytest.raises(InvalidCircuit) as info:
        parse_circuit(qc, LIMITS)
    assert_refusal(info.value, "theta", "bind parameters")
    bound = qc.assign_parameters([0.3])
    assert parse_circuit(bound, LIMITS).expanded_ops == {"rx": 1}


def test_oversize_text_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("parser must not run")
    text = ghz_qasm2(3)
    # exactly at the limit is fine
    assert parse_circuit(text, Limits(max_qasm_bytes=len(text.encode()))).source_format == "qasm2"
    monkeypatch.setattr(qasm2, "loads", boom)
    with pytest.raises(LimitExceeded) as info:
        parse_circuit(text, Limits(max_qasm_bytes=len(text.encode()) - 1))
    assert_refusal(info.value, "max_qasm_bytes")
    with pytest.raises(LimitExceeded):  # multi-byte characters count as bytes, not characters
        parse_circuit(text + "// é", Limits(max_qasm_bytes=len(text) + 4))
    with pytest.raises(LimitExceeded):
        parse_circuit((text + "// é").encode(), Limits(max_qasm_bytes=len(text) + 4))


@pytest.mark.parametrize("levels, version, word", [
    (40, 2, "max_gates"), (40, 3, "max_gates"), (2000, 2, "nested"), (300, 3, "max_gates"),
])
def test_exponential_bomb_is_refused_fast(levels: int, version: int, word: str) -> None:
    text = bomb(levels, version)
    start = time.process_time()
    with pytest.raises(LimitExceeded) as info:
        parse_circuit(text, LIMITS)
    elapsed = time.process_time() - start
    assert elapsed < 0.5, elapsed
    assert_refusal(info.value, word)


def test_deep_linear_nesting_is_refused() -> None:
    """A chain g_k -> g_{k-1} is small but deep; recursion must not escape as RecursionError."""
    defs = "gate g0 a { x a; }\n" + "".join(f"gate g{i} a {{ g{i - 1} a; }}\n" for i in range(1, 3000))
    with pytest.raises(LimitExceeded) as info:
        parse_circuit(f"{Q2}qreg q[1];\n{defs}g2999 q[0];\n", LIMITS)
    assert_refusal(info.value, "nested")


# --------------------------------------------------------------------------------------------
# Includes: refused before anything reads the filesystem
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def gate_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real, readable include file whose contents would make the program parse."""
    path = tmp_path / "mygates.inc"
    path.write_text("gate mygate a { x a; }\n")
    monkeypatch.chdir(tmp_path)
    return path


def _no_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"open called with {args!r}")
    monkeypatch.setattr(builtins, "open", refuse)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("include", [
    "ABS", '"mygates.inc"', '"./mygates.inc"', '"../mygates.inc"', '"/etc/passwd"',
    '"qelib1.inc/../mygates.inc"', '"QELIB1.INC"', "'mygates.inc'", '"stdgates.inc" "x"',
])
def test_forbidden_includes(version: int, include: str, gate_file: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    if include == "ABS":
        include = f'"{gate_file}"'
    header = "OPENQASM 2.0;\n" if version == 2 else "OPENQASM 3.0;\n"
    std = 'include "qelib1.inc";\n' if version == 2 else 'include "stdgates.inc";\n'
    text = f"{header}{std}include {include};\nqreg q[1];\nmygate q[0];\n"
    if version == 3:
        text = text.replace("qreg q[1];", "qubit[1] q;")
    _no_open(monkeypatch)
    with pytest.raises(InvalidCircuit) as info:  # ForbiddenInclude, or a syntax error
        parse_circuit(text, LIMITS)
    if include != '"stdgates.inc" "x"':
        assert type(info.value) is ForbiddenInclude
        assert_refusal(info.value, "include", "qelib1.inc" if version == 2 else "stdgates.inc")


def test_include_file_would_have_parsed(gate_file: Path) -> None:
    """Sanity for the test above: qiskit *would* read the file if we let it."""
    text = f'{Q2}include "{gate_file}";\nqreg q[1];\nmygate q[0];\n'
    assert qasm2.loads(text).num_qubits == 1


@pytest.mark.parametrize("text", [
    'OPENQASM 2.0;\ninclude"mygates.inc";\nqreg q[1];',
    'OPENQASM 2.0;\ninclude\n"mygates.inc"\n;\nqreg q[1];',
    'OPENQASM 2.0;\ninclude "qelib1.inc"; include "mygates.inc";\nqreg q[1];',
    'OPENQASM 2.0;\ninclude "a//b.inc";\nqreg q[1];',
])
def test_include_spelling_tricks(text: str, gate_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_open(monkeypatch)
    with pytest.raises(ForbiddenInclude):
        parse_circuit(text, LIMITS)


def test_commented_include_is_ignored() -> None:
    text = f'{Q2}// include "/etc/passwd";\nqreg q[1];\nx q[0];\n'
    assert parse_circuit(text, LIMITS).expanded_ops == {"x": 1}


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 5, 12])
def test_ghz_features(n: int) -> None:
    parsed = parse_circuit(ghz_qasm2(n), LIMITS)
    f = circuit_features(parsed.circuit, shots=1024, op_counts=parsed.expanded_ops)
    assert f["num_qubits"] == n and f["num_clbits"] == n
    assert f["clifford_fraction"] == 1.0 and f["non_clifford_count"] == 0
    assert f["two_qubit_count"] == n - 1 and f["two_qubit_depth"] == n - 1
    assert f["components"] == 1 and f["max_component_size"] == n
    assert f["depth"] == n + 1 == parsed.circuit.depth()
    assert f["size"] == n and f["measure_count"] == n
    assert f["interaction_edges"] == n - 1 and f["bandwidth"] == 1 and f["cut_max"] == 1
    assert f["max_degree"] == (1 if n == 2 else 2)
    assert f["mean_degree"] == pytest.approx(2 * (n - 1) / n)
    assert f["count_h"] == 1 and f["count_cx"] == n - 1 and f["count_other"] == 0
    assert f["shots"] == 1024 and f["log2_shots"] == 10
    assert f["mid_circuit_measure"] == 0


def test_qft_features() -> None:
    qc = QuantumCircuit(5)
    qc.append(QFTGate(5), range(5))
    parsed = parse_circuit(qc, LIMITS)
    assert "qft" not in parsed.expanded_ops
    f = circuit_features(parsed.circuit, shots=100, op_counts=parsed.expanded_ops)
    assert f["rotation_count"] > 0 and f["non_clifford_count"] > 0
    assert f["clifford_fraction"] < 1.0
    assert f["interaction_edges"] == 10 and f["components"] == 1  # all-to-all
    assert f["bandwidth"] == 4


def test_graph_and_cut_features() -> None:
    qc = QuantumCircuit(6, 1)
    qc.cx(0, 5)      # crosses every cut
    qc.cx(1, 2)
    qc.cz(1, 2)      # same edge again
    qc.ccx(0, 1, 2)  # 3-qubit gate: pairwise edges
    qc.x(4)
    qc.measure(1, 0)
    qc.h(1)          # gate after a measurement on the same qubit
    qc.reset(3)
    f = circuit_features(qc, shots=1)
    assert f["interaction_edges"] == 4       # (0,5) (1,2) (0,1) (0,2)
    assert f["components"] == 3              # {0,1,2,5} {3} {4}
    assert f["max_component_size"] == 4
    assert f["bandwidth"] == 5
    assert f["cut_max"] == 4                 # the cut between qubits {0,1} and {2..5}
    assert f["multi_qubit_count"] == 1 and f["two_qubit_count"] == 3
    assert f["mid_circuit_measure"] == 1.0 and f["reset_count"] == 1
    assert f["count_ccx"] == 1 and f["count_swap"] == 0
    assert f["log2_shots"] == 0


def test_features_use_measures_added_after_parsing() -> None:
    parsed = parse_circuit(ghz_circuit(3, measure=False), LIMITS)
    measured = parsed.circuit.copy()
    measured.measure_all()
    f = circuit_features(measured, shots=10, op_counts=parsed.expanded_ops)
    assert f["measure_count"] == 3


def test_feature_vector_order_and_schema() -> None:
    assert FEATURE_SCHEMA_VERSION == 2
    assert list(FEATURE_NAMES) == sorted(FEATURE_NAMES) and len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    f = circuit_features(ghz_circuit(3), shots=8)
    assert set(f) == set(FEATURE_NAMES)
    vec = feature_vector(f)
    assert len(vec) == len(FEATURE_NAMES)
    assert vec[FEATURE_NAMES.index("shots")] == 8.0
    assert feature_vector({}) == [0.0] * len(FEATURE_NAMES)
    assert {"h", "cx", "s"} <= CLIFFORD_GATES and "t" not in CLIFFORD_GATES


def test_features_are_fast() -> None:
    rng = random.Random(7)
    qc = QuantumCircuit(20, 20)
    for _ in range(1000):
        kind = rng.random()
        a, b = rng.sample(range(20), 2)
        if kind < 0.4:
            qc.cx(a, b)
        elif kind < 0.7:
            qc.rz(rng.random(), a)
        else:
            qc.h(a)
    parsed = parse_circuit(qc, LIMITS)
    best = min(_timed(lambda: circuit_features(qc, shots=100, op_counts=parsed.expanded_ops))
               for _ in range(5))
    assert best < 0.05, best  # ~2 ms measured; generous bound against slow CI


def _timed(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


# --------------------------------------------------------------------------------------------
# Serialisation and the whole intake
# --------------------------------------------------------------------------------------------

def test_qpy_round_trip() -> None:
    parsed = parse_circuit(QASM3_PROGRAM, LIMITS)
    for qc in (ghz_circuit(4), parsed.circuit):
        data = circuit_to_bytes(qc)
        assert isinstance(data, bytes)
        assert circuit_from_bytes(data) == qc


def test_prepare_job_from_qasm() -> None:
    job = prepare_job(make_spec(circuit=ghz_qasm2(4), shots=500), LIMITS)
    assert job.source_format == "qasm2" and job.num_qubits == 4
    assert job.ops == frozenset({"h", "cx", "measure"})
    assert set(job.features) == set(FEATURE_NAMES) and job.features["shots"] == 500
    assert job.payload.startswith(b"qasm2\0")           # the validated text, not QPY
    assert decode_payload(job.payload).num_qubits == 4


def test_nested_definitions_travel_as_text_not_expanded_qpy() -> None:
    defs = "".join(f"gate g{i + 1} a {{ g{i} a; g{i} a; }}\n" for i in range(16))
    text = f'OPENQASM 2.0;\ninclude "qelib1.inc";\ngate g0 a {{ x a; }}\n{defs}qreg q[1];\ng16 q[0];\n'
    start = time.process_time()
    job = prepare_job(make_spec(circuit=text), LIMITS)
    assert len(job.payload) < 2_000 and time.process_time() - start < 1.0
    restored = decode_payload(job.payload)
    assert restored.count_ops().get("measure") == 1


def test_prepare_job_adds_measurements() -> None:
    job = prepare_job(make_spec(circuit=ghz_circuit(3, measure=False)), LIMITS)
    restored = decode_payload(job.payload)
    assert restored.count_ops().get("measure") == 3
    assert job.num_clbits == 3 and job.features["measure_count"] == 3


def test_prepare_job_refuses_bad_circuit() -> None:
    with pytest.raises(ForbiddenInclude):
        prepare_job(make_spec(circuit='OPENQASM 2.0;\ninclude "/etc/passwd";\n'), LIMITS)
    with pytest.raises(InvalidJobSpec):
        prepare_job(make_spec(circuit=3), LIMITS)


def test_qasm3_materialisation_is_capped_but_flat_programs_are_not() -> None:
    """The QASM 3 importer deep-copies custom definitions per call; plain gates are cheap."""
    flat = f"{Q3}qubit[100] q;\n" + "h q;\n" * 2100  # 210,000 gates by broadcast
    assert parse_circuit(flat, LIMITS).expanded_ops == {"h": 210_000}
    body = " ".join(["cx a, b;"] * 1000)
    heavy = f"{Q3}qubit[2] q;\ngate big a, b {{ {body} }}\n" + "big q[0], q[1];\n" * 300
    start = time.process_time()
    with pytest.raises(LimitExceeded) as info:
        parse_circuit(heavy, LIMITS)
    assert time.process_time() - start < 2.0
    assert_refusal(info.value, "OpenQASM 3 importer", "max_gates")
    with pytest.raises(LimitExceeded):
        parse_circuit(heavy.replace("big q[0], q[1];\n" * 300, "pow(2) @ big q[0], q[1];\n" * 300), LIMITS)


@settings(max_examples=40, deadline=None)
@given(names=st.permutations(["a", "b", "c", "theta", "x1"]),
       values=st.lists(st.floats(-3.0, 3.0, allow_nan=False), min_size=5, max_size=5))
def test_qasm3_custom_gate_arguments_bind_by_position(names, values):
    """A call's arguments bind to a gate's parameters in declared order, whatever their names
    (qiskit_qasm3_import alone binds them in alphabetical order: angles silently swapped)."""
    from qiskit.quantum_info import Operator

    body = "; ".join(f"{g}({n}) q" for g, n in zip(("rx", "rz", "ry", "rx", "rz"), names))
    text = (f'OPENQASM 3.0;\ninclude "stdgates.inc";\ngate g({", ".join(names)}) q {{ {body}; }}\n'
            f"qubit[1] q;\ng({', '.join(repr(v) for v in values)}) q[0];\n")
    got = parse_circuit(text, Limits()).circuit
    want = QuantumCircuit(1)
    for gate, v in zip(("rx", "rz", "ry", "rx", "rz"), values):
        getattr(want, gate)(v, 0)
    assert Operator(got).equiv(Operator(want))


# --- entanglement features (schema 2) --------------------------------------------------------

def _feats(qc: QuantumCircuit) -> dict[str, float]:
    parsed = parse_circuit(qc, LIMITS)
    return circuit_features(parsed.circuit, shots=1024, op_counts=parsed.expanded_ops)


def test_a_product_state_reaches_no_entanglement() -> None:
    """QFT of |0...0> and Deutsch-Jozsa's phase kickback stay product states (MPS runs them in
    milliseconds), though every gate count and the interaction graph say otherwise."""
    qft = QuantumCircuit(12)
    for j in reversed(range(12)):
        qft.h(j)
        for k in range(j):
            qft.cp(math.pi / 2 ** (j - k), k, j)
    for j in range(6):
        qft.swap(j, 11 - j)
    qft.measure_all()
    dj = QuantumCircuit(9)
    dj.x(8)
    dj.h(range(9))
    for q in range(8):
        dj.cx(q, 8)
    dj.h(range(8))
    dj.measure_all()
    for qc in (qft, dj):
        f = _feats(qc)
        assert f["cut_max"] > 0
        assert f["ent_gates"] == 0 and f["mps_chi_log2_max"] == 0 and f["lightcone_max"] == 1


def test_bond_dimension_bound_follows_the_state() -> None:
    ghz = QuantumCircuit(10)
    ghz.h(0)
    for q in range(9):
        ghz.cx(q, q + 1)
    f = _feats(ghz)
    assert f["ent_gates"] == 9 and f["mps_chi_log2_max"] == 1 and f["lightcone_max"] == 10
    rng = random.Random(3)
    deep = QuantumCircuit(10)
    for layer in range(12):
        for q in range(10):
            deep.ry(rng.random() + 0.1, q)
        for q in range(layer % 2, 9, 2):
            deep.cx(q, q + 1)
    d = _feats(deep)
    assert d["mps_chi_log2_max"] == 5            # capped by the 5 qubits on the smaller side
    assert d["mps_gate_work_log2"] > f["mps_gate_work_log2"] + 10
    assert d["mps_sample_work_log2"] > f["mps_sample_work_log2"]


def test_fusion_estimate_and_multi_controlled_gates() -> None:
    """Aer fuses gates on at most 5 qubits into one pass; a wider gate is a pass of its own."""
    qc = QuantumCircuit(20)
    for _ in range(10):
        for q in range(5):
            qc.rx(0.3, q)
        qc.cx(0, 4)
    assert _feats(qc)["fused_blocks"] == 1
    qc.ccx(10, 11, 12)                            # 8 qubits with the block: a new one
    qc.unitary(np.eye(64), list(range(6, 12)))    # 6 qubits: a pass of its own
    qc.h(0)
    f = _feats(qc)
    assert f["fused_blocks"] == 4 and f["max_gate_qubits"] == 6 and f["mc_gate_qubits"] == 9
    assert f["basis_cx_estimate"] == 10 + 6 + 8 * 5
