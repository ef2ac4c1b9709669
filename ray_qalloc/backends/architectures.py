"""Emulated trapped-ion and neutral-atom QPUs, built from published device specifications.

Why: the IBM fake devices are all superconducting — sparse coupling (a SWAP per distant
pair), nanosecond gates, ~250 µs per shot. Placement must also weigh devices that trade
the other way: every pair coupled (no routing overhead), gates a thousand times slower,
shots of milliseconds (ions) to a large fraction of a second (atoms), other error profiles.
This module writes those devices as a Qiskit ``Target`` (wrapped in a ``BackendV2``), so the
one emulator (``fake_qpu.FakeQPUBackend``: transpile to the target, local noise, modelled
``qpu_s``, drift) runs them exactly as it runs the IBM snapshots; nothing downstream needs to
know which architecture it is.

Native gates are written with Qiskit's standard gates of the same duration and error:

* trapped ion — IonQ's GPI2/GPI are π/2 and π rotations about an axis in the XY plane
  (``sx``/``x`` here), Z rotations are virtual (a phase on later pulses: ``rz``, zero time and
  error), and the Mølmer–Sørensen gate is an XX rotation, equal to ``rzz`` up to single-qubit
  basis changes (the same laser pulse, so the same duration and error).
* neutral atom — global Raman rotations (``sx``/``x``), local Z rotations by light shift
  (``rz``, a physical pulse here: ~µs and a small error), and the Rydberg ``cz``.

Connectivity: ions are all-to-all (one chain, the gate couples any pair through the shared
motional modes). Atoms are **reconfigurable all-to-all**: atoms are moved in optical tweezers
to meet their partner before each entangling layer (Bluvstein et al. 2022), so any pair can be
coupled; the transport is charged to the ``cz`` duration (it dominates the 0.25 µs Rydberg
pulse) — not a blockade-radius graph.

Per-shot time: ``FakeQPUBackend`` models a job as ``overhead + shots × (schedule +
rep_delay)``; here ``rep_delay`` is what each shot pays beside its gates — cooling, state
preparation and reset for ions (ms), loading, rearranging and imaging the atom array for atoms
(a large fraction of a second). The schedule is ASAP with gates on disjoint qubits in
parallel, as for the IBM devices; a single ion chain runs its gates largely one at a time, so
for wide, shallow circuits the ion duration is a lower bound.

Qubits are not identical: each qubit's T1/T2, readout and gate errors, and each pair's
two-qubit error, is the published figure times a seeded log-normal factor (``spread``), so a
noise-aware layout and the per-qubit profile placement ranks have something to choose from,
and drift (``monitor.drift``, the same model as the IBM devices') moves them from there.

Every figure carries its source in ``ArchitectureSpec.sources``; where no device publishes a
figure (the ion cooling time, the atom transport time and cycle rate) the number is an
order-of-magnitude assumption and says so.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ray_qalloc.backends.base import ALL_TO_ALL_DENSITY, Price

if TYPE_CHECKING:  # pragma: no cover
    from qiskit.transpiler import Target

Architecture = Literal["trapped_ion", "neutral_atom"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """One device class, as published: every duration in seconds, every error a probability."""

    name: str                      # the device name; the backend is ``qpu_<name>``
    architecture: Architecture
    label: str                     # what a person calls it
    num_qubits: int
    t1_s: float
    t2_s: float
    gate_1q_s: float               # sx / x
    gate_1q_error: float
    rz_s: float                    # 0: virtual Z (a frame change)
    rz_error: float
    gate_2q: Literal["rzz", "cz"]  # the native entangler, in Qiskit's standard gates
    gate_2q_s: float
    gate_2q_error: float
    readout_s: float
    readout_error: float
    reset_s: float
    shot_overhead_s: float         # per shot beside the gates: cooling / loading / imaging
    price: Price
    sources: tuple[str, ...]
    spread: float = 0.10           # sd of the per-qubit / per-pair log-normal factor
    seed: int = 0

    @property
    def description(self) -> str:
        return (f"Emulated {self.label} ({self.num_qubits} qubits, {self.architecture.replace('_', ' ')}, "
                f"all-to-all, native {self.gate_2q}) from published specifications; Aer noise on the used "
                f"qubits only.")


# ----------------------------------------------------------------------------- the devices

ION_ARIA = ArchitectureSpec(
    name="ion_aria", architecture="trapped_ion", label="IonQ Aria-class trapped-ion QPU",
    num_qubits=25,
    t1_s=50.0, t2_s=1.0,
    gate_1q_s=135e-6, gate_1q_error=5e-4,
    rz_s=0.0, rz_error=0.0,
    gate_2q="rzz", gate_2q_s=600e-6, gate_2q_error=4e-3,
    readout_s=300e-6, readout_error=3.9e-3,
    reset_s=20e-6,
    shot_overhead_s=1.02e-3,
    price=Price(per_job=0.30, per_shot=0.03),
    sources=(
        "qubits 25; T1 10-100 s (50 s taken), T2 1 s; single-qubit gate 135 us, two-qubit gate 600 us, "
        "readout 300 us, register reset 20 us; fidelities: single-qubit 99.95 %, two-qubit 99.6 %, SPAM 99.61 % "
        "- Microsoft Learn, Azure Quantum 'IonQ provider', table 'IonQ Aria quantum computer'",
        "all-to-all: 'a two-qubit gate between any pair' - same page; native gates GPI, GPI2, MS with virtual Z "
        "- IonQ native gates documentation (docs.ionq.com, 'Getting started with native gates')",
        "per shot: register reset 20 us (above) + ~1 ms Doppler/sideband cooling and state preparation "
        "(assumption: order of magnitude of trapped-ion duty cycles, not published per device)",
        "price: USD 0.30 per task + USD 0.03 per shot - Amazon Braket pricing, IonQ Aria",
    ),
    seed=1,
)

ATOM_RYDBERG = ArchitectureSpec(
    name="atom_rydberg", architecture="neutral_atom",
    label="reconfigurable Rydberg neutral-atom QPU (Harvard/QuEra-class)",
    num_qubits=48,
    t1_s=4.0, t2_s=1.5,
    gate_1q_s=2e-6, gate_1q_error=1e-3,
    rz_s=1e-6, rz_error=2e-4,
    gate_2q="cz", gate_2q_s=200e-6, gate_2q_error=5e-3,
    readout_s=10e-3, readout_error=2.5e-2,
    reset_s=0.0,
    shot_overhead_s=0.3,
    price=Price(per_job=0.30, per_shot=0.01),
    sources=(
        "CZ fidelity 99.5 %, Rydberg pulse ~0.25 us, gates in parallel - Evered et al., 'High-fidelity parallel "
        "entangling gates on a neutral-atom quantum computer', Nature 622, 268 (2023)",
        "reconfigurable connectivity by moving atoms between gate layers; single-qubit Raman gates ~99.9 %, local "
        "Z by light shift; T2 ~1 s with dynamical decoupling - Bluvstein et al., Nature 604, 451 (2022) and "
        "'Logical quantum processor based on reconfigurable atom arrays', Nature 626, 58 (2024), 280 atoms "
        "(48 emulated here)",
        "CZ duration 200 us = transport to the partner (assumption: order of magnitude of tweezer moves; the "
        "pulse itself is negligible); T1 4 s (assumption: trap-light scattering limited, seconds)",
        "readout 10 ms imaging, error 2.5 % including atom loss read as 0 (assumption within the few-% range "
        "reported; modelled symmetric); per shot 0.3 s for loading, rearranging and imaging the array "
        "(assumption: pulsed operation at a few Hz, cf. Chiu et al., arXiv:2506.20660, on atom loss forcing "
        "pulsed operation)",
        "price: USD 0.30 per task + USD 0.01 per shot - Amazon Braket pricing, QuEra Aquila (the neutral-atom "
        "QPU with a published price; Aquila itself is analog)",
    ),
    seed=2,
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {s.name: s for s in (ION_ARIA, ATOM_RYDBERG)}
# Emulated devices of these architectures in the default pool (registry: ``qpu_<name>``).
DEFAULT_ARCHITECTURE_DEVICES: tuple[str, ...] = tuple(ARCHITECTURES)


def architecture_of(device: str) -> ArchitectureSpec | None:
    """``ion_aria`` / ``fake_ion_aria`` / ``qpu_ion_aria`` -> its spec; None for anything else."""
    for prefix in ("fake_", "qpu_"):
        device = device.removeprefix(prefix)
    return ARCHITECTURES.get(device)


# ----------------------------------------------------------------------------- target


def _factors(rng: np.random.Generator, spread: float, size: int) -> np.ndarray:
    """Log-normal factors with median 1: qubits of one device differ by ``spread`` in log."""
    return np.exp(rng.normal(0.0, spread, size)) if spread > 0 else np.ones(size)


def build_target(spec: ArchitectureSpec) -> "Target":
    """The device as a Qiskit ``Target``: every pair coupled (both directions), seeded per-qubit spread.

    Errors are clipped below 0.5 (what drift and ``usable_target`` take as a broken coupler) and
    T2 is held at 2·T1 at most (the physical bound Aer enforces).
    """
    from qiskit.circuit import Measure, Parameter, Reset
    from qiskit.circuit.library import CZGate, RZGate, RZZGate, SXGate, XGate
    from qiskit.providers import QubitProperties
    from qiskit.transpiler import InstructionProperties, Target

    n = spec.num_qubits
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()) + spec.seed)
    t1 = spec.t1_s * _factors(rng, spec.spread, n)
    t2 = np.minimum(spec.t2_s * _factors(rng, spec.spread, n), 2.0 * t1)
    g1 = spec.gate_1q_error * _factors(rng, spec.spread, n)
    ro = spec.readout_error * _factors(rng, spec.spread, n)
    pairs = list(itertools.combinations(range(n), 2))
    g2 = spec.gate_2q_error * _factors(rng, spec.spread, len(pairs))

    def err(x: float) -> float:
        return float(min(max(x, 0.0), 0.49))

    target = Target(description=spec.description, num_qubits=n,
                    qubit_properties=[QubitProperties(t1=float(t1[q]), t2=float(t2[q])) for q in range(n)])
    target.add_instruction(RZGate(Parameter("theta")),
                           {(q,): InstructionProperties(spec.rz_s, err(spec.rz_error)) for q in range(n)})
    for gate in (SXGate(), XGate()):
        target.add_instruction(gate, {(q,): InstructionProperties(spec.gate_1q_s, err(g1[q])) for q in range(n)})
    two = RZZGate(Parameter("theta")) if spec.gate_2q == "rzz" else CZGate()
    props: dict[tuple[int, ...], InstructionProperties] = {}
    for (a, b), e in zip(pairs, g2):
        props[(a, b)] = props[(b, a)] = InstructionProperties(spec.gate_2q_s, err(e))
    target.add_instruction(two, props)
    target.add_instruction(Measure(), {(q,): InstructionProperties(spec.readout_s, err(ro[q])) for q in range(n)})
    target.add_instruction(Reset(), {(q,): InstructionProperties(spec.reset_s or None, None) for q in range(n)})
    return target


class ArchitectureDevice:
    """The few parts of a ``BackendV2`` the emulator reads: name, size, target, repetition delay.

    Why not a real ``BackendV2``: nothing runs on it (``FakeQPUBackend`` runs Aer against the
    target), and a plain object keeps construction free of provider machinery. ``price`` and
    ``description`` let the emulator show the provider's price and the device's sources.
    """

    def __init__(self, spec: ArchitectureSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.num_qubits = spec.num_qubits
        self.target = build_target(spec)
        self.default_rep_delay = spec.shot_overhead_s
        self.qalloc_price = spec.price
        self.qalloc_description = spec.description

    @property
    def coupling_map(self) -> Any:
        return self.target.build_coupling_map()


def architecture_device(device: str) -> ArchitectureDevice | None:
    """The emulated device called ``device`` (any of its spellings), or None if it is not one of ours."""
    spec = architecture_of(device)
    return ArchitectureDevice(spec) if spec is not None else None


# ----------------------------------------------------------------------------- layout


def coupling_density(target: "Target") -> float:
    """Fraction of qubit pairs with a two-qubit gate (1.0: all-to-all; heavy-hex chips ~0.02)."""
    n = target.num_qubits or 0
    if n < 2:
        return 1.0
    pairs = {tuple(sorted(qa)) for qa in (target.qargs or ()) if qa is not None and len(qa) == 2}
    return len(pairs) / (n * (n - 1) / 2)


def is_all_to_all(target: "Target") -> bool:
    return coupling_density(target) >= ALL_TO_ALL_DENSITY


def qubit_costs(target: "Target") -> list[float]:
    """Per physical qubit, -log of what it keeps of a shot: readout, its sx, its mean two-qubit gate,
    and 1 ms of decay. Lower is better; a fully connected layout picks the lowest."""
    n = target.num_qubits
    cost = [0.0] * n

    def add(q: int, error: float | None) -> None:
        if error is not None and 0 <= error < 1:
            cost[q] += -math.log1p(-error)

    for name in ("measure", "sx"):
        if name in target.operation_names:
            for qa, p in target[name].items():
                if qa is not None and p is not None:
                    add(qa[0], p.error)
    two: list[list[float]] = [[] for _ in range(n)]
    for name in target.operation_names:
        for qa, p in (target[name].items() if not isinstance(target.operation_from_name(name), type) else ()):
            if qa is not None and len(qa) == 2 and p is not None and p.error is not None:
                two[qa[0]].append(p.error)
    for q in range(n):
        if two[q]:
            add(q, sum(two[q]) / len(two[q]))
    qprops = target.qubit_properties or []
    for q, p in enumerate(qprops):
        if p is not None and p.t1 and p.t2:
            cost[q] += 1e-3 * (1.0 / p.t1 + 1.0 / p.t2) / 2.0
    return cost


def best_qubits_layout_stage(target: "Target") -> Any:
    """Layout stage for a fully connected target: the logical qubits in most two-qubit gates go to
    the best physical qubits (``qubit_costs``).

    Why not VF2Layout (the IBM devices' noise-aware layout): on a complete graph every mapping is
    an isomorphism, so it scores thousands of near-identical ones (0.35 s for 48 qubits, 0.6 s for
    100, per transpile) and still only permutes the last few; ranking qubits is what noise-aware
    layout means when there is no routing, and it costs microseconds.
    """
    from qiskit.transpiler import AnalysisPass, Layout, PassManager
    from qiskit.transpiler.passes import ApplyLayout, EnlargeWithAncilla, FullAncillaAllocation

    ranked = sorted(range(target.num_qubits), key=qubit_costs(target).__getitem__)

    class BestQubitsLayout(AnalysisPass):  # type: ignore[misc]
        def run(self, dag: Any) -> None:
            weight = {q: 0 for q in dag.qubits}
            for node in dag.op_nodes():
                for q in node.qargs:
                    weight[q] += 10 if len(node.qargs) == 2 else 1
            order = sorted(dag.qubits, key=lambda q: -weight[q])
            self.property_set["layout"] = Layout({q: ranked[i] for i, q in enumerate(order)})

    return PassManager([BestQubitsLayout(), FullAncillaAllocation(target), EnlargeWithAncilla(), ApplyLayout()])
