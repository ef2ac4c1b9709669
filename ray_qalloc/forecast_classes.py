"""Demand classes: which pool or QPU class a job's demand falls on, and one forecaster per class.

Why per class: what scaling can do differs by class, and so does what leads its demand. A CPU
pool node and a GPU pool node are different node types (``qalloc_pool_cpu`` vs
``qalloc_pool_gpu`` bundles: the autoscaler launches different machines), and QPUs are not
launched at all — the only thing to do ahead of a QPU burst is to hold slots for emergency jobs.
A surge of security events may lead the trapped-ion jobs of a threat team and not the GPU
simulations of a research team; one forecaster of the total would spread a burst it predicts
over every class, pre-warming GPU nodes for CPU work. So each class gets its own
``forecast.Forecaster``, fitted on its own series with the same candidate features, and the
cross-validated selection rule decides *per class* whether events (or seasonality) help.

Classes are named ``pool:<cpu|gpu>`` and ``qpu:<architecture>`` (``superconducting`` for IBM
devices and their emulations, ``trapped_ion`` / ``neutral_atom`` from
``backends.architectures``, ``other`` for a device whose architecture the name does not tell).
The class of a job is the class of the backend it ran on (``jobs.backend``); a job that has not
been placed yet is counted where the caller says (the live path: its plan's best backend).

Pure numpy (no Ray, no database).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ray_qalloc.forecast import FitReport, Forecaster

CPU_POOL = "pool:cpu"
GPU_POOL = "pool:gpu"
POOL_RESOURCES: dict[str, str] = {CPU_POOL: "qalloc_pool_cpu", GPU_POOL: "qalloc_pool_gpu"}   # = backends.pools'


def is_pool_class(cls: str) -> bool:
    """A class whose capacity is nodes the autoscaler launches (a pool), not a QPU."""
    return cls.startswith("pool:")


def pool_class_of_pool(pool: str | None) -> str:
    """The class of a simulator pool by its name (``gpu-1a2b3c4d`` → ``pool:gpu``, else ``pool:cpu``)."""
    return GPU_POOL if pool is not None and str(pool).startswith("gpu-") else CPU_POOL


def demand_class(backend: str) -> str:
    """The demand class of a backend name (see the module docstring).

    ``cpu-1a2b/mps`` → ``pool:cpu``; ``gpu-1a2b/tensornet`` and ``aer_statevector_gpu`` → ``pool:gpu``;
    ``aer_mps`` → ``pool:cpu``; ``qpu_ion_aria`` → ``qpu:trapped_ion``; ``qpu_torino`` /
    ``ibm_torino`` → ``qpu:superconducting``; ``braket_<device>`` → ``qpu:other``."""
    if "/" in backend:
        return pool_class_of_pool(backend.split("/", 1)[0])
    if backend.startswith("aer_"):
        return GPU_POOL if backend.endswith("_gpu") else CPU_POOL
    for prefix in ("qpu_", "ibm_"):
        if backend.startswith(prefix):
            from ray_qalloc.backends.architectures import architecture_of

            spec = architecture_of(backend.removeprefix(prefix))
            return f"qpu:{spec.architecture}" if spec is not None else "qpu:superconducting"
    return "qpu:other"


@dataclass
class ClassForecaster:
    """One ``Forecaster`` per demand class, all over the same bins and the same candidate events.

    ``make``: a fresh, unfitted forecaster (all classes share its shape). A class with fewer than
    ``min_jobs`` jobs in the history gets no model: too few to learn anything from, and a class
    seen that rarely is served by the reactive path."""

    make: Callable[[], Forecaster]
    min_jobs: float = 20.0
    models: dict[str, Forecaster] = field(default_factory=dict)
    reports: dict[str, FitReport] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)   # per class: the target's surge level

    def fit(self, jobs: Mapping[str, Sequence[float] | np.ndarray], events: np.ndarray | None, t0: float,
            surge_quantile: float = 0.95) -> dict[str, FitReport]:
        """Fit every class with enough jobs; ``thresholds[c]``: the ``surge_quantile`` of class *c*'s
        target windows in the history (what a forecast must exceed to count as a coming surge)."""
        self.models, self.reports, self.thresholds = {}, {}, {}
        for cls, series in jobs.items():
            y = np.asarray(series, dtype=float)
            if float(y.sum()) < self.min_jobs:
                continue
            f = self.make()
            if y.shape[0] < f.min_bins():
                continue
            self.reports[cls] = f.fit(y, events, t0)
            self.models[cls] = f
            actual = f.actual_series(y)
            ok = actual[~np.isnan(actual)]
            self.thresholds[cls] = float(np.quantile(ok, surge_quantile)) if len(ok) else math.inf
        return self.reports

    @property
    def fitted(self) -> bool:
        return bool(self.models)

    def predict(self, jobs: Mapping[str, Sequence[float] | np.ndarray], events: np.ndarray | None,
                t0: float) -> dict[str, float]:
        """Per fitted class, the forecast at the end of the last bin (each needs its lookback)."""
        out: dict[str, float] = {}
        for cls, f in self.models.items():
            series = jobs.get(cls)
            y = np.zeros(len(events) if events is not None else 0) if series is None else np.asarray(series, float)
            if y.shape[0] < f.lookback_bins:
                continue
            out[cls] = f.predict(y, events, t0)
        return out
