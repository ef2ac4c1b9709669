"""Emulated QPUs: IBM devices' calibration snapshots, run noisily with Aer on this machine.

Why emulate: placement must learn to trade queue time, price and fidelity between QPUs
without paying for hardware. ``qiskit_ibm_runtime.fake_provider`` ships real calibration
snapshots (T1/T2, gate and readout errors, gate durations) of 28 devices; this module
turns one of them into a backend whose results carry that device's noise and whose
``qpu_s`` is the time the device would have been busy.

Why not ``AerSimulator.from_backend``: a whole-device noise model of a 127-qubit chip takes
~1.7 s to build and every run on it pays 1-2.6 s even for one qubit. Instead each run

1. transpiles to the device target (optimization level 1, which includes a noise-aware
   VF2 layout, so broken couplers with error 1.0 are avoided),
2. finds the physical qubits the transpiled circuit actually uses and remaps it onto a
   compact register of just those qubits,
3. builds a noise model for just those qubits from the target (per qubit: thermal
   relaxation over the gate's duration plus depolarizing noise making up the rest of
   the gate error; per used coupler: the same for the two-qubit gate; per qubit: a
   symmetric readout error). Noise models are cached by the tuple of used qubits (LRU).

Approximation for wide circuits (documented, deliberate): exact noisy simulation grows
quickly (QFT-12 on a 127-qubit device took 25-31 s), so when more than
``exact_max_qubits`` (default 10) qubits are active the circuit is simulated *ideally*
(stabilizer for Clifford circuits, statevector up to ``STATEVECTOR_MAX_QUBITS``, MPS
beyond) and the noise is applied as a global depolarizing mix: each shot is kept with
probability ``esp_gates * esp_decoherence`` and otherwise replaced by a uniformly random
bitstring on the measured bits; then every measured bit is flipped independently with its
qubit's readout error. The reported ``esp`` (estimated success probability) is the
product of (1 - gate error) over the transpiled gates, (1 - readout error) over the
measurements, and exp(-idle/T1 - idle/T2) over each active qubit's idle time. Readout
is not counted twice: it enters the shots through the bit flips only.
``metadata["noise_model"]`` says which path ran: ``"exact_local"`` or
``"global_depolarizing"``.

Test-only miscalibration (``noise_scale``, default 1): the noise *applied* is that of a
device whose gate and readout errors are ``noise_scale``× and whose T1/T2 are 1/``noise_scale``×
what its calibration says, while ``calibration()``, the transpiler's view and the reported
``esp`` stay those of the advertised calibration — a device noisier than it claims, which
learned fidelity corrections must discover from measured counts (``metadata["noise_scale"]``).

Modelled QPU time: ``qpu_s = shots * (duration + rep_delay) + overhead_s``, where
``duration`` is the critical path through the transpiled circuit with each instruction's
duration from the target (measurements included).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ray_qalloc.backends.aer import AerBackend, is_clifford_circuit, result_counts
from ray_qalloc.backends.base import BackendSpec, Calibration, Price, RunResult
from ray_qalloc.exceptions import BackendError

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit
    from qiskit.providers import BackendV2
    from qiskit.transpiler import Target
    from qiskit_aer.noise import NoiseModel

    from ray_qalloc.monitor.drift import DriftModel, DriftSettings

DEFAULT_OVERHEAD_S = 2.0
DEFAULT_REP_DELAY_S = 250e-6
DEFAULT_EXACT_MAX_QUBITS = 10
DEFAULT_NOISE_CACHE = 64
DEFAULT_SEED_TRANSPILER = 7
STATEVECTOR_MAX_QUBITS = 26
BROKEN_COUPLER_ERROR = 0.5
QPU_PRICE = Price(per_second=1.6, per_job=0.0)
_NO_TIME_OPS = frozenset({"barrier"})
_NOT_GATES = frozenset({"measure", "reset", "delay", "barrier"})
_UNITS_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "ps": 1e-12}

# The default emulated devices: three different processors and gate sets (CZ and ECR).
DEFAULT_DEVICES: tuple[str, ...] = ("fake_torino", "fake_sherbrooke", "fake_fez")


# ----------------------------------------------------------------------------- devices


def fake_device_class_name(device: str) -> str:
    """``fake_torino`` / ``torino`` / ``FakeTorino`` -> ``FakeTorino``."""
    if device.startswith("Fake"):
        return device
    short = device.lower().removeprefix("fake_").removeprefix("fake")
    if short.endswith("_v2") or short.endswith("v2"):
        short = short.removesuffix("_v2").removesuffix("v2")
        return f"Fake{short.capitalize()}V2"
    return f"Fake{short.capitalize()}"


def load_fake_device(device: str) -> "BackendV2":
    """Instantiate a fake device of ``qiskit_ibm_runtime.fake_provider`` by name, or one of the
    trapped-ion / neutral-atom devices of ``backends.architectures`` (``fake_ion_aria``, ...)."""
    from qiskit_ibm_runtime import fake_provider

    from ray_qalloc.backends.architectures import architecture_device

    emulated = architecture_device(device)
    if emulated is not None:
        return emulated  # type: ignore[return-value]

    cls_name = fake_device_class_name(device)
    cls = None
    if not cls_name.endswith("V2"):  # prefer the BackendV2 flavour where both exist
        cls = getattr(fake_provider, cls_name + "V2", None)
    cls = cls or getattr(fake_provider, cls_name, None)
    if cls is None:
        raise BackendError(f"no fake device named {device!r} in qiskit_ibm_runtime.fake_provider.",
                           fix="use a name such as fake_torino, fake_sherbrooke, fake_fez or fake_manila_v2.")
    return cls()


def short_device_name(backend_name: str) -> str:
    """``fake_torino`` -> ``torino``; ``fake_manila_v2`` -> ``manila``."""
    return backend_name.removeprefix("fake_").removesuffix("_v2")


def rep_delay_of(backend: Any) -> float:
    """The device's default repetition delay in seconds (250 µs when it does not say)."""
    value = getattr(backend, "default_rep_delay", None)
    if value is None:
        try:
            value = getattr(backend.configuration(), "default_rep_delay", None)
        except Exception:  # not every backend has a configuration
            value = None
    try:
        value = float(value) if value is not None else DEFAULT_REP_DELAY_S
    except (TypeError, ValueError):
        return DEFAULT_REP_DELAY_S
    return value if value > 0 else DEFAULT_REP_DELAY_S


