"""ray-qalloc: dynamic quantum-classical resource allocation on Ray.

Public entry points are re-exported here lazily, so that importing a pure module (say
``ray_qalloc.placement``) does not pull in Ray or Qiskit.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "connect": "ray_qalloc.session",
    "QAlloc": "ray_qalloc.session",
    "JobHandle": "ray_qalloc.session",
    "JobResult": "ray_qalloc.session",
    "JobSpec": "ray_qalloc.jobs",
    "Priority": "ray_qalloc.jobs",
    "Intent": "ray_qalloc.jobs",
    "JobState": "ray_qalloc.jobs",
    "Settings": "ray_qalloc.config",
    "load_settings": "ray_qalloc.config",
    "QAllocSampler": "ray_qalloc.sampler",
    "QAllocEstimator": "ray_qalloc.estimator",
    "Client": "ray_qalloc.client",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_qalloc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
