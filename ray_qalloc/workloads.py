"""Named workloads of MQT Bench circuits, shared by the demo, tests and benchmarks.

Why a module: `qalloc demo`, the trace generator and the benchmarks must draw their
circuits the same way (MQT Bench's ``level`` is an enum, and some families keep composite
gates or lack measurements, which intake handles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit


@dataclass(frozen=True)
class WorkItem:
    label: str
    family: str
    size: int
    shots: int = 1024
    priority: str = "normal"
    intent: str = "auto"
    fidelity_min: float | None = None
    deadline_s: float | None = None


def mqt_circuit(family: str, size: int) -> "QuantumCircuit":
    """One MQT Bench circuit at the algorithm level (composite gates kept; intake counts them)."""
    from mqt.bench import BenchmarkLevel, get_benchmark

    return get_benchmark(family, BenchmarkLevel.ALG, circuit_size=size)


# A mixed workload that finishes in well under a minute on 2 cores: wide Clifford circuits
# (stabilizer territory), entangling circuits (statevector), a few quantum-intent jobs
# (emulated QPUs), mixed priorities.
DEMO: tuple[WorkItem, ...] = (
    WorkItem("ghz-24", "ghz", 24, priority="high"),
    WorkItem("graphstate-16", "graphstate", 16),
    WorkItem("qft-16", "qft", 16),
    WorkItem("qaoa-10", "qaoa", 10, priority="batch"),
    WorkItem("wstate-12", "wstate", 12),
    WorkItem("dj-10", "dj", 10),
    WorkItem("randomcircuit-8", "randomcircuit", 8, priority="batch"),
    WorkItem("qpeexact-10", "qpeexact", 10),
    WorkItem("grover-6", "grover", 6, priority="high"),
    WorkItem("vqe_real_amp-8", "vqe_real_amp", 8),
    WorkItem("ghz-5 (QPU)", "ghz", 5, intent="quantum", priority="high"),
    WorkItem("bv-6 (QPU)", "bv", 6, intent="quantum"),
    WorkItem("dj-4 (QPU)", "dj", 4, intent="quantum", priority="emergency"),
    WorkItem("ae-5 (QPU)", "ae", 5, intent="quantum", shots=2000),
    # all-to-all interactions: SWAPs on the superconducting chips, none on the trapped-ion device
    WorkItem("qft-8 (QPU, all-to-all)", "qft", 8, intent="quantum"),
    WorkItem("qft-20", "qft", 20, priority="batch", intent="classical"),
    WorkItem("ghz-40", "ghz", 40, intent="classical"),
)