def snapshot_time(backend: Any) -> float:
    """Unix time of the calibration snapshot (now when the backend does not say)."""
    try:
        props = backend.properties()
        stamp = getattr(props, "last_update_date", None)
        if stamp is not None:
            return float(stamp.timestamp())
    except Exception:  # properties are optional for V2 backends
        pass
    return time.time()


def usable_target(target: "Target", max_error: float = BROKEN_COUPLER_ERROR) -> "Target":
    """A copy of ``target`` without the two-qubit couplers whose error is ``max_error`` or more.

    Snapshots mark broken couplers with error 1.0 (FakeSherbrooke has nine, FakeFez
    seven). VF2 layout avoids them for circuits that fit without swaps, but Sabre routing
    of wider circuits does not look at errors and would route through them, so the
    transpiler gets a target where they do not exist. Noise and ESP still read the
    original target.
    """
    from qiskit.transpiler import Target

    out = Target(description=target.description, num_qubits=target.num_qubits, dt=target.dt,
                 granularity=target.granularity, min_length=target.min_length,
                 pulse_alignment=target.pulse_alignment, acquire_alignment=target.acquire_alignment,
                 qubit_properties=target.qubit_properties,
                 concurrent_measurements=target.concurrent_measurements)
    for name in target.operation_names:
        op = target.operation_from_name(name)
        props = target[name]
        if isinstance(op, type) or not props or None in props:
            out.add_instruction(op, name=name)
            continue
        keep = {qargs: p for qargs, p in props.items()
                if not (len(qargs) == 2 and p is not None and p.error is not None and p.error >= max_error)}
        out.add_instruction(op, keep, name=name)
    return out


def device_pass_manager(target: "Target", seed_transpiler: int | None = DEFAULT_SEED_TRANSPILER) -> Any:
    """Level-1 preset pass manager with level 2's noise-aware layout stage.

    Level 1 keeps a trivial layout whenever it needs no swaps, so a GHZ-3 lands on qubits
    0-2 whatever their errors (FakeTorino's qubit 0 reads out wrong 17% of the time);
    level 2's layout stage tries VF2Layout, which scores layouts by the target's errors
    and so avoids broken couplers (error 1.0), for about half a millisecond more.
    """
    from qiskit.transpiler import generate_preset_pass_manager

    from ray_qalloc.backends.architectures import best_qubits_layout_stage, is_all_to_all

    pm = generate_preset_pass_manager(optimization_level=1, target=target, seed_transpiler=seed_transpiler)
    if is_all_to_all(target):  # ions, atoms: no routing; layout only picks the best qubits
        pm.layout = best_qubits_layout_stage(target)
        return pm
    pm.layout = generate_preset_pass_manager(optimization_level=2, target=target,
                                             seed_transpiler=seed_transpiler).layout
    return pm


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """Timing of a transpiled circuit on a device: critical path and per-qubit idle time."""

    duration_s: float
    idle_s: dict[int, float]


def _instruction_properties(target: "Target", name: str, qargs: tuple[int, ...]) -> Any:
    if name not in target.operation_names:
        return None
    try:
        return target[name].get(qargs)
    except Exception:  # global operations have no per-qargs map
        return None


def _delay_seconds(op: Any, dt: float | None) -> float:
    duration = float(getattr(op, "duration", 0.0) or 0.0)
    unit = getattr(op, "unit", "dt")
    if unit == "dt":
        return duration * (dt or 0.0)
    return duration * _UNITS_S.get(unit, 0.0)


