"""The prior's GPU formulas: what placement believes of a GPU run before one was measured.

Assumptions, stated because none of these constants was measured (this project's machines have
no GPU; ``python -m benchmarks.gpu`` measures them on a GPU node, and the learned model replaces
them from the run history, where GPU runs are rows like any other: their backend name —
``gpu-<node>/statevector`` — gives the model ``b_gpu = 1``):

* **Statevector on k GPUs**: a fixed cost per run (kernel launches, copying the gates over,
  the sampler's preprocessing; the CUDA context is paid once by the warm worker), then one pass
  over the state per gate, memory-bound: reading and writing 16·2ⁿ bytes at ~1.5 TB/s effective
  (half an H100's HBM3 peak) is ~2e-11 s per amplitude and gate, against the CPU prior's 1.2e-9
  on one core. Several GPUs split the passes but swap index bits between them: k^0.7.
  This puts the CPU↔GPU crossover near 18 qubits for a few hundred gates — the history moves it.
* **Tensor network**: the contraction's cost follows its width w (log2 of the largest tensor):
  we take the MPS bound of the circuit's entanglement (``mps_chi_log2_max`` where the features
  have it, else the interaction graph's ``cut_max``), at most n/2 — an MPS-ordered contraction
  is one valid order, and cuTensorNet's path finder does at least about as well. Sampling
  contracts the circuit with its conjugate (bond χ², so ~χ³ per gate) once per qubit group of
  the chain rule; plus path finding (~0.5 s) and a per-shot cost. Wide and shallow: w small,
  seconds; deep or volume-law: w near n/2, astronomically long, so never chosen.
* Spreads: the statevector follows its formula up to constants (``log_sd`` 0.7, wider than the
  CPU statevector's 0.5 since unmeasured); the tensor network's cost depends on entanglement the
  features only bound (1.5, as MPS), so selection picks it only by a clear margin.
"""

from __future__ import annotations

import math
from typing import Mapping

from ray_qalloc.placement.model import JobView

GPU_RUN_OVERHEAD_S = 0.05
GPU_AMPLITUDE_GATE_S = 2e-11
MULTI_GPU_EXPONENT = 0.7
TN_PATH_S = 0.5
TN_FLOP_S = 1e-12
TN_GROUP = 4
GPU_LOG_SD: dict[str, float] = {"statevector": 0.7, "tensor_network": 1.5}


def _f(features: Mapping[str, float], key: str, default: float) -> float:
    value = features.get(key, default)
    return default if value is None or value != value else float(value)


def tensornet_width(job: JobView) -> float:
    """log2 of the largest tensor a contraction of the circuit needs (see the module docstring)."""
    n = float(job.num_qubits)
    feats = job.features
    chi = _f(feats, "mps_chi_log2_max", _f(feats, "cut_max", n))
    return max(min(chi, n / 2.0), 1.0)


def gpu_runtime(method: str | None, job: JobView, gpus: int = 1) -> float:
    """Seconds for one run of ``job`` on a GPU pool's method (statevector, tensor_network)."""
    n = job.num_qubits
    size = max(_f(job.features, "size", 1.0), 1.0)
    shots = job.shots
    if method == "tensor_network":
        width = tensornet_width(job)
        steps = math.ceil(max(n, 1) / TN_GROUP)
        return TN_PATH_S + GPU_RUN_OVERHEAD_S + steps * size * 2.0 ** min(3.0 * width, 300.0) * TN_FLOP_S \
            + shots * n * 2e-7
    split = max(int(gpus), 1) ** MULTI_GPU_EXPONENT
    return GPU_RUN_OVERHEAD_S + size * 2.0 ** min(n, 60) * GPU_AMPLITUDE_GATE_S / split + shots * 1e-7


def gpu_log_sd(method: str | None) -> float:
    return GPU_LOG_SD.get(method or "", 1.0)
