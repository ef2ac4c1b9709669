"""Cirq and Amazon Braket circuits into ray-qalloc (``ray_qalloc.frontends``).

Faithfulness: random circuits over each framework's common gates are converted and their
exact ideal distribution (Qiskit ``Statevector``) is compared with the framework's own exact
one (Cirq's simulator; Braket's ``LocalSimulator`` with a probability result type), key by
key, in the framework's bit order. Then the conversions run through the real allocator
(the session's default pool), and the errors for what does not convert are checked.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

cirq = pytest.importorskip("cirq")
braket_circuits = pytest.importorskip("braket.circuits")

from braket.circuits import Circuit, gates as G  # noqa: E402
from braket.devices import LocalSimulator  # noqa: E402
from qiskit import QuantumCircuit  # noqa: E402
from qiskit.quantum_info import Operator, Statevector  # noqa: E402

from ray_qalloc.circuits import parse_circuit  # noqa: E402
from ray_qalloc.config import Limits  # noqa: E402
from ray_qalloc.exceptions import IntakeError, InvalidCircuit, InvalidJobSpec  # noqa: E402
from ray_qalloc.frontends import framework_of, to_framework_counts, to_intake, translate_text  # noqa: E402
from ray_qalloc.frontends.braket import BRAKET_GATES, circuit_to_qasm, translate_qasm  # noqa: E402
from ray_qalloc.frontends.cirq import QAllocCirqSampler, circuit_to_qiskit, counts_to_measurements  # noqa: E402

ATOL = 1e-9


# ---- exact distributions ---------------------------------------------------------------------
def qiskit_distribution(qc: QuantumCircuit) -> dict[str, float]:
    """Exact counts distribution of a circuit whose measurements all come last, keyed as Qiskit
    writes counts (last register first, bit 0 rightmost in each)."""
    body = qc.copy_empty_like()
    measures: list[tuple[int, object]] = []
    for inst in qc.data:
        if inst.operation.name == "measure":
            measures.append((qc.find_bit(inst.qubits[0]).index, inst.clbits[0]))
        elif inst.operation.name != "barrier":
            done = {q for q, _ in measures}
            touched = {qc.find_bit(x).index for x in inst.qubits}
            if touched <= done:
                continue          # after its qubits' measurement (Cirq's invert_mask undo): no effect
            assert not touched & done, "a gate on a measured qubit before its other measurements"
            body.append(inst)
    probs = Statevector(body.remove_final_measurements(inplace=False)).probabilities()
    out: dict[str, float] = {}
    for index, p in enumerate(probs):
        if p < 1e-14:
            continue
        bits = {clbit: (index >> q) & 1 for q, clbit in measures}
        key = " ".join("".join(str(bits.get(b, 0)) for b in reversed(reg)) for reg in reversed(qc.cregs))
        out[key] = out.get(key, 0.0) + float(p)
    return out


def assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    keys = set(a) | set(b)
    worst = max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)
    assert worst < ATOL, (worst, sorted(a.items())[:8], sorted(b.items())[:8])


def cirq_distribution(circuit) -> dict[str, float]:
    """Cirq's exact distribution, keyed "bits_of_key0 bits_of_key1 ..." in first-measured order."""
    qubits = sorted(circuit.all_qubits())
    keys = [(str(op.gate.key), op.qubits, op.gate.full_invert_mask()) for op in circuit.all_operations()
            if cirq.is_measurement(op)]
    unitary_part = cirq.Circuit(op for op in circuit.all_operations() if not cirq.is_measurement(op))
    state = cirq.Simulator(dtype=np.complex128).simulate(unitary_part, qubit_order=qubits).final_state_vector
    probs = np.abs(state) ** 2
    n = len(qubits)
    out: dict[str, float] = {}
    for index, p in enumerate(probs):
        if p < 1e-14:
            continue
        value = {q: (index >> (n - 1 - i)) & 1 for i, q in enumerate(qubits)}
        key = " ".join("".join(str(value[q] ^ int(inv)) for q, inv in zip(qs, mask)) for _, qs, mask in keys)
        out[key] = out.get(key, 0.0) + float(p)
    return out