def _qubit_indices(circuit: "QuantumCircuit") -> dict[Any, int]:
    return {q: i for i, q in enumerate(circuit.qubits)}


def scheduled_duration(circuit: "QuantumCircuit", target: "Target") -> Schedule:
    """ASAP schedule with per-qubit clocks: the circuit's critical path in seconds.

    Each instruction starts when all its qubits are free and lasts the duration the
    target gives it (0 when unknown); barriers synchronise their qubits. A qubit's idle
    time counts the gaps after its first operation (a qubit still in |0> does not decay).
    """
    index = _qubit_indices(circuit)
    clock: dict[int, float] = {}
    idle: dict[int, float] = {}
    for inst in circuit.data:
        qargs = tuple(index[q] for q in inst.qubits)
        if not qargs:
            continue
        name = inst.operation.name
        start = max(clock.get(q, 0.0) for q in qargs)
        if name in _NO_TIME_OPS:
            for q in qargs:
                if q in clock:
                    idle[q] += start - clock[q]
                    clock[q] = start
            continue
        if name == "delay":
            length = _delay_seconds(inst.operation, target.dt)
        else:
            props = _instruction_properties(target, name, qargs)
            length = float(props.duration) if props is not None and props.duration else 0.0
        for q in qargs:
            if q in clock:
                idle[q] += start - clock[q]
            else:
                idle[q] = 0.0
            clock[q] = start + length
    return Schedule(duration_s=max(clock.values(), default=0.0), idle_s=idle)


def modelled_qpu_seconds(shots: int, duration_s: float, rep_delay_s: float, overhead_s: float) -> float:
    """Busy time of a QPU for one job: every shot plays the circuit then waits rep_delay."""
    return shots * (duration_s + rep_delay_s) + overhead_s


# ----------------------------------------------------------------------------- fidelity


@dataclass(frozen=True)
class SuccessEstimate:
    """Estimated success probability and its three factors."""

    gates: float
    readout: float
    decoherence: float

    @property
    def esp(self) -> float:
        return self.gates * self.readout * self.decoherence


def estimate_success(circuit: "QuantumCircuit", target: "Target", schedule: Schedule) -> SuccessEstimate:
    """ESP of a transpiled circuit from the target's errors and the qubits' T1/T2."""
    index = _qubit_indices(circuit)
    gates = 1.0
    readout = 1.0
    for inst in circuit.data:
        name = inst.operation.name
        if name in ("barrier", "delay"):
            continue
        props = _instruction_properties(target, name, tuple(index[q] for q in inst.qubits))
        error = float(props.error) if props is not None and props.error is not None else 0.0
        if name == "measure":
            readout *= 1.0 - min(max(error, 0.0), 1.0)
        else:
            gates *= 1.0 - min(max(error, 0.0), 1.0)
    decoherence = 1.0
    qprops = target.qubit_properties
    for q, idle in schedule.idle_s.items():
        if idle <= 0 or not qprops or q >= len(qprops) or qprops[q] is None:
            continue
        t1, t2 = qprops[q].t1, qprops[q].t2
        rate = (1.0 / t1 if t1 else 0.0) + (1.0 / t2 if t2 else 0.0)
        decoherence *= math.exp(-idle * rate)
    return SuccessEstimate(gates=gates, readout=readout, decoherence=decoherence)


# ----------------------------------------------------------------------------- layout


def active_qubits(circuit: "QuantumCircuit") -> tuple[int, ...]:
    """Physical qubits that some operation other than a barrier or delay touches."""
    index = _qubit_indices(circuit)
    used: set[int] = set()
    for inst in circuit.data:
        if inst.operation.name in ("barrier", "delay"):
            continue
        used.update(index[q] for q in inst.qubits)
    return tuple(sorted(used))


def compact_circuit(circuit: "QuantumCircuit", qubits: tuple[int, ...]) -> "QuantumCircuit":
    """``circuit`` on a register of just ``qubits`` (physical qubit ``qubits[i]`` -> ``i``).

    Classical bits and registers are kept as they are, so counts read the same. Barriers
    and delays on dropped qubits are trimmed to the kept ones.
    """
    from qiskit import QuantumCircuit, QuantumRegister
    from qiskit.circuit import CircuitInstruction

    index = _qubit_indices(circuit)
    position = {p: i for i, p in enumerate(qubits)}
    qreg = QuantumRegister(max(1, len(qubits)), "q")
    out = QuantumCircuit(qreg, name=circuit.name, global_phase=circuit.global_phase)
    out.add_bits(list(circuit.clbits))
    for creg in circuit.cregs:
        out.add_register(creg)
    for inst in circuit.data:
        phys = [index[q] for q in inst.qubits]
        name = inst.operation.name
        if name in ("barrier", "delay"):
            kept = [qreg[position[p]] for p in phys if p in position]
            if not kept:
                continue
            op = inst.operation
            if name == "barrier" and len(kept) != len(phys):
                from qiskit.circuit import Barrier

                op = Barrier(len(kept))
            elif name == "delay" and len(kept) != len(phys):
                continue
            out._append(CircuitInstruction(op, tuple(kept), inst.clbits))
            continue
        out._append(CircuitInstruction(inst.operation, tuple(qreg[position[p]] for p in phys), inst.clbits))
    return out


