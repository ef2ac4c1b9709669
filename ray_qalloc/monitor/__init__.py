"""Quantum monitor: how each QPU's calibration moves, and when it has gone wrong or stale.

* ``drift``     — a seeded drift model for emulated devices (wander plus TLS defects);
* ``calseries`` — calibration time series in SQL, with retention, latest / series / trend;
* ``detect``    — EWMA + CUSUM drift detection per quantity, and staleness;
* ``quantum``   — ``QuantumMonitor``: samples backends periodically and runs detection;
* ``cli``       — the body of ``qalloc calibration DEVICE``.

Nothing here imports Ray; the allocator's fleet wires a ``QuantumMonitor`` in.
"""

from ray_qalloc.monitor.calseries import (CalibrationSeries, Retention, SeriesKey, Snapshot, Trend,
                                          samples_from_calibration)
from ray_qalloc.monitor.detect import (DetectorSettings, DriftDetector, DriftEvent, DriftScore, Staleness,
                                       staleness)
from ray_qalloc.monitor.drift import Defect, DriftModel, DriftSettings, DriftState, apply_to_target
from ray_qalloc.monitor.quantum import QuantumMonitor, RefreshTiming

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