def braket_distribution(circuit: Circuit) -> dict[str, float]:
    """Braket's exact distribution over the measured qubits, in Braket's measurement order."""
    measured = [int(q) for ins in circuit.instructions if type(ins.operator).__name__ == "Measure"
                for q in ins.target] or sorted(int(q) for q in circuit.qubits)
    body = Circuit()
    for ins in circuit.instructions:
        if type(ins.operator).__name__ != "Measure":
            body.add_instruction(ins)
    # The whole register's probabilities (sorted qubits), marginalised here: Braket 1.127's
    # probability(target=...) with targets out of ascending order disagrees with its own sampling.
    body.probability()
    values = LocalSimulator().run(body, shots=0).result().values[0]
    qubits = sorted(int(q) for q in body.qubits)
    n = len(qubits)
    out: dict[str, float] = {}
    for index, p in enumerate(values):
        if p > 1e-14:
            bit = {q: (index >> (n - 1 - i)) & 1 for i, q in enumerate(qubits)}
            key = "".join(str(bit[q]) for q in measured)
            out[key] = out.get(key, 0.0) + float(p)
    return out


# ---- random circuits -------------------------------------------------------------------------
def random_cirq(rng: np.random.Generator, n: int, depth: int):
    q = cirq.LineQubit.range(n) if rng.random() < 0.5 else [cirq.GridQubit(r, c) for r in range(2) for c in range(3)][:n]
    one = [cirq.H, cirq.X, cirq.Y, cirq.Z, cirq.S, cirq.T, lambda: cirq.rx(rng.uniform(-3, 3)),
           lambda: cirq.ry(rng.uniform(-3, 3)), lambda: cirq.rz(rng.uniform(-3, 3)),
           lambda: cirq.X ** rng.uniform(-1, 1), lambda: cirq.Y ** rng.uniform(-1, 1),
           lambda: cirq.PhasedXPowGate(phase_exponent=rng.uniform(-1, 1), exponent=rng.uniform(-1, 1)),
           lambda: cirq.PhasedXZGate(x_exponent=rng.uniform(-1, 1), z_exponent=rng.uniform(-1, 1),
                                     axis_phase_exponent=rng.uniform(-1, 1))]
    two = [cirq.CNOT, cirq.CZ, cirq.SWAP, cirq.ISWAP, lambda: cirq.ISWAP ** rng.uniform(-1, 1),
           lambda: cirq.CZ ** rng.uniform(-1, 1), lambda: cirq.FSimGate(rng.uniform(-3, 3), rng.uniform(-3, 3)),
           lambda: cirq.XX ** rng.uniform(-1, 1), lambda: cirq.MatrixGate(cirq.testing.random_unitary(4, random_state=int(rng.integers(1e9))))]
    three = [cirq.CCX, cirq.CCZ, cirq.CSWAP]
    ops = []
    for _ in range(depth):
        kind = rng.random()
        if kind < 0.5 or n < 2:
            g = one[rng.integers(len(one))]
            gate = g() if callable(g) and not isinstance(g, cirq.Gate) else g
            ops.append(gate(q[rng.integers(n)]))
        elif kind < 0.9 or n < 3:
            a, b = rng.choice(n, 2, replace=False)
            g = two[rng.integers(len(two))]
            gate = g() if callable(g) and not isinstance(g, cirq.Gate) else g
            ops.append(gate(q[a], q[b]))
        else:
            a, b, c = rng.choice(n, 3, replace=False)
            ops.append(three[rng.integers(len(three))](q[a], q[b], q[c]))
    order = list(rng.permutation(n))
    cut = int(rng.integers(1, n + 1))
    first, second = order[:cut], order[cut:]
    mask = tuple(bool(b) for b in rng.integers(0, 2, len(first)))
    ops.append(cirq.measure(*[q[i] for i in first], key="alpha", invert_mask=mask))
    if second:
        ops.append(cirq.measure(*[q[i] for i in second], key="beta 2"))   # any key, spaces included
    return cirq.Circuit(ops)