def measured_qubits(circuit: "QuantumCircuit") -> dict[int, int]:
    """Clbit index -> physical qubit last measured into it."""
    qindex = _qubit_indices(circuit)
    cindex = {c: i for i, c in enumerate(circuit.clbits)}
    out: dict[int, int] = {}
    for inst in circuit.data:
        if inst.operation.name == "measure":
            out[cindex[inst.clbits[0]]] = qindex[inst.qubits[0]]
    return out


# ----------------------------------------------------------------------------- noise


def _relaxation_process_fidelity(t1: float | None, t2: float | None, length: float) -> float:
    """Process fidelity of 1-qubit thermal relaxation: (1 + 2 e^{-t/T2} + e^{-t/T1}) / 4."""
    if not t1 or not t2 or length <= 0:
        return 1.0
    return (1.0 + 2.0 * math.exp(-length / t2) + math.exp(-length / t1)) / 4.0


def _depolarizing_param(gate_error: float, num_qubits: int, relax_fidelity: float) -> float:
    """Depolarizing parameter that makes (depolarizing ∘ relaxation) reach ``gate_error``."""
    dim = 2 ** num_qubits
    total_fidelity = 1.0 - gate_error * (dim + 1) / dim  # average -> process fidelity
    dep_fidelity = total_fidelity / relax_fidelity if relax_fidelity > 0 else total_fidelity
    param = (1.0 - dep_fidelity) / (1.0 - 1.0 / dim**2)
    return min(max(param, 0.0), dim**2 / (dim**2 - 1))


def _t1_t2(target: "Target", q: int) -> tuple[float | None, float | None]:
    qprops = target.qubit_properties
    if not qprops or q >= len(qprops) or qprops[q] is None:
        return None, None
    t1, t2 = qprops[q].t1, qprops[q].t2
    if t1 and t2:
        t2 = min(t2, 2.0 * t1)  # physical bound Aer enforces
    return t1, t2


def _relaxation(target: "Target", qubits: tuple[int, ...], length: float) -> tuple[Any, float]:
    """Thermal relaxation of ``qubits`` over ``length`` seconds, and its process fidelity.

    Qubit ``qubits[0]`` is the error's subsystem 0 (``a.expand(b)`` is ``b ⊗ a``).
    """
    from qiskit_aer.noise import thermal_relaxation_error

    if length <= 0:
        return None, 1.0
    parts = []
    fidelity = 1.0
    for q in qubits:
        t1, t2 = _t1_t2(target, q)
        if not (t1 and t2):
            parts.append(_identity_error())
            continue
        parts.append(thermal_relaxation_error(t1, t2, length))
        fidelity *= _relaxation_process_fidelity(t1, t2, length)
    if fidelity >= 1.0:
        return None, 1.0
    error = parts[0]
    for part in parts[1:]:
        error = error.expand(part)
    return error, fidelity


def _gate_error(target: "Target", qubits: tuple[int, ...], props: Any) -> Any:
    """Depolarizing plus thermal relaxation noise of one gate on physical ``qubits``."""
    from qiskit_aer.noise import depolarizing_error

    relax, relax_fidelity = _relaxation(target, qubits, float(props.duration or 0.0))
    error = min(max(float(props.error or 0.0), 0.0), 1.0)
    param = _depolarizing_param(error, len(qubits), relax_fidelity) if error > 0 else 0.0
    combined = depolarizing_error(param, len(qubits)) if param > 0 else None
    if relax is not None:
        combined = relax if combined is None else combined.compose(relax)
    return combined


def _identity_error() -> Any:
    from qiskit_aer.noise import depolarizing_error

    return depolarizing_error(0.0, 1)


def local_noise_model(target: "Target", qubits: tuple[int, ...]) -> "NoiseModel":
    """Noise model of only ``qubits`` (physical), indexed 0..len-1 in their order."""
    from qiskit_aer.noise import NoiseModel, ReadoutError

    position = {p: i for i, p in enumerate(qubits)}
    gate_names = [n for n in target.operation_names if not isinstance(target.operation_from_name(n), type)]
    model = NoiseModel(basis_gates=[n for n in gate_names if n not in _NOT_GATES])
    for name in gate_names:
        if name in ("delay", "reset", "barrier"):
            continue
        for qargs, props in target[name].items():
            if qargs is None or props is None or not all(q in position for q in qargs):
                continue
            local = [position[q] for q in qargs]
            if name == "measure":
                p = min(max(float(props.error or 0.0), 0.0), 1.0)
                if p > 0:
                    model.add_readout_error(ReadoutError([[1 - p, p], [p, 1 - p]]), local)
                continue
            error = _gate_error(target, qargs, props)
            if error is not None:
                model.add_quantum_error(error, name, local)
    return model


