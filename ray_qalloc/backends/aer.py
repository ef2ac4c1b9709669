"""Qiskit Aer simulators as ray-qalloc backends: one class, one simulation method each.

Why one backend per method: the methods differ in what they can run and what it costs
(statevector 16·2^n bytes, density matrix 16·4^n, MPS by entanglement, stabilizer only
Clifford circuits), and placement chooses among them, so each method must state its own
limits in ``spec()``.

Why the care about transpiling: the project aims at a few milliseconds of overhead per
job. Transpiling costs more than simulating a small circuit, so a circuit is sent to Aer
as is when every operation in it is already supported by the method (the supported set is
computed once per method); only otherwise is it transpiled, cheaply, against
``AerSimulator(method=...)`` (MPS and stabilizer refuse gates, e.g. ``crx`` or ``cu3``,
that the default simulator accepts). The simulator instance is built once per backend.
"""

from __future__ import annotations

import math
import time
import uuid
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from ray_qalloc.backends.base import BackendSpec, Calibration, Price, RunResult
from ray_qalloc.exceptions import BackendError
from ray_qalloc.gates import CLIFFORD_GATES, NOT_GATES, PAULI, QUARTER_TURN_CLIFFORD_GATES

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit
    from qiskit_aer import AerSimulator

    from ray_qalloc.runopts import RunOptions

METHODS: tuple[str, ...] = ("statevector", "matrix_product_state", "stabilizer", "density_matrix", "automatic")
SHORT_NAMES: dict[str, str] = {
    "statevector": "statevector",
    "matrix_product_state": "mps",
    "stabilizer": "stabilizer",
    "density_matrix": "density_matrix",
}
ALIASES: dict[str, str] = {"mps": "matrix_product_state", "sv": "statevector",
                           "dm": "density_matrix", "clifford": "stabilizer",
                           # Aer's own choice: a baseline for benchmarks, not in the default pool
                           "automatic": "automatic"}

# Operations every method handles even when they are missing from its target.
ALWAYS_SUPPORTED: frozenset[str] = NOT_GATES
# Widest circuits of methods not bound by a simple memory formula.
MPS_MAX_QUBITS = 1000
STABILIZER_MAX_QUBITS = 5000
DEFAULT_MEMORY_FRACTION = 0.5
DEFAULT_PRICE = Price(per_second=0.0001)
_TRANSPILE_LEVEL = 1
# Rotation-like gates the stabilizer method accepts only at multiples of pi/2.
_CLIFFORD_ANGLE_GATES = QUARTER_TURN_CLIFFORD_GATES
_CLIFFORD_NAMES = CLIFFORD_GATES | {PAULI} | ALWAYS_SUPPORTED


def _direct_execute(sim: Any) -> Callable[..., Any] | None:
    """Aer's job body, called in this thread; None where this Aer does not have it as expected.

    Why: ``AerSimulator.run(...).result()`` hands every run to a thread pool and waits for it:
    ~0.1-0.15 ms per run of thread hand-off (GIL and a condition variable), a tenth of a Bell
    pair's simulation. ``run`` does nothing else before calling this method (qiskit-aer 0.13 to
    0.18: ``_run_circuits`` wraps ``_execute_circuits_job(circuits, parameter_binds,
    run_options, job_id)`` in an ``AerJob``), so calling it directly gives the same result. It is
    private: its signature is checked once, and any other shape falls back to ``run``."""
    fn = getattr(sim, "_execute_circuits_job", None)
    if fn is None:
        return None
    ok = _DIRECT_OK.get(type(sim))
    if ok is None:
        import inspect

        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = []
        ok = _DIRECT_OK[type(sim)] = params[:4] == ["circuits", "parameter_binds", "run_options", "job_id"]
    return fn if ok else None


_DIRECT_OK: dict[type, bool] = {}