def random_braket(rng: np.random.Generator, n: int, depth: int) -> Circuit:
    labels = sorted(rng.choice(12, n, replace=False).tolist())    # any qubit labels, not 0..n-1
    a = lambda: float(rng.uniform(-3, 3))  # noqa: E731
    one = [lambda c, q: c.h(q), lambda c, q: c.x(q), lambda c, q: c.y(q), lambda c, q: c.z(q), lambda c, q: c.s(q),
           lambda c, q: c.si(q), lambda c, q: c.t(q), lambda c, q: c.ti(q), lambda c, q: c.v(q), lambda c, q: c.vi(q),
           lambda c, q: c.rx(q, a()), lambda c, q: c.ry(q, a()), lambda c, q: c.rz(q, a()),
           lambda c, q: c.phaseshift(q, a()), lambda c, q: c.gpi(q, a()), lambda c, q: c.gpi2(q, a()),
           lambda c, q: c.prx(q, a(), a()), lambda c, q: c.u(q, a(), a(), a()), lambda c, q: c.i(q)]
    two = [lambda c, p, q: c.cnot(p, q), lambda c, p, q: c.cy(p, q), lambda c, p, q: c.cz(p, q),
           lambda c, p, q: c.cv(p, q), lambda c, p, q: c.swap(p, q), lambda c, p, q: c.iswap(p, q),
           lambda c, p, q: c.pswap(p, q, a()), lambda c, p, q: c.xy(p, q, a()), lambda c, p, q: c.xx(p, q, a()),
           lambda c, p, q: c.yy(p, q, a()), lambda c, p, q: c.zz(p, q, a()), lambda c, p, q: c.ecr(p, q),
           lambda c, p, q: c.cphaseshift(p, q, a()), lambda c, p, q: c.cphaseshift00(p, q, a()),
           lambda c, p, q: c.cphaseshift01(p, q, a()), lambda c, p, q: c.cphaseshift10(p, q, a()),
           lambda c, p, q: c.ms(p, q, a(), a(), a())]
    three = [lambda c, p, q, r: c.ccnot(p, q, r), lambda c, p, q, r: c.cswap(p, q, r)]
    circ = Circuit()
    for _ in range(depth):
        kind = rng.random()
        if kind < 0.5 or n < 2:
            one[rng.integers(len(one))](circ, labels[rng.integers(n)])
        elif kind < 0.9 or n < 3:
            p, q = rng.choice(labels, 2, replace=False).tolist()
            two[rng.integers(len(two))](circ, p, q)
        else:
            p, q, r = rng.choice(labels, 3, replace=False).tolist()
            three[rng.integers(len(three))](circ, p, q, r)
    for q in labels:                  # every label in use, so Braket's qubit set is all of them
        circ.i(q)
    if rng.random() < 0.6:            # explicit measurement of a subset, in a random order
        k = int(rng.integers(1, n + 1))
        circ.measure([labels[i] for i in rng.permutation(n)[:k]])
    return circ


# ---- faithfulness ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(24))
def test_cirq_circuits_keep_their_distribution_and_key_order(seed):
    rng = np.random.default_rng(seed)
    circuit = random_cirq(rng, n=int(rng.integers(2, 6)), depth=int(rng.integers(4, 20)))
    conv = circuit_to_qiskit(circuit)
    first_measured = [str(op.gate.key) for op in circuit.all_operations() if cirq.is_measurement(op)]
    assert [k for k, _ in conv.keys] == first_measured
    assert_same(qiskit_distribution(conv.circuit), cirq_distribution(circuit))


@pytest.mark.parametrize("seed", range(24))
def test_braket_circuits_keep_their_distribution_and_measurement_order(seed):
    rng = np.random.default_rng(1000 + seed)
    circuit = random_braket(rng, n=int(rng.integers(2, 6)), depth=int(rng.integers(4, 20)))
    qc = to_intake(circuit)
    assert qc.num_qubits == len(circuit.qubits)          # labels become 0..n-1: width stays n
    assert_same(qiskit_distribution(qc), braket_distribution(circuit))