# ----------------------------------------------------------------------------- depolarizing


def depolarize_counts(counts: dict[str, int], keep: float, flips: dict[int, float],
                      rng: np.random.Generator, chunk: int = 1 << 16) -> dict[str, int]:
    """Global depolarizing mix plus readout flips on ideal counts.

    ``flips`` maps each measured clbit index to its readout error; only those bits are
    randomised. Keys keep Qiskit's format (registers separated by spaces).
    """
    if not counts:
        return {}
    template = next(iter(counts))
    spaces = [i for i, ch in enumerate(template) if ch == " "]
    width = len(template) - len(spaces)
    cols = np.array([width - 1 - c for c in sorted(flips) if c < width], dtype=np.intp)
    probs = np.array([flips[c] for c in sorted(flips) if c < width], dtype=float)
    keys = list(counts)
    rows = np.array([[ch == "1" for ch in k.replace(" ", "")] for k in keys], dtype=np.uint8)
    order = np.repeat(np.arange(len(keys)), [counts[k] for k in keys])
    tally: dict[bytes, int] = {}
    for start in range(0, len(order), chunk):
        block = rows[order[start:start + chunk]].copy()
        n = len(block)
        if len(cols):
            replaced = np.nonzero(rng.random(n) >= keep)[0]
            if len(replaced):
                block[np.ix_(replaced, cols)] = rng.integers(0, 2, size=(len(replaced), len(cols)),
                                                             dtype=np.uint8)
            flip = (rng.random((n, len(cols))) < probs).astype(np.uint8)
            block[:, cols] ^= flip
        uniq, freq = np.unique(block, axis=0, return_counts=True)
        for row, f in zip(uniq, freq):
            key = row.tobytes()
            tally[key] = tally.get(key, 0) + int(f)
    return {_format_key(k, spaces): v for k, v in tally.items()}


def _format_key(raw: bytes, spaces: list[int]) -> str:
    chars = ["1" if b else "0" for b in raw]
    for pos in spaces:
        chars.insert(pos, " ")
    return "".join(chars)


# ----------------------------------------------------------------------------- calibration


def _median(values: Iterable[float]) -> float:
    good = [v for v in values if v is not None and v == v]
    return float(statistics.median(good)) if good else float("nan")


def calibration_of(backend: Any, name: str | None = None) -> Calibration:
    """Calibration value object of a BackendV2 (real or fake), from its target."""
    return calibration_from_target(backend.target, backend.num_qubits, name or backend.name,
                                   snapshot_time(backend), rep_delay_of(backend))


def calibration_from_target(target: "Target", n: int, name: str, taken_at: float,
                            rep_delay_s: float) -> Calibration:
    """Calibration value object of ``target`` (a device's, or a drifted copy of it)."""
    qprops = target.qubit_properties or [None] * n
    nan = float("nan")
    t1 = tuple(float(p.t1) if p is not None and p.t1 is not None else nan for p in qprops)
    t2 = tuple(float(p.t2) if p is not None and p.t2 is not None else nan for p in qprops)
    readout: list[float] = []
    gate_error: dict[str, float] = {}
    gate_duration: dict[str, float] = {}
    edge_error: dict[tuple[int, int], float] = {}
    measure = target["measure"] if "measure" in target.operation_names else {}
    for q in range(n):
        props = measure.get((q,)) if measure else None
        readout.append(float(props.error) if props is not None and props.error is not None else nan)
    for op_name in target.operation_names:
        if isinstance(target.operation_from_name(op_name), type) or op_name in ("delay", "barrier"):
            continue
        entries = [(qa, p) for qa, p in target[op_name].items() if qa is not None and p is not None]
        errors = [p.error for _, p in entries if p.error is not None]
        durations = [p.duration for _, p in entries if p.duration is not None]
        if errors:
            gate_error[op_name] = _median(errors)
        if durations:
            gate_duration[op_name] = _median(durations)
        for qa, p in entries:
            if len(qa) == 2 and p.error is not None:
                edge_error[qa] = min(float(p.error), edge_error.get(qa, 1.0))
    return Calibration(
        backend=name,
        taken_at=taken_at,
        t1_s=t1,
        t2_s=t2,
        readout_error=tuple(readout),
        gate_error=gate_error,
        gate_duration_s=gate_duration,
        readout_duration_s=gate_duration.get("measure", 0.0),
        edge_error=edge_error,
        rep_delay_s=rep_delay_s,
    )


def qubit_gate_errors_of(target: "Target", ops: Iterable[str] = ("sx", "x")) -> dict[str, tuple[float, ...]]:
    """Per-qubit errors of the single-qubit ``ops`` (NaN where unknown): ``Calibration`` keeps medians only."""
    n = target.num_qubits
    out: dict[str, tuple[float, ...]] = {}
    for op in ops:
        if op not in target.operation_names:
            continue
        values = [float("nan")] * n
        for qargs, p in target[op].items():
            if qargs is not None and len(qargs) == 1 and p is not None and p.error is not None:
                values[qargs[0]] = float(p.error)
        out[op] = tuple(values)
    return out


