"""Executors of circuits: Aer simulators, emulated QPUs and IBM hardware, behind one protocol.

Nothing here imports Ray; the actor that hosts a backend builds it by name with
``make_backend`` in its own process.
"""

from ray_qalloc.backends.aer import AerBackend
from ray_qalloc.backends.base import (Backend, BackendKind, BackendSpec, Calibration, Price,
                                      Reattachable, RunResult, resource_name)
from ray_qalloc.backends.fake_qpu import (FakeQPUBackend, modelled_qpu_seconds,
                                          scheduled_duration)
from ray_qalloc.backends.ibm import IBMRuntimeBackend
from ray_qalloc.backends.registry import (DEFAULT_POOL, GPU_BACKEND_NAME, backend_by_name,
                                          default_backends, default_pool, gpu_available,
                                          make_backend)

__all__ = [
    "AerBackend",
    "Backend",
    "BackendKind",
    "BackendSpec",
    "Calibration",
    "DEFAULT_POOL",
    "FakeQPUBackend",
    "GPU_BACKEND_NAME",
    "IBMRuntimeBackend",
    "Price",
    "Reattachable",
    "RunResult",
    "backend_by_name",
    "default_backends",
    "default_pool",
    "gpu_available",
    "make_backend",
    "modelled_qpu_seconds",
    "resource_name",
    "scheduled_duration",
]