@pytest.mark.parametrize("name", sorted(BRAKET_GATES))
def test_every_braket_gate_definition_is_exactly_braket_s_matrix(name):
    gate = {"i": G.I(), "cnot": G.CNot(), "ccnot": G.CCNot(), "si": G.Si(), "ti": G.Ti(), "v": G.V(), "vi": G.Vi(),
            "cv": G.CV(), "phaseshift": G.PhaseShift(0.7), "cphaseshift": G.CPhaseShift(0.7),
            "cphaseshift00": G.CPhaseShift00(0.7), "cphaseshift01": G.CPhaseShift01(0.7),
            "cphaseshift10": G.CPhaseShift10(0.7), "iswap": G.ISwap(), "pswap": G.PSwap(0.7), "xx": G.XX(0.7),
            "yy": G.YY(0.7), "zz": G.ZZ(0.7), "xy": G.XY(0.7), "ecr": G.ECR(), "gpi": G.GPi(0.7),
            "gpi2": G.GPi2(0.7), "prx": G.PRx(0.7, 0.4), "ms": G.MS(0.7, 0.4, 1.1)}[name]
    text = Circuit().add_instruction(braket_circuits.Instruction(gate, range(gate.qubit_count))).to_ir("OPENQASM").source
    qc = parse_circuit(translate_qasm(text), Limits()).circuit.remove_final_measurements(inplace=False)
    # global phase included: the definitions stay right under `ctrl @`
    assert np.allclose(Operator(qc.reverse_bits()).data, gate.to_matrix(), atol=ATOL)


def test_braket_text_with_modifiers_converts_like_braket_runs_it():
    text = ("OPENQASM 3.0;\nbit[3] b;\nqubit[3] q;\nh q[0];\nrx(0.4) q[2];\nctrl @ phaseshift(1.1) q[0], q[1];\n"
            "ctrl @ xy(0.8) q[0], q[1], q[2];\nnegctrl @ cnot q[1], q[0], q[2];\ninv @ v q[1];\n"
            "b[0] = measure q[2];\nb[1] = measure q[0];\nb[2] = measure q[1];\n")
    from braket.ir.openqasm import Program

    body = text.split("b[0] = measure")[0] + "#pragma braket result probability\n"   # all qubits, q[0] leftmost
    exact = LocalSimulator().run(Program(source=body), shots=0).result().values[0]
    want: dict[str, float] = {}
    for i, p in enumerate(exact):
        if p > 1e-14:
            q0, q1, q2 = format(i, "03b")
            want[q2 + q0 + q1] = want.get(q2 + q0 + q1, 0.0) + float(p)       # b = (q[2], q[0], q[1])
    qc = parse_circuit(translate_text(text, "braket"), Limits()).circuit
    got = to_framework_counts({k: v for k, v in qiskit_distribution(qc).items()})   # text: Qiskit's order
    assert_same(got, want)


def test_framework_text_and_objects_give_the_same_circuit():
    c = Circuit().h(3).cnot(3, 7).rx(7, 0.25).measure([7, 3])
    from ray_qalloc.frontends.bits import framework_order

    from_text = framework_order(parse_circuit(translate_text(circuit_to_qasm(c), "braket"), Limits()).circuit)
    assert_same(qiskit_distribution(from_text), qiskit_distribution(to_intake(c)))
    q = cirq.LineQubit.range(2)
    cc = cirq.Circuit(cirq.H(q[0]), cirq.CNOT(*q), cirq.measure(*q, key="z"))
    assert parse_circuit(translate_text(cirq.qasm(cc), "cirq"), Limits()).circuit.num_qubits == 2


def test_counts_come_back_as_cirq_measurements():
    keys = (("alpha", 2), ("b", 1))
    m = counts_to_measurements({"10 1": 3, "01 0": 1}, keys, np.random.default_rng(0))
    assert m["alpha"].shape == (4, 2) and m["b"].shape == (4, 1)
    rows = sorted(zip(map(tuple, m["alpha"]), m["b"][:, 0]))
    assert rows == [((0, 1), 0)] + [((1, 0), 1)] * 3


# ---- what does not convert -------------------------------------------------------------------
@pytest.mark.parametrize("make, words", [
    (lambda: Circuit().h(0).probability(), "result types"),
    (lambda: Circuit().h(0).bit_flip(0, 0.1), "noise"),
    (lambda: Circuit().add_verbatim_box(Circuit().h(0)), "verbatim"),
    (lambda: Circuit().unitary([0], np.eye(2)), "unitary"),
    (lambda: Circuit().rx(0, braket_circuits.FreeParameter("theta")), "free parameters"),
])
def test_braket_circuits_that_cannot_convert_say_why(make, words):
    with pytest.raises(InvalidCircuit) as err:
        to_intake(make())
    assert words in str(err.value) or words in (err.value.fix or ""), str(err.value)
    assert "To fix" in str(err.value) or err.value.fix