# ----------------------------------------------------------------------------- backend


@dataclass
class _DeviceView:
    """The device during one calibration epoch: its target and what is built from it.

    Without drift there is one view, of the snapshot, for the backend's lifetime. With drift
    a new view replaces it each time the drift clock enters a new epoch (``step_s``), and a
    run uses the view it started with throughout, so transpilation, noise and ESP agree.
    """

    epoch: int
    target: "Target"
    taken_at: float | None = None                 # None: the snapshot's own time
    calibration: Calibration | None = None
    pass_manager: Any = None
    gate_errors: dict[str, tuple[float, ...]] | None = None
    noise_cache: OrderedDict[tuple[int, ...], "NoiseModel"] = field(default_factory=OrderedDict)
    noise_target: "Target | None" = None           # the target noise is built from (noise_scale ≠ 1)


class FakeQPUBackend:
    """One emulated IBM device: noisy Aer runs of circuits transpiled to its target.

    ``drift`` (off by default: the snapshot, exactly as before) makes the device drift over
    time (``ray_qalloc.monitor.drift``): calibration, transpilation (noise-aware layout),
    noise and ESP all follow the drifted target. Drift time is ``clock()`` minus the drift
    origin (``DriftSettings.origin_s``, else the clock at construction); ``clock`` defaults to
    wall time and is injectable for tests and benchmarks.
    """

    def __init__(self, device: str = "fake_torino", *, name: str | None = None,
                 overhead_s: float = DEFAULT_OVERHEAD_S,
                 exact_max_qubits: int = DEFAULT_EXACT_MAX_QUBITS,
                 price: Price | None = None, threads: int = 1,
                 seed_transpiler: int = DEFAULT_SEED_TRANSPILER,
                 noise_cache_size: int = DEFAULT_NOISE_CACHE,
                 drift: "DriftSettings | None" = None,
                 clock: Callable[[], float] | None = None,
                 noise_scale: float = 1.0) -> None:
        if not noise_scale > 0:
            raise BackendError(f"noise_scale must be positive, not {noise_scale!r}.", fix="use e.g. 1.0 or 3.0.")
        self._noise_scale = float(noise_scale)
        self._device = load_fake_device(device)
        self._device_name = self._device.name
        self._name = name or f"qpu_{short_device_name(self._device_name)}"
        self._overhead_s = float(overhead_s)
        self._exact_max_qubits = int(exact_max_qubits)
        self._price = price or getattr(self._device, "qalloc_price", None) or QPU_PRICE
        self._threads = max(1, int(threads))
        self._seed_transpiler = seed_transpiler
        self._noise_cache_size = noise_cache_size
        self._lock = threading.Lock()
        self._spec: BackendSpec | None = None
        self._noisy_sim: Any = None
        self._ideal: dict[str, AerBackend] = {}
        self._drift = drift
        self._clock = clock or time.time
        self._origin = 0.0
        if drift is not None:
            self._origin = drift.origin_s if drift.origin_s is not None else self._clock()
        self._drift_model: "DriftModel | None" = None
        self._view: _DeviceView | None = None

    # -- protocol -------------------------------------------------------------------------

    def spec(self) -> BackendSpec:
        if self._spec is None:
            target = self._device.target
            basis = tuple(sorted(n for n in target.operation_names
                                 if not isinstance(target.operation_from_name(n), type)))
            self._spec = BackendSpec(
                name=self._name, kind="qpu", family="fake_qpu",
                num_qubits=self._device.num_qubits, slots=1, device=self._device_name,
                basis_gates=basis, noisy=True, threads=self._threads, price=self._price,
                description=getattr(self._device, "qalloc_description", None) or
                f"Emulated {self._device_name} ({self._device.num_qubits} qubits) "
                "with its calibration snapshot; Aer noise on the used qubits only.")
        return self._spec

    def calibration(self) -> Calibration:
        return self._calibration_of(self._current_view())

    def qubit_gate_errors(self) -> dict[str, tuple[float, ...]]:
        """Per-qubit sx and x errors now (``Calibration`` has device medians only)."""
        view = self._current_view()
        if view.gate_errors is None:
            view.gate_errors = qubit_gate_errors_of(view.target)
        return view.gate_errors

    def run(self, circuit: "QuantumCircuit", shots: int, *, seed: int | None = None,
            on_submitted: Callable[[str], None] | None = None) -> RunResult:
        start = time.perf_counter()
        if circuit.num_qubits > self._device.num_qubits:
            raise BackendError(f"{circuit.num_qubits} qubits exceed {self._device_name}'s "
                               f"{self._device.num_qubits}.", fix="choose a larger device or a simulator.")
        view = self._current_view()
        t0 = time.perf_counter()
        transpiled = self._transpile(circuit, view)
        transpile_s = time.perf_counter() - t0
        target = view.target
        schedule = scheduled_duration(transpiled, target)
        success = estimate_success(transpiled, target, schedule)
        layout = active_qubits(transpiled)
        t1 = time.perf_counter()
        if len(layout) <= self._exact_max_qubits:
            counts, method = self._run_exact(transpiled, layout, shots, seed, view)
            noise = "exact_local"
        else:
            counts, method = self._run_global(circuit, transpiled, success, shots, seed, view)
            noise = "global_depolarizing"
        execute_s = time.perf_counter() - t1
        calibration = self._calibration_of(view)
        rep_delay = calibration.rep_delay_s
        metadata = {"noise_model": noise, "layout": list(layout), "esp": success.esp,
                    "esp_gates": success.gates, "esp_readout": success.readout,
                    "esp_decoherence": success.decoherence, "duration_s": schedule.duration_s,
                    "rep_delay_s": rep_delay, "overhead_s": self._overhead_s,
                    "device": self._device_name, "depth": transpiled.depth()}
        if self._noise_scale != 1.0:
            metadata["noise_scale"] = self._noise_scale
        if self._drift is not None:
            metadata["calibration_at"] = calibration.taken_at
        return RunResult(
            counts=counts, shots=shots, backend=self._name,
            wall_s=time.perf_counter() - start, transpile_s=transpile_s, execute_s=execute_s,
            qpu_s=modelled_qpu_seconds(shots, schedule.duration_s, rep_delay, self._overhead_s),
            method=method, metadata=metadata)

    # -- drift ----------------------------------------------------------------------------

    @property
    def drift_model(self) -> "DriftModel | None":
        """The device's drift model (None when drift is off)."""
        if self._drift is not None and self._drift_model is None:
            from ray_qalloc.monitor.drift import DriftModel

            self._drift_model = DriftModel.for_target(self._device.target, self._drift, self._device_name)
        return self._drift_model

    def drift_time(self) -> float:
        """Seconds of drift time now (0 when drift is off)."""
        return max(0.0, self._clock() - self._origin) if self._drift is not None else 0.0

    def _current_view(self) -> _DeviceView:
        if self._drift is None:
            if self._view is None:
                with self._lock:
                    if self._view is None:
                        self._view = _DeviceView(epoch=0, target=self._device.target)
            return self._view
        epoch = int(self.drift_time() // self._drift.step_s)
        view = self._view
        if view is not None and view.epoch == epoch:
            return view
        from ray_qalloc.monitor.drift import apply_to_target

        model = self.drift_model
        assert model is not None
        t = epoch * self._drift.step_s
        target = apply_to_target(self._device.target, model.baseline, model.state_at(t))
        view = _DeviceView(epoch=epoch, target=target, taken_at=self._origin + t)
        with self._lock:
            if self._view is None or self._view.epoch != epoch:
                self._view = view
            return self._view

    def _calibration_of(self, view: _DeviceView) -> Calibration:
        if view.calibration is None:
            if view.taken_at is None:
                view.calibration = calibration_of(self._device, self._name)
            else:
                view.calibration = calibration_from_target(view.target, self._device.num_qubits, self._name,
                                                           view.taken_at, rep_delay_of(self._device))
        return view.calibration

    # -- steps ----------------------------------------------------------------------------

    @property
    def device(self) -> "BackendV2":
        return self._device

    @property
    def target(self) -> "Target":
        """The device's target now: the snapshot's, or its drifted copy."""
        return self._current_view().target

    @property
    def overhead_s(self) -> float:
        return self._overhead_s

    def transpile(self, circuit: "QuantumCircuit") -> "QuantumCircuit":
        """``circuit`` transpiled to the device (layout avoids broken couplers)."""
        return self._transpile(circuit, self._current_view())

    def _transpile(self, circuit: "QuantumCircuit", view: _DeviceView) -> "QuantumCircuit":
        if view.pass_manager is None:
            view.pass_manager = device_pass_manager(usable_target(view.target), self._seed_transpiler)
        if "ecr" in circuit.count_ops():
            # A user's ECR on a coupler the device drives only the other way fails the direction
            # pass ("no rules are known"): give the transpiler its definition instead.
            circuit = circuit.decompose(gates_to_decompose=["ecr"])
        try:
            return view.pass_manager.run(circuit)
        except Exception as exc:
            raise BackendError(f"cannot transpile the circuit to {self._device_name}: {exc}",
                               fix="use standard gates and at most the device's qubit count.") from exc

    def noise_model(self, qubits: tuple[int, ...]) -> "NoiseModel":
        """Noise model of the physical ``qubits`` (cached, least recently used evicted)."""
        return self._noise_model(qubits, self._current_view())

    def _noise_model(self, qubits: tuple[int, ...], view: _DeviceView) -> "NoiseModel":
        cache = view.noise_cache
        with self._lock:
            model = cache.get(qubits)
            if model is not None:
                cache.move_to_end(qubits)
                return model
        model = local_noise_model(self._noise_target(view), qubits)
        with self._lock:
            cache[qubits] = model
            while len(cache) > self._noise_cache_size:
                cache.popitem(last=False)
        return model

    def _noise_target(self, view: _DeviceView) -> "Target":
        """The target whose errors the emulator applies: the calibration's, or its scaled copy."""
        if self._noise_scale == 1.0:
            return view.target
        if view.noise_target is None:
            view.noise_target = scaled_target(view.target, self._noise_scale)
        return view.noise_target

    def _run_exact(self, transpiled: "QuantumCircuit", layout: tuple[int, ...], shots: int,
                   seed: int | None, view: _DeviceView) -> tuple[dict[str, int], str]:
        compact = compact_circuit(transpiled, layout)
        model = self._noise_model(layout, view)
        if self._noisy_sim is None:
            from qiskit_aer import AerSimulator

            self._noisy_sim = AerSimulator(max_parallel_threads=self._threads)
        options: dict[str, Any] = {"shots": shots, "noise_model": model}
        if seed is not None:
            options["seed_simulator"] = seed
        try:
            result = self._noisy_sim.run(compact, **options).result()
        except Exception as exc:
            raise BackendError(f"noisy emulation of {self._device_name} failed: {exc}",
                               fix="check the circuit; try fewer qubits.") from exc
        if not result.success:
            raise BackendError(f"noisy emulation of {self._device_name} failed: {result.status}",
                               fix="check the circuit; try fewer qubits.")
        method = (result.results[0].metadata or {}).get("method", "automatic")
        return result_counts(result), method

    def _ideal_backend(self, circuit: "QuantumCircuit") -> AerBackend:
        if is_clifford_circuit(circuit):
            method = "stabilizer"
        elif circuit.num_qubits <= STATEVECTOR_MAX_QUBITS:
            method = "statevector"
        else:
            method = "matrix_product_state"
        if method not in self._ideal:
            self._ideal[method] = AerBackend(method, threads=self._threads, name=f"{self._name}_ideal")
        return self._ideal[method]

    def _run_global(self, circuit: "QuantumCircuit", transpiled: "QuantumCircuit",
                    success: SuccessEstimate, shots: int,
                    seed: int | None, view: _DeviceView) -> tuple[dict[str, int], str]:
        ideal = self._ideal_backend(circuit).run(circuit, shots, seed=seed)
        if self._noise_scale != 1.0:   # the noise applied is the scaled device's, not the advertised one
            noisy = self._noise_target(view)
            success = estimate_success(transpiled, noisy, scheduled_duration(transpiled, noisy))
            readout = _readout_errors(noisy)
        else:
            readout = self._calibration_of(view).readout_error
        flips = {c: _finite(readout[q]) for c, q in measured_qubits(transpiled).items()}
        rng = np.random.default_rng(seed)
        keep = success.gates * success.decoherence
        return depolarize_counts(ideal.counts, keep, flips, rng), ideal.method or "automatic"


def _finite(value: float) -> float:
    return value if value == value else 0.0


def _readout_errors(target: "Target") -> list[float]:
    out = [float("nan")] * target.num_qubits
    if "measure" in target.operation_names:
        for qargs, p in target["measure"].items():
            if qargs is not None and p is not None and p.error is not None:
                out[qargs[0]] = float(p.error)
    return out


def scaled_target(target: "Target", scale: float) -> "Target":
    """A copy of ``target`` with every error ×``scale`` (capped: gates 0.75, readout 0.5) and
    T1/T2 ÷``scale``; durations unchanged. Test-only miscalibration (``noise_scale``)."""
    from qiskit.providers import QubitProperties
    from qiskit.transpiler import InstructionProperties, Target

    qprops = None
    if target.qubit_properties:
        qprops = [None if p is None else QubitProperties(
            t1=None if p.t1 is None else p.t1 / scale, t2=None if p.t2 is None else p.t2 / scale,
            frequency=p.frequency) for p in target.qubit_properties]
    out = Target(description=target.description, num_qubits=target.num_qubits, dt=target.dt,
                 granularity=target.granularity, min_length=target.min_length,
                 pulse_alignment=target.pulse_alignment, acquire_alignment=target.acquire_alignment,
                 qubit_properties=qprops, concurrent_measurements=target.concurrent_measurements)
    for name in target.operation_names:
        op = target.operation_from_name(name)
        props = target[name]
        if isinstance(op, type) or not props or None in props:
            out.add_instruction(op, name=name)
            continue
        cap = 0.5 if name == "measure" else 0.75
        new = {qargs: (p if p is None or p.error is None else
                       InstructionProperties(duration=p.duration, error=min(p.error * scale, cap)))
               for qargs, p in props.items()}
        out.add_instruction(op, new, name=name)
    return out
