"""A transparent heuristic prior: what the allocator believes before it has measured anything.

Why it exists: placement must work on a fresh install with no trained model (SkyPilot
assumes a default runtime rather than failing). The formulas follow how each simulation
method scales (statevector ~ gates·2ⁿ, density matrix ~ gates·4ⁿ, MPS ~ gates·χ³ with χ
bounded by the entanglement crossing a cut, stabilizer ~ gates·n) with constants measured
roughly on a 2-core machine; QPUs take their modelled QPU time and the estimated success
probability from calibration. The learned model replaces this where data exists.

Every estimate carries a spread (``Estimate.log_sd``, the sd of log(actual / predicted)):
the prior is rough, and roughest where a method's cost is not a function of width and gate
count. Statevector and stabilizer follow their formulas up to constants (gate mix, caches);
density matrix a little less. MPS depends on the entanglement the circuit actually builds,
which the features only bound: the same family sits on either side of the statevector line
(QFT-23: MPS 0.03 s vs 6.5 s; quantum volume 18: MPS > 20 s vs 0.22 s), so its spread is
large, and selection (which weighs runtime by its spread) picks MPS only by a clear margin.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ray_qalloc.backends.base import ALL_TO_ALL_DENSITY
from ray_qalloc.placement.filters import memory_needed
from ray_qalloc.placement.model import BackendView, Estimate, JobView, QubitProfile

QPU_JOB_OVERHEAD_S = 2.0
REP_DELAY_S = 250e-6
"""Per-shot delay of a device whose calibration does not give one (IBM's default)."""
ROUTING_FACTOR = 2.5
"""Native two-qubit gates per circuit two-qubit gate on a sparse chip, for circuits that are not a
line: SWAPs (three gates each) plus controlled phases taking two CZ/ECR. Measured on FakeTorino at
optimization level 1: QFT 1.7-2.7 (6-30 qubits), random pairs 2.3-5.7 (6-30 qubits)."""
_DEFAULT_CAL = {"t1_median_us": 150.0, "t2_median_us": 100.0, "readout_error_median": 0.02,
                "gate_1q_error_median": 3e-4, "gate_2q_error_median": 8e-3}


# sd of log(actual / predicted) per Aer method, for the prior's formulas (and the learned model's
# default where its artifact has no per-method residuals). Judged from the measured table in
# NOTES.md, not fitted: ~×1.6 for statevector, ~×4.5 at one sd for MPS.
METHOD_LOG_SD: dict[str, float] = {
    "statevector": 0.5,
    "stabilizer": 0.5,
    "density_matrix": 0.8,
    "matrix_product_state": 1.5,
    "extended_stabilizer": 1.5,
}
OTHER_LOG_SD = 1.0   # a method the formulas do not know
QPU_LOG_SD = 0.3     # modelled QPU time: overhead + shots × schedule, from the calibration


def method_log_sd(method: str | None, kind: str = "simulator") -> float:
    """The prior's spread for a backend kind and method."""
    if kind == "qpu":
        return QPU_LOG_SD
    return METHOD_LOG_SD.get(method or "", OTHER_LOG_SD)


def _f(features: Mapping[str, float], key: str, default: float = 0.0) -> float:
    value = features.get(key, default)
    return default if value is None or value != value else float(value)


def simulator_runtime(method: str | None, job: JobView, threads: int = 1) -> float:
    """Seconds for one run of ``job`` with an Aer method (rough; the learned model refines it)."""
    n = job.num_qubits
    feats = job.features
    size = max(_f(feats, "size", 1.0), 1.0)
    shots = job.shots
    par = max(threads, 1) ** 0.8
    fused = feats.get("fused_blocks")
    if method in ("statevector", "density_matrix") and fused is not None and fused == fused:
        # a pass over the state to set up and sample it, plus one per gate, or per block of
        # gates Aer fuses (≤ 5 qubits each) from 14 qubits up (measured: docs/notes.md)
        if method == "statevector":
            passes = float(fused) if n >= 14 else size * 0.12
            return 1.5e-3 + 2.0 ** min(n, 60) * (5e-8 + passes * 1e-8) / par + shots * 1e-7
        return 2e-3 + 4.0 ** min(n, 60) * (5e-8 + size * 2.5e-9) / par + shots * 1e-7
    if method == "statevector":
        return 1.5e-3 + size * (2.0 ** n) * 1.2e-9 / par + shots * 1e-7
    if method == "density_matrix":
        return 2e-3 + size * (4.0 ** n) * 2.5e-9 / par + shots * 1e-7
    if method == "stabilizer":
        return 1e-3 + size * n * 4e-8 + shots * n * n * 2e-9
    if method == "matrix_product_state":
        gate_work, sample_work = feats.get("mps_gate_work_log2"), feats.get("mps_sample_work_log2")
        if gate_work is not None and sample_work is not None and gate_work == gate_work and sample_work == sample_work:
            # χ from the entanglement the circuit reaches (circuits._Walk): Σ χ³ over the cuts each
            # entangling gate crosses, Σ χ² over the cuts for every shot.
            return (1.5e-3 + size * 2e-5 + 2.0 ** min(float(gate_work), 60.0) * 5e-9
                    + shots * (n * 3e-6 + 2.0 ** min(float(sample_work), 60.0) * 3.3e-9))
        cut = _f(feats, "cut_max", float(n))
        chi_log2 = min(cut, n / 2.0, 14.0)
        # Gates: a floor per gate plus χ³ per bond update. Sampling: every shot walks the chain,
        # n·χ² a shot, which dominates shallow circuits at 512+ shots (measured, docs/notes.md).
        return (1.5e-3 + size * (2e-5 + 2.0 ** (3.0 * chi_log2) * 1e-9)
                + shots * n * (3e-6 + 2.0 ** (2.0 * chi_log2) * 3.3e-9))
    return 1e-2 + size * (2.0 ** min(n, 30)) * 2e-9


GATE_1Q_S, GATE_2Q_S, READOUT_S = 60e-9, 500e-9, 1.5e-6
"""Typical gate and readout times, for devices whose calibration does not give them."""


def qpu_duration_s(job: JobView, qubits: QubitProfile | None = None) -> float:
    """Scheduled duration of one shot, from depth and the device's gate times (calibrated where
    ``qubits`` has them, typical otherwise)."""
    feats = job.features
    depth = _f(feats, "depth", 1.0)
    depth_2q = _f(feats, "two_qubit_depth", 0.0)
    g1 = qubits.gate_1q_s if qubits is not None and qubits.gate_1q_s else GATE_1Q_S
    g2 = qubits.gate_2q_s if qubits is not None and qubits.gate_2q_s else GATE_2Q_S
    ro = qubits.readout_s if qubits is not None and qubits.readout_s else READOUT_S
    return max(depth - depth_2q, 0.0) * g1 + depth_2q * g2 + ro


def qpu_fidelity(job: JobView, cal: Mapping[str, float] | None, qubits: QubitProfile | None = None) -> float:
    """Estimated success probability: gate and readout fidelities, T1/T2 decay over the duration.

    With a per-qubit profile, decay and readout are those of the best ``n`` qubits of the chip
    (where a noise-aware layout puts an ``n``-qubit circuit), so one defective qubit does not
    lower a small job's estimate and a chip whose good qubits are few lowers a wide one's.
    Without it, the medians stand for every qubit. The learned fidelity correction was trained
    against the median form; on a profile it corrects the part the profile does not model
    (crosstalk, leakage, the gap between "n best" and a connected layout)."""
    c = {**_DEFAULT_CAL, **{k: v for k, v in (cal or {}).items() if v == v}}
    feats = job.features
    n = job.num_qubits
    n2 = _f(feats, "two_qubit_count")
    routing = routing_factor(feats, c)
    n1 = max(_f(feats, "size") - n2, 0.0) * 1.5
    meas = _f(feats, "measure_count", float(n))
    duration = qpu_duration_s(job, qubits)
    gates = (1 - c["gate_1q_error_median"]) ** n1 * (1 - c["gate_2q_error_median"]) ** (n2 * routing)
    if qubits is not None and qubits.qubits >= n > 0:
        measured = min(int(meas), n)
        readout = qubits.readout_fidelity(measured) * (1 - c["readout_error_median"]) ** max(meas - measured, 0.0)
        esp = gates * readout * qubits.decay(n, duration)
    else:
        t1 = c["t1_median_us"] * 1e-6
        t2 = c["t2_median_us"] * 1e-6
        decay = math.exp(-n * duration * (1.0 / t1 + 1.0 / t2) / 2.0)
        esp = gates * (1 - c["readout_error_median"]) ** meas * decay
    return max(min(esp, 1.0), 0.0)


def routing_factor(features: Mapping[str, float], cal: Mapping[str, float] | None) -> float:
    """How many native two-qubit gates each of the circuit's costs on this device.

    1 on an all-to-all device (trapped ions, reconfigurable atoms: calibration's
    ``coupling_density``), since every pair is coupled, and for a line-shaped interaction graph,
    which a noise-aware layout embeds without SWAPs; ``ROUTING_FACTOR`` otherwise. (A controlled
    phase still takes two CZ on a CZ-native all-to-all device, one RZZ on an ion: the estimate is
    optimistic for phase-heavy circuits on atoms by up to that factor.)"""
    density = (cal or {}).get("coupling_density")
    if density is not None and density == density and density >= ALL_TO_ALL_DENSITY:
        return 1.0
    if _f(features, "bandwidth") <= 1 and _f(features, "max_degree") <= 2:
        return 1.0
    return ROUTING_FACTOR


def rep_delay_s(backend: BackendView) -> float:
    """Per-shot delay beside the gates: the calibrated one (ions: ms of cooling; atoms: a fraction of
    a second of loading and imaging), else IBM's default."""
    if backend.qubits is not None and backend.qubits.rep_delay_s:
        return backend.qubits.rep_delay_s
    value = (backend.calibration or {}).get("rep_delay_s")
    return float(value) if value is not None and value == value and value > 0 else REP_DELAY_S


class HeuristicPrior:
    """Predictor used until a trained model artifact exists."""

    source = "prior"

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        out = []
        for b in backends:
            spec = b.spec
            if spec.kind == "qpu":
                runtime = QPU_JOB_OVERHEAD_S + job.shots * (qpu_duration_s(job, b.qubits) + rep_delay_s(b))
                fidelity = qpu_fidelity(job, b.calibration, b.qubits)
                memory = 0.0
                spread = QPU_LOG_SD
            elif spec.family == "gpu":   # GPU pools (issue #15): costmodel/gpu_prior.py states its assumptions
                from ray_qalloc.costmodel.gpu_prior import gpu_log_sd, gpu_runtime

                runtime = gpu_runtime(spec.method, job, spec.threads)
                fidelity = 1.0
                memory = memory_needed(spec.method, job.num_qubits)
                spread = gpu_log_sd(spec.method)
            else:
                runtime = simulator_runtime(spec.method, job, spec.threads)
                fidelity = 1.0
                memory = memory_needed(spec.method, job.num_qubits)
                spread = method_log_sd(spec.method)
            out.append(Estimate(spec.name, runtime, fidelity, spec.price.cost(runtime, job.shots), memory,
                                self.source, spread))
        return out