def canonical_method(method: str) -> str:
    """Accept the short names too (``mps``, ``sv``, ``dm``)."""
    m = ALIASES.get(method, method)
    if m not in METHODS:
        raise BackendError(f"unknown Aer method {method!r}.",
                           fix=f"use one of {', '.join(METHODS)} (or mps, sv, dm).")
    return m


@lru_cache(maxsize=None)
def supported_operations(method: str) -> frozenset[str]:
    """Operation names Aer's ``method`` runs without transpiling (cached per method)."""
    from qiskit_aer import AerSimulator

    sim = AerSimulator(method=method)
    names = set(sim.target.operation_names) | set(sim.configuration().basis_gates)
    return frozenset(names | ALWAYS_SUPPORTED)


def default_memory_bytes(fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """Half of the memory available now: what one simulation may take by default."""
    import psutil

    return int(psutil.virtual_memory().available * fraction)


def qubits_for_memory(method: str, memory_bytes: int) -> int:
    """Widest circuit ``method`` simulates within ``memory_bytes``."""
    if method == "statevector":
        return max(1, int(math.floor(math.log2(max(memory_bytes, 32) / 16))))
    if method == "density_matrix":
        return max(1, int(math.floor(math.log2(max(memory_bytes, 64) / 16) / 2)))
    if method in ("matrix_product_state", "automatic"):
        return MPS_MAX_QUBITS
    return STABILIZER_MAX_QUBITS


def is_clifford_circuit(circuit: "QuantumCircuit") -> bool:
    """True when every operation is Clifford (rotations only at multiples of pi/2)."""
    for inst in circuit.data:
        op = inst.operation
        name = op.name
        blocks = getattr(op, "blocks", None)
        if blocks:
            if not all(is_clifford_circuit(b) for b in blocks):
                return False
            continue
        if name in _CLIFFORD_NAMES:
            continue
        if name in _CLIFFORD_ANGLE_GATES and all(_is_quarter_turn(p) for p in op.params):
            continue
        if name.startswith("save_") or name == "store":
            continue
        return False
    return True


def _is_quarter_turn(param: Any) -> bool:
    try:
        value = float(param)
    except (TypeError, ValueError):  # unbound parameter
        return False
    ratio = value / (math.pi / 2)
    return abs(ratio - round(ratio)) < 1e-9


# Operations that hold blocks of other operations (``count_ops`` does not look inside them).
_CONTROL_FLOW = frozenset({"if_else", "while_loop", "for_loop", "switch_case", "box"})


def op_names(circuit: "QuantumCircuit") -> set[str]:
    """Every operation name in ``circuit``, including inside control-flow blocks.

    Why ``count_ops`` first: it counts in Qiskit's Rust core (~2 µs for a 10-qubit, 160-gate
    circuit) where walking ``circuit.data`` builds a Python object per instruction (~180 µs), on
    every run; only a circuit with control flow is walked, for the names inside its blocks."""
    names = set(circuit.count_ops())
    if not names & _CONTROL_FLOW:
        return names
    for inst in circuit.data:
        for block in getattr(inst.operation, "blocks", ()) or ():
            names |= op_names(block)
    return names


def result_counts(result: Any) -> dict[str, int]:
    """Counts of the first experiment; empty for a circuit that measures nothing.

    Why not always ``get_counts``: for one classical register the bit strings are Aer's hex
    keys in binary, zero-padded to the register, and formatting them here costs a quarter of
    what ``Counts`` does (0.34 -> ~0.08 ms at 10 qubits, 1024 shots). Several registers (keys
    with spaces between them) or anything unexpected go through Qiskit's own formatting."""
    try:
        exp = result.results[0]
        header = exp.header
        raw = exp.data.counts
        cregs = header.get("creg_sizes") if isinstance(header, dict) else None
        if isinstance(raw, dict) and cregs is not None and len(cregs) == 1 \
                and int(cregs[0][1]) == int(header.get("memory_slots", -1)):
            width = int(cregs[0][1])
            return {format(int(key, 16), f"0{width}b"): int(n) for key, n in raw.items()}
    except Exception:  # noqa: BLE001 - any surprise: Qiskit's formatting below decides
        pass
    try:
        return dict(result.get_counts(0))
    except Exception:  # QiskitError: no counts for an experiment without measurements
        return {}


class AerBackend:
    """One Aer simulation method, run in this process with a fixed number of threads."""

    def __init__(self, method: str, *, threads: int = 1, memory_bytes: int | None = None,
                 name: str | None = None, device: str = "CPU", price: Price | None = None) -> None:
        self._method = canonical_method(method)
        self._threads = max(1, int(threads))
        self._memory_bytes = int(memory_bytes) if memory_bytes is not None else default_memory_bytes()
        self._device = device.upper()
        if self._device not in ("CPU", "GPU"):
            raise BackendError(f"unknown Aer device {device!r}.", fix="use 'CPU' or 'GPU'.")
        suffix = "_gpu" if self._device == "GPU" else ""
        self._name = name or f"aer_{SHORT_NAMES.get(self._method, self._method)}{suffix}"
        self._price = price or DEFAULT_PRICE
        self._sim: AerSimulator | None = None
        self._spec: BackendSpec | None = None
        self._pass_manager: Any = None

    # -- protocol -------------------------------------------------------------------------

    def spec(self) -> BackendSpec:
        if self._spec is None:
            self._spec = BackendSpec(
                name=self._name,
                kind="simulator",
                family="aer",
                num_qubits=qubits_for_memory(self._method, self._memory_bytes),
                slots=1,
                method=self._method,
                basis_gates=tuple(sorted(supported_operations(self._method))),
                clifford_only=self._method == "stabilizer",
                memory_bytes=self._memory_bytes,
                threads=self._threads,
                noisy=False,
                price=self._price,
                description=f"Qiskit Aer {self._method} simulator on {self._device}, "
                            f"{self._threads} thread(s).",
            )
        return self._spec

    def calibration(self) -> Calibration | None:
        return None

    def run(self, circuit: "QuantumCircuit", shots: int, *, seed: int | None = None,
            on_submitted: Callable[[str], None] | None = None) -> RunResult:
        start = time.perf_counter()
        self._check_width(circuit)
        prepared, transpile_s = self.prepare(circuit)
        t_exec = time.perf_counter()
        result = self._execute(prepared, shots, seed)
        execute_s = time.perf_counter() - t_exec
        data = result.results[0]
        metadata = getattr(data, "metadata", {}) or {}
        return RunResult(
            counts=result_counts(result),
            shots=shots,
            backend=self._name,
            wall_s=time.perf_counter() - start,
            transpile_s=transpile_s,
            execute_s=execute_s,
            qpu_s=None,
            method=metadata.get("method", self._method),
            metadata={"transpiled": transpile_s > 0.0, "device": metadata.get("device", self._device),
                      "sim_time_s": float(getattr(data, "time_taken", 0.0) or 0.0),
                      "noise_model": "ideal"},
        )

    def estimate(self, circuit: "QuantumCircuit", options: "RunOptions", *, seed: int | None = None) -> RunResult:
        """Exact expectation values of ``options.observables`` on the circuit without its final
        measurements (``ray_qalloc.expectation``); ``stds`` are 0 and no shots are sampled."""
        from ray_qalloc.expectation import ExpectationResult, exact_on_aer, unmeasured

        assert options.observables is not None
        start = time.perf_counter()
        bare = unmeasured(circuit)
        self._check_width(bare)
        prepared, transpile_s = self.prepare(bare)
        t_exec = time.perf_counter()
        evs = exact_on_aer(self.simulator, prepared, options.observables, seed)
        execute_s = time.perf_counter() - t_exec
        expectation = ExpectationResult(evs, [0.0] * len(evs), exact=True, precision=options.precision)
        return RunResult(
            counts={}, shots=0, backend=self._name, wall_s=time.perf_counter() - start,
            transpile_s=transpile_s, execute_s=execute_s, qpu_s=None, method=self._method,
            metadata={"transpiled": transpile_s > 0.0, "device": self._device, "noise_model": "ideal",
                      "expectation": expectation.to_dict()})

    # -- helpers --------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self._method

    @property
    def simulator(self) -> "AerSimulator":
        """The one simulator instance this backend reuses for every run."""
        if self._sim is None:
            from qiskit_aer import AerSimulator

            options: dict[str, Any] = {"method": self._method,
                                       "max_parallel_threads": self._threads,
                                       "max_memory_mb": max(1, self._memory_bytes // 2**20)}
            if self._device == "GPU":
                options["device"] = "GPU"
            self._sim = AerSimulator(**options)
        return self._sim

    def warm_up(self) -> None:
        """Pay the one-time costs now (simulator, pass manager, the method's first run: ~0.3-0.6 s
        together), so that no job's run time includes them."""
        from qiskit import QuantumCircuit

        qc = QuantumCircuit(2, 2)
        qc.h(0)
        qc.cx(0, 1)
        qc.measure([0, 1], [0, 1])
        self._transpile(qc)
        self.run(qc, 16, seed=1)

    def prepare(self, circuit: "QuantumCircuit") -> tuple["QuantumCircuit", float]:
        """The circuit Aer will run, and the seconds spent transpiling (0 when not needed)."""
        names = op_names(circuit)
        if names <= supported_operations(self._method):
            prepared, transpile_s = circuit, 0.0
        else:
            prepared, transpile_s = self._transpile(circuit)
        if self._method == "stabilizer" and not is_clifford_circuit(prepared):
            raise BackendError(
                "the stabilizer simulator runs only Clifford circuits; this one has non-Clifford "
                f"operations ({', '.join(sorted(names - _CLIFFORD_NAMES))}).",
                fix="send it to a statevector or matrix_product_state backend, or remove the "
                    "non-Clifford gates (T, arbitrary rotations).")
        return prepared, transpile_s

    def _transpile(self, circuit: "QuantumCircuit") -> tuple["QuantumCircuit", float]:
        t0 = time.perf_counter()
        try:
            if self._pass_manager is None:
                # Built once: ``transpile()`` builds a pass manager per call, ~40 ms of a
                # ~2 ms transpile of a small circuit.
                from qiskit.transpiler import generate_preset_pass_manager

                self._pass_manager = generate_preset_pass_manager(
                    optimization_level=_TRANSPILE_LEVEL, backend=self.simulator, seed_transpiler=0)
            out = self._pass_manager.run(circuit)
        except Exception as exc:  # TranspilerError and friends
            raise BackendError(f"Aer {self._method} cannot express this circuit: {exc}",
                               fix="use only standard gates, or choose another method.") from exc
        return out, time.perf_counter() - t0

    def _check_width(self, circuit: "QuantumCircuit") -> None:
        limit = self.spec().num_qubits
        if circuit.num_qubits > limit:
            raise BackendError(
                f"{circuit.num_qubits} qubits exceed what {self._name} simulates "
                f"({limit} within {self._memory_bytes / 2**30:.1f} GiB).",
                fix="use a backend with more memory, or matrix_product_state/stabilizer.")

    def _execute(self, circuit: "QuantumCircuit", shots: int, seed: int | None) -> Any:
        options: dict[str, Any] = {"shots": shots}
        if seed is not None:
            options["seed_simulator"] = seed
        try:
            run_now = _direct_execute(self.simulator)
            if run_now is not None:
                result = run_now([circuit], None, options, job_id=str(uuid.uuid4()))
            else:
                result = self.simulator.run(circuit, **options).result()
        except Exception as exc:
            raise BackendError(f"Aer {self._method} failed to run the circuit: {exc}",
                               fix="check the circuit's width and gates against this backend's spec().") from exc
        if not result.success:
            status = getattr(result.results[0], "status", None) if result.results else result.status
            raise BackendError(f"Aer {self._method} could not run the circuit: {status}",
                               fix="check the circuit's width and gates against this backend's spec().")
        return result