@pytest.mark.parametrize("text, words", [
    ('OPENQASM 3.0;\ninclude "/etc/passwd";\nqubit[1] q;\nh q[0];', "include"),
    ("OPENQASM 3.0;\nqubit[1] q;\n#pragma braket result expectation z(q[0])\nh q[0];", "result"),
    ("OPENQASM 2.0;\nqreg q[1];\n", "OPENQASM 3.0"),
])
def test_braket_text_that_cannot_convert_says_why(text, words):
    with pytest.raises(InvalidCircuit) as err:
        translate_text(text, "braket")
    assert words in str(err.value)


def test_cirq_circuits_that_cannot_convert_say_why():
    q = cirq.LineQubit.range(2)
    theta = __import__("sympy").Symbol("theta")
    cases = [
        (cirq.Circuit(cirq.rx(theta)(q[0]), cirq.measure(q[0], key="m")), "unresolved parameters"),
        (cirq.Circuit(cirq.measure(q[0], key="m"), cirq.measure(q[1], key="m")), "more than once"),
        (cirq.Circuit(cirq.measure(q[0], key="m"), cirq.X(q[1]).with_classical_controls("m")), "classically"),
        (cirq.Circuit(cirq.depolarize(0.1)(q[0]), cirq.measure(q[0], key="m")), "OpenQASM"),
    ]
    for circuit, words in cases:
        with pytest.raises(InvalidCircuit, match=words):
            circuit_to_qiskit(circuit)


def test_unknown_format_is_refused_by_name():
    with pytest.raises(InvalidJobSpec) as err:
        translate_text("OPENQASM 2.0;", "quil")
    assert err.value.field == "format"


def test_objects_are_recognised_without_importing_their_framework():
    assert framework_of(Circuit()) == "braket" and framework_of(cirq.Circuit()) == "cirq"
    assert framework_of(QuantumCircuit(1)) is None and framework_of("OPENQASM 2.0;") is None
    code = ("import sys, ray_qalloc, ray_qalloc.frontends, ray_qalloc.session, ray_qalloc.client; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('cirq', 'braket', 'qiskit_braket_provider')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- through the allocator (the session's default pool) ---------------------------------------
def test_a_cirq_program_runs_through_the_allocator_with_one_changed_line(qa):
    q = cirq.LineQubit.range(3)
    t = __import__("sympy").Symbol("t")
    circuit = cirq.Circuit(cirq.X(q[2]), cirq.ry(t)(q[0]), cirq.CNOT(q[0], q[1]),
                           cirq.measure(q[1], q[2], key="pair"), cirq.measure(q[0], key="first"))
    sampler = QAllocCirqSampler(qa, intent="classical")          # was: sampler = cirq.Simulator()
    results = sampler.run_sweep(circuit, cirq.Points("t", [0.0, np.pi]), repetitions=200)
    assert [r.params.value_of("t") for r in results] == [0.0, np.pi]
    assert results[0].measurements["pair"].shape == (200, 2)
    assert (results[0].measurements["pair"] == [0, 1]).all() and (results[0].measurements["first"] == 0).all()
    assert (results[1].measurements["pair"] == [1, 1]).all() and (results[1].measurements["first"] == 1).all()
    hist = sampler.run(cirq.resolve_parameters(circuit, {"t": np.pi / 2}), repetitions=400).histogram(key="first")
    assert 120 < hist[1] < 280


def test_a_braket_program_runs_through_the_allocator_in_braket_s_bit_order(qa):
    circuit = Circuit().x(4).h(0).cnot(0, 9).measure([4, 9, 0])
    res = qa.submit(circuit, shots=300, intent="classical").result(timeout=120)   # was: device.run(circuit, shots=300)
    assert set(res.counts) <= {"100", "111"} and sum(res.counts.values()) == 300
    text = "OPENQASM 3.0;\nbit[2] b;\nqubit[2] q;\nx q[1];\ncnot q[1], q[0];\nb[0] = measure q[0];\nb[1] = measure q[1];"
    out = qa.submit(text, format="braket", shots=50, intent="classical").result(timeout=120)
    assert to_framework_counts(out.counts) == {"11": 50}
    with pytest.raises(IntakeError):
        qa.submit(Circuit().h(0).probability(), shots=10)
