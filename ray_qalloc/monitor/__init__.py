"""Quantum monitor: how each QPU's calibration moves, and when it has gone wrong or stale.

* ``drift``     — a seeded drift model for emulated devices (wander plus TLS defects);
* ``calseries`` — calibration time series in SQL, with retention, latest / series / trend;
* ``detect``    — EWMA + CUSUM drift detection per quantity, and staleness;
* ``quantum``   — ``QuantumMonitor``: samples backends periodically and runs detection;
* ``cli``       — the body of ``qalloc calibration DEVICE``.

Nothing here imports Ray; the allocator's fleet wires a ``QuantumMonitor`` in.
"""

import importlib
from typing import Any

# Exports load on first use (PEP 562): the typed settings import ``monitor.drift`` while the job
# store, which ``calseries`` builds on, is still importing them.
_EXPORTS = {
    "CalibrationSeries": "calseries", "Retention": "calseries", "Snapshot": "calseries", "Trend": "calseries",
    "samples_from_calibration": "calseries", "SeriesKey": "keys",
    "DetectorSettings": "detect", "DriftDetector": "detect", "DriftEvent": "detect", "DriftScore": "detect",
    "Staleness": "detect", "staleness": "detect",
    "Defect": "drift", "DriftModel": "drift", "DriftSettings": "drift", "DriftState": "drift",
    "apply_to_target": "drift",
    "QuantumMonitor": "quantum", "RefreshTiming": "quantum",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_qalloc.monitor' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ray_qalloc.monitor.{module}"), name)


__all__ = [
    "CalibrationSeries",
    "Defect",
    "DetectorSettings",
    "DriftDetector",
    "DriftEvent",
    "DriftModel",
    "DriftScore",
    "DriftSettings",
    "DriftState",
    "QuantumMonitor",
    "RefreshTiming",
    "Retention",
    "SeriesKey",
    "Snapshot",
    "Staleness",
    "Trend",
    "apply_to_target",
    "samples_from_calibration",
    "staleness",
]
