"""Circuits as tensor networks: conversion, amplitudes, marginals and sampling, on any array library.

Why our own converter (cuQuantum has ``CircuitToEinsum``): the conversion must run and be
tested where there is no GPU and no cuQuantum. This module turns a Qiskit circuit into one
tensor per gate with integer mode labels (the *interleaved* einsum form that numpy, opt_einsum
and ``cuquantum.tensornet.contract`` all read), and contracts it with whatever ``contract``
it is given: opt_einsum on numpy arrays here, cuTensorNet on CuPy arrays on a GPU node. The
tests check it against Qiskit's ``Statevector`` and against a plain ``numpy.einsum`` of the
same network, so the GPU path contracts a network already known to be right.

How sampling works — conditional (chain-rule) sampling over marginals, not amplitudes of
requested bitstrings: a sample of ``k`` measured qubits is drawn group by group, each group
from its marginal given the groups drawn before, ``p(x_G | x_prefix)``, computed by
contracting the circuit with its conjugate (the "double layer") with the prefix fixed, the
group open and every other qubit traced out. Why this and not amplitudes: amplitudes answer
"how likely is this bitstring", but sampling needs bitstrings nobody has named yet; turning
amplitudes into samples takes rejection or Markov-chain schemes whose cost depends on how
peaked the distribution is and which are only approximately exact. Chain-rule samples are
exact, shots that share a prefix share its contraction (the cost grows with the *distinct*
prefixes, not with the shots), and tracing out the qubits not yet drawn lets every gate
outside the prefix's backward light cone cancel against its conjugate (``U†U = 1``) — which is
what keeps each marginal of a wide, shallow circuit small. It is also what cuTensorNet's own
sampler does, which the GPU engine uses where it is available.

Limits (refused with a reason, so placement tries another backend): measurements must be
final (nothing acts on a qubit after it is measured), no resets, no classical control, no
unbound parameters.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ray_qalloc.exceptions import BackendError

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

Contract = Callable[..., Any]
_SKIP = frozenset({"barrier", "delay", "id", "global_phase"})
_MAX_GATE_QUBITS_DENSE = 4   # wider gates are decomposed before conversion


@dataclass(frozen=True)
class GateTensor:
    """One unitary on ``qubits`` (Qiskit's order): a 2^k × 2^k matrix, little-endian as Qiskit's."""

    matrix: np.ndarray
    qubits: tuple[int, ...]


@dataclass
class CircuitNetwork:
    """The unitary part of a circuit as gates on ``num_qubits`` wires, and which qubit each
    final measurement writes to which classical bit."""

    num_qubits: int
    gates: list[GateTensor]
    measured: dict[int, int] = field(default_factory=dict)   # qubit -> clbit
    num_clbits: int = 0
    creg_sizes: tuple[tuple[str, int], ...] = ()             # registers, in circuit order
    loose_clbits: bool = False

    # ---- networks ------------------------------------------------------------------------------
    def _ket(self, keep: set[int] | None = None, xp: Any = np, dtype: Any = np.complex128,
             conj: bool = False, offset: int = 0) -> tuple[list[Any], list[list[int]], dict[int, int], set[int]]:
        """Tensors and labels of ``C|0…0⟩`` (``conj``: of its complex conjugate), gates outside
        ``keep``'s backward light cone dropped. Returns operands, their labels, each qubit's final
        label, and the qubits the kept network touches."""
        gates = self.gates if keep is None else light_cone(self.gates, keep)
        touched = set(keep or range(self.num_qubits))
        for g in gates:
            touched.update(g.qubits)
        label = offset
        cur: dict[int, int] = {}
        ops: list[Any] = []
        modes: list[list[int]] = []
        zero = xp.asarray(np.array([1.0, 0.0], dtype=dtype))
        for q in sorted(touched):
            cur[q] = label
            ops.append(zero)
            modes.append([label])
            label += 1
        for g in gates:
            k = len(g.qubits)
            t = g.matrix.conj() if conj else g.matrix
            tensor = xp.asarray(np.ascontiguousarray(t.astype(dtype)).reshape((2,) * (2 * k)))
            outs = list(range(label, label + k))
            label += k
            # axes of the reshaped little-endian matrix: out_{k-1} … out_0, in_{k-1} … in_0
            modes.append([outs[j] for j in reversed(range(k))] + [cur[g.qubits[j]] for j in reversed(range(k))])
            ops.append(tensor)
            for j, q in enumerate(g.qubits):
                cur[q] = outs[j]
        return ops, modes, cur, touched

    def _label_span(self) -> int:
        return self.num_qubits + 2 * sum(len(g.qubits) for g in self.gates) + 2

    def statevector_network(self, xp: Any = np, dtype: Any = np.complex128) -> tuple[list[Any], list[int]]:
        """Interleaved operands and output modes of the whole state; the contracted tensor's axes
        are qubits n-1 … 0, so ``reshape(-1)`` is Qiskit's ``Statevector.data`` order."""
        ops, modes, cur, _ = self._ket(None, xp, dtype)
        return _interleave(ops, modes), [cur[q] for q in reversed(range(self.num_qubits))]

    def amplitude_network(self, bits: Sequence[int], xp: Any = np,
                          dtype: Any = np.complex128) -> tuple[list[Any], list[int]]:
        """⟨bits|C|0⟩ with ``bits[q]`` the value of qubit ``q`` (a scalar network)."""
        if len(bits) != self.num_qubits:
            raise ValueError(f"need {self.num_qubits} bits, got {len(bits)}")
        ops, modes, cur, _ = self._ket(None, xp, dtype)
        for q in range(self.num_qubits):
            ops.append(xp.asarray(_basis(bits[q], dtype)))
            modes.append([cur[q]])
        return _interleave(ops, modes), []

    def marginal_network(self, open_qubits: Sequence[int], fixed: dict[int, int] | None = None,
                         xp: Any = np, dtype: Any = np.complex128) -> tuple[list[Any], list[int]]:
        """Joint probabilities of ``open_qubits`` (axes in the given order) with the qubits in
        ``fixed`` projected on their values and every other qubit traced out: ``⟨ψ|P|ψ⟩`` as one
        network of the circuit and its conjugate, light cone of the kept qubits only."""
        fixed = dict(fixed or {})
        keep = set(open_qubits) | set(fixed)
        ket_ops, ket_modes, ket_cur, touched = self._ket(keep, xp, dtype)
        bra_ops, bra_modes, bra_cur, _ = self._ket(keep, xp, dtype, conj=True, offset=self._label_span())
        # the last labels of the bra meet the ket's: traced, fixed or kept open (diagonal only)
        rename = {bra_cur[q]: ket_cur[q] for q in touched}
        bra_modes = [[rename.get(m, m) for m in ms] for ms in bra_modes]
        ops, modes = ket_ops + bra_ops, ket_modes + bra_modes
        for q, bit in fixed.items():
            ops.append(xp.asarray(_basis(bit, dtype)))   # e_b[k]² = e_b[k]: one projector per pair
            modes.append([ket_cur[q]])
        return _interleave(ops, modes), [ket_cur[q] for q in open_qubits]

    # ---- results -------------------------------------------------------------------------------
    def format_counts(self, outcomes: Counter) -> dict[str, int]:
        """Counts keyed as Qiskit keys them: clbits high to low, registers separated by spaces (the
        last register leftmost); ``outcomes`` maps tuples of measured-qubit values (in
        ``sampled_qubits`` order) to counts."""
        order = self.sampled_qubits
        out: Counter = Counter()
        for values, count in outcomes.items():
            clbits = [0] * self.num_clbits
            for q, v in zip(order, values):
                clbits[self.measured[q]] = int(v)
            out[self._key(clbits)] += int(count)
        return dict(out)

    def _key(self, clbits: list[int]) -> str:
        if self.loose_clbits or not self.creg_sizes:
            return "".join(str(b) for b in reversed(clbits))
        parts, start = [], 0
        for _, size in self.creg_sizes:
            parts.append("".join(str(b) for b in reversed(clbits[start:start + size])))
            start += size
        return " ".join(reversed(parts))

    @property
    def sampled_qubits(self) -> list[int]:
        """The measured qubits in the order sampling draws them (by classical bit)."""
        return sorted(self.measured, key=lambda q: self.measured[q])


def _basis(bit: int, dtype: Any) -> np.ndarray:
    v = np.zeros(2, dtype=dtype)
    v[int(bit)] = 1.0
    return v


def _interleave(ops: list[Any], modes: list[list[int]]) -> list[Any]:
    out: list[Any] = []
    for o, m in zip(ops, modes):
        out += [o, m]
    return out


def light_cone(gates: Sequence[GateTensor], keep: Iterable[int]) -> list[GateTensor]:
    """The gates in the backward light cone of ``keep``: walking back from the end, a gate that
    touches no qubit of the cone cancels against its conjugate in ``⟨ψ|P_keep ⊗ 1|ψ⟩``."""
    cone = set(keep)
    out: list[GateTensor] = []
    for g in reversed(gates):
        if cone.intersection(g.qubits):
            cone.update(g.qubits)
            out.append(g)
    out.reverse()
    return out


# ---- conversion ----------------------------------------------------------------------------------
def circuit_network(circuit: "QuantumCircuit") -> CircuitNetwork:
    """Convert a circuit (final measurements allowed) to its network; raises ``BackendError``
    naming what cannot be converted."""
    from qiskit.circuit import ControlFlowOp

    qindex = {q: i for i, q in enumerate(circuit.qubits)}
    cindex = {c: i for i, c in enumerate(circuit.clbits)}
    in_regs = {c for reg in circuit.cregs for c in reg}
    gates: list[GateTensor] = []
    measured: dict[int, int] = {}
    for inst in circuit.data:
        op = inst.operation
        qs = tuple(qindex[q] for q in inst.qubits)
        name = op.name
        if name in _SKIP:
            continue
        if name == "measure":
            q = qs[0]
            measured[q] = cindex[inst.clbits[0]]
            continue
        if isinstance(op, ControlFlowOp) or getattr(op, "condition", None) is not None:
            raise _refuse(f"classical control ({name})")
        if name == "reset":
            raise _refuse("resets")
        if any(q in measured for q in qs):
            raise _refuse(f"a mid-circuit measurement ({name} on a qubit after its measurement)")
        if getattr(op, "is_parameterized", lambda: False)():
            raise _refuse(f"unbound parameters in {name}")
        gates.extend(_gate_tensors(op, qs))
    return CircuitNetwork(
        num_qubits=circuit.num_qubits, gates=fuse(gates), measured=measured, num_clbits=circuit.num_clbits,
        creg_sizes=tuple((r.name, r.size) for r in circuit.cregs),
        loose_clbits=any(c not in in_regs for c in circuit.clbits) or
        sum(r.size for r in circuit.cregs) != circuit.num_clbits)


def fuse(gates: Sequence[GateTensor]) -> list[GateTensor]:
    """Absorb one-qubit gates into the next multi-qubit gate on their qubit (or into each other):
    the same unitary in fewer, denser tensors — a wide shallow circuit's layers of rotations would
    otherwise double the network's size and the contraction's per-tensor overhead."""
    pending: dict[int, np.ndarray] = {}
    out: list[GateTensor] = []
    for g in gates:
        if len(g.qubits) == 1:
            q = g.qubits[0]
            pending[q] = g.matrix @ pending[q] if q in pending else g.matrix
            continue
        if any(q in pending for q in g.qubits):
            before = np.array([[1.0]], dtype=np.complex128)
            for q in reversed(g.qubits):   # little-endian: the last qubit is the kron's leftmost factor
                before = np.kron(before, pending.pop(q, np.eye(2, dtype=np.complex128)))
            g = GateTensor(g.matrix @ before, g.qubits)
        out.append(g)
    out.extend(GateTensor(m, (q,)) for q, m in sorted(pending.items()))
    return out


def _gate_tensors(op: Any, qs: tuple[int, ...]) -> list[GateTensor]:
    matrix = None
    if len(qs) <= _MAX_GATE_QUBITS_DENSE:
        try:
            matrix = np.asarray(op.to_matrix(), dtype=np.complex128)
        except Exception:  # a custom gate without a matrix: its definition may have one
            try:
                from qiskit.quantum_info import Operator

                matrix = np.asarray(Operator(op).data, dtype=np.complex128)
            except Exception:
                matrix = None
    if matrix is not None:
        return [GateTensor(matrix, qs)]
    definition = getattr(op, "definition", None)
    if definition is None:
        raise _refuse(f"the operation {op.name!r} (no matrix, no definition)")
    inner = circuit_network(definition)
    if inner.measured:
        raise _refuse(f"measurements inside {op.name!r}")
    return [GateTensor(g.matrix, tuple(qs[i] for i in g.qubits)) for g in inner.gates]


def _refuse(what: str) -> BackendError:
    return BackendError(f"the tensor-network simulator cannot run {what}.",
                        fix="send the circuit to a statevector or MPS backend, or keep measurements at the end.")


# ---- contraction -----------------------------------------------------------------------------------
class NumpyContractor:
    """opt_einsum's contraction of an interleaved network (the CPU reference), with each
    network *shape*'s greedy path found once: the marginals of one sampling step differ only
    in the values of their projectors, and finding a path costs as much as using it."""

    def __init__(self, optimize: str = "greedy", cache_size: int = 64) -> None:
        self.optimize = optimize
        self._paths: dict[Any, Any] = {}
        self._cache_size = cache_size

    def __call__(self, *operands: Any) -> Any:
        import opt_einsum

        key = tuple(tuple(m) if isinstance(m, list) else getattr(m, "shape", None) for m in operands)
        path = self._paths.get(key)
        if path is None:
            path, _ = opt_einsum.contract_path(*operands, optimize=self.optimize)
            if len(self._paths) >= self._cache_size:
                self._paths.pop(next(iter(self._paths)))
            self._paths[key] = path
        return opt_einsum.contract(*operands, optimize=path)


def numpy_contract(*operands: Any) -> Any:
    """A one-off opt_einsum contraction (greedy path)."""
    return NumpyContractor()(*operands)


def statevector(net: CircuitNetwork, contract: Contract = numpy_contract, xp: Any = np) -> Any:
    ops, out = net.statevector_network(xp)
    return contract(*ops, out).reshape(-1)


def amplitude(net: CircuitNetwork, bits: Sequence[int], contract: Contract = numpy_contract, xp: Any = np) -> complex:
    ops, out = net.amplitude_network(bits, xp)
    return complex(contract(*ops, out))


def marginal(net: CircuitNetwork, open_qubits: Sequence[int], fixed: dict[int, int] | None = None,
             contract: Contract = numpy_contract, xp: Any = np) -> np.ndarray:
    """Unnormalised joint probabilities of ``open_qubits`` given ``fixed`` (axes as listed), on the host."""
    ops, out = net.marginal_network(open_qubits, fixed, xp)
    value = contract(*ops, out)
    host = value.get() if hasattr(value, "get") else np.asarray(value)
    return np.real(host)


def sample(net: CircuitNetwork, shots: int, *, seed: int | None = None, group: int = 1,
           contract: Contract | None = None, xp: Any = np) -> Counter:
    """``shots`` exact samples of the measured qubits (tuples in ``sampled_qubits`` order), drawn
    group by group from conditional marginals; shots that share a prefix share its contraction."""
    order = net.sampled_qubits
    contract = contract or NumpyContractor()
    rng = np.random.default_rng(seed)
    if not order or shots <= 0:
        return Counter({(): shots}) if shots > 0 else Counter()
    group = max(int(group), 1)
    prefixes: dict[tuple[int, ...], int] = {(): int(shots)}
    for start in range(0, len(order), group):
        block = order[start:start + group]
        nxt: dict[tuple[int, ...], int] = {}
        for prefix, count in prefixes.items():
            fixed = dict(zip(order[:start], prefix))
            p = marginal(net, block, fixed, contract, xp).reshape(-1)
            p = np.clip(p, 0.0, None)
            total = p.sum()
            if not total > 0:
                raise BackendError("the tensor-network marginal vanished (numerical underflow).",
                                   fix="run the circuit as a statevector or with MPS.")
            draws = rng.multinomial(count, p / total)
            for index in np.nonzero(draws)[0]:
                bits = tuple(int(b) for b in np.binary_repr(int(index), width=len(block)))
                nxt[prefix + bits] = nxt.get(prefix + bits, 0) + int(draws[index])
        prefixes = nxt
    return Counter(prefixes)


def contraction_width(net: CircuitNetwork, open_qubits: Sequence[int] | None = None) -> float:
    """log2 of the largest intermediate tensor of the marginal network's greedy path (how hard a
    contraction is; opt_einsum's path finder, no contraction done): for tests and the benchmark."""
    import opt_einsum

    qubits = list(open_qubits if open_qubits is not None else net.sampled_qubits[:1])
    ops, out = net.marginal_network(qubits, {})
    _, info = opt_einsum.contract_path(*ops, out, optimize="greedy")
    return math.log2(max(float(info.largest_intermediate), 1.0))
