"""A per-device fidelity correction learned from measured runs, on top of the calibration estimate.

Why: a QPU's calibration (T1, T2, gate and readout errors) is what placement estimates its
fidelity from (``prior.qpu_fidelity``), and calibrations are incomplete — crosstalk, leakage,
a layout worse than "the n best qubits", or a device noisier than it advertises. Measured
fidelities (``costmodel.fidelity``: Hellinger fidelity of the counts against the exact ideal
distribution, recorded by ``ray_qalloc.fidelity_meter``) say how far off the estimate is on
each device, and placement's estimate should move toward them.

The model, per device: ``log F = s · log F_cal`` — a *scale* of the log-fidelity. Errors that
are k× what the calibration says make every circuit's log-fidelity ≈ k× its estimate, small
circuits and large ones alike, so one exponent learned on small (measurable) circuits carries
to wide ones; an additive log-ratio would not (it would over-correct a 2-gate circuit and
under-correct a 2,000-gate one). Fit by weighted least squares through the origin in log space
(``s = Σw·x·y / Σw·x²``, x = log F_cal, y = log F_measured), so a sample whose estimate is
near 1 (x ≈ 0, nothing to learn) weighs almost nothing. Then:

* **shrunk toward no correction** with few samples: ``PRIOR_WEIGHT`` (1) pseudo-sample at
  s = 1, as informative as a circuit of calibration fidelity ``PRIOR_FIDELITY`` (0.97);
* **bounded**: ``s`` in [``MIN_EXPONENT``, ``MAX_EXPONENT``] = [0.25, 4];
* **decaying with calibration changes**: a sample's weight is multiplied by ``KEEP_PER_CHANGE``
  (0.5) for each newer calibration of its device (a recalibration may fix what was off, or
  break something else); at most ``MAX_SAMPLES`` (64) newest samples per device are kept.

Persisted: the samples are rows of the store (``fidelity_meter``); a restarted allocator
rebuilds the corrections from them (``FidelityCorrections.load``).

``FidelityCorrected`` wraps a predictor (the model, under run memory and the bandit — one
line in ``overruns.wrap_predictor``) and replaces each QPU estimate's fidelity by
``F_cal ** s``, then — for a job whose output profile intake took — by the Hellinger fidelity
a measurement will show at that success probability (``costmodel.fidelity.observed_fidelity``).
The exponent lives in success-probability space: a measurement is mapped back there
(``esp_equivalent``) before it is fitted. Applying it costs a dictionary lookup, a ``pow`` and
an interpolation per QPU backend.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

from ray_qalloc.costmodel.fidelity import observed_fidelity, profile_of
from ray_qalloc.placement.model import BackendView, Estimate, JobView

#: Pseudo-samples at "no correction" (s = 1): how much evidence it takes to move the estimate.
PRIOR_WEIGHT = 1.0
#: The calibration fidelity the pseudo-sample stands for (its x = log 0.97, a GHZ-3 on a good
#: chip): a sample's evidence grows with x², since the ratio y/x of a near-perfect circuit is
#: mostly shot noise (at 1,024-8,192 shots a Hellinger fidelity of ~0.95 is good to ±0.005).
PRIOR_FIDELITY = 0.97
#: Bounds of the learned exponent: at most 4× (or a quarter of) the calibration's log-fidelity.
MIN_EXPONENT, MAX_EXPONENT = 0.25, 4.0
#: Weight a sample keeps per newer calibration of its device.
KEEP_PER_CHANGE = 0.5
#: Newest samples kept per device.
MAX_SAMPLES = 64
#: Floor of a fidelity before its log is taken (a measured 0 says "very bad", not "-inf").
MIN_FIDELITY = 1e-3
#: Two calibration stamps closer than this are the same calibration (views carry an age, not
#: the stamp, so a stamp recomputed from it jitters by microseconds).
_SAME_CALIBRATION_S = 0.5

_PRIOR_X2 = math.log(PRIOR_FIDELITY) ** 2


@dataclass(frozen=True)
class FidelitySample:
    """One measured run: the calibration's estimate for it and what was measured."""

    backend: str
    estimate: float                  # the calibration estimate (uncorrected), in (0, 1]
    measured: float                  # Hellinger fidelity against the exact ideal distribution
    at: float = 0.0                  # when it was measured (unix s)
    calibration_at: float | None = None   # the device's calibration stamp when it ran


def _log(f: float) -> float:
    return math.log(min(max(float(f), MIN_FIDELITY), 1.0))


def fit_exponent(samples: Sequence[FidelitySample], weights: Sequence[float] | None = None) -> float:
    """The shrunk, bounded least-squares exponent of ``log F_measured ≈ s · log F_cal``."""
    num = den = 0.0
    for i, s in enumerate(samples):
        w = 1.0 if weights is None else weights[i]
        x, y = _log(s.estimate), _log(s.measured)
        num += w * x * y
        den += w * x * x
    prior = PRIOR_WEIGHT * _PRIOR_X2
    value = (num + prior) / (den + prior)
    return min(max(value, MIN_EXPONENT), MAX_EXPONENT)


def corrected_fidelity(estimate: float, exponent: float) -> float:
    """``estimate ** exponent`` in [0, 1] (an estimate of 0 or 1 stays as it is)."""
    if not (0.0 < estimate < 1.0) or exponent == 1.0:
        return min(max(estimate, 0.0), 1.0)
    return min(max(estimate ** exponent, 0.0), 1.0)


class FidelityCorrections:
    """The learned exponent per device, from its measured samples (thread-safe: samples arrive
    from the measuring side, lookups come from placement)."""

    def __init__(self, *, max_samples: int = MAX_SAMPLES, keep_per_change: float = KEEP_PER_CHANGE) -> None:
        self.max_samples = max(1, int(max_samples))
        self.keep_per_change = min(max(float(keep_per_change), 0.0), 1.0)
        self._samples: dict[str, deque[FidelitySample]] = {}
        self._newest: dict[str, float] = {}          # newest calibration stamp among a device's samples
        self._cache: dict[tuple[str, bool], float] = {}
        self._lock = threading.Lock()

    def add(self, sample: FidelitySample) -> None:
        if not (sample.estimate > 0 and sample.measured >= 0) or not math.isfinite(sample.measured):
            return
        with self._lock:
            kept = self._samples.setdefault(sample.backend, deque(maxlen=self.max_samples))
            kept.append(sample)
            stamps = [s.calibration_at for s in kept if s.calibration_at is not None]
            if stamps:
                self._newest[sample.backend] = max(stamps)
            self._cache = {k: v for k, v in self._cache.items() if k[0] != sample.backend}

    def load(self, samples: Iterable[FidelitySample]) -> int:
        """Samples from the store, oldest first (a restart keeps what was learned)."""
        n = 0
        for s in samples:
            self.add(s)
            n += 1
        return n

    def samples(self, backend: str) -> list[FidelitySample]:
        with self._lock:
            return list(self._samples.get(backend, ()))

    def __contains__(self, backend: str) -> bool:
        return backend in self._samples

    def exponent(self, backend: str, calibration_at: float | None = None) -> float:
        """The device's exponent now (1.0: no samples). ``calibration_at``: the calibration the
        estimate is made from; one newer than every sample's counts as one more change."""
        if backend not in self._samples:
            return 1.0
        newest = self._newest.get(backend)
        fresh = (calibration_at is not None and newest is not None
                 and calibration_at > newest + _SAME_CALIBRATION_S)
        hit = self._cache.get((backend, fresh))
        if hit is not None:
            return hit
        with self._lock:
            items = list(self._samples.get(backend, ()))
            value = fit_exponent(items, self._weights(items, calibration_at if fresh else None))
            self._cache[(backend, fresh)] = value
        return value

    def _weights(self, items: list[FidelitySample], newer: float | None) -> list[float]:
        """KEEP_PER_CHANGE per calibration stamp newer than a sample's (``newer``: a stamp no
        sample has, the calibration now)."""
        stamps = sorted({s.calibration_at for s in items if s.calibration_at is not None}
                        | ({newer} if newer is not None else set()))
        out = []
        for s in items:
            if s.calibration_at is None:
                out.append(1.0)
                continue
            changes = sum(1 for c in stamps if c > s.calibration_at + _SAME_CALIBRATION_S)
            out.append(self.keep_per_change ** changes)
        return out

    def apply(self, backend: str, estimate: float, calibration_at: float | None = None) -> float:
        """The corrected estimate. Below the lowest calibration estimate the device's samples
        cover, the exponent is not extrapolated: the correction there is the ratio at the edge
        of that range. Why: an exponent fitted on short, high-fidelity circuits (GHZ, measured a
        little better than estimated) turned a routed circuit's 0.01 into 0.3 and sent it to a
        chip that measures 0.01 on it."""
        exponent = self.exponent(backend, calibration_at)
        lowest = self.lowest_estimate(backend)
        if lowest is not None and 0.0 < estimate < lowest:
            return min(max(estimate * corrected_fidelity(lowest, exponent) / lowest, 0.0), 1.0)
        return corrected_fidelity(estimate, exponent)

    def lowest_estimate(self, backend: str) -> float | None:
        """The lowest calibration estimate among the device's samples (None: no samples)."""
        items = self._samples.get(backend)
        return min((s.estimate for s in items if s.estimate > 0.0), default=None) if items else None

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per device: samples kept and the exponent now (stats, explain)."""
        return {b: {"samples": float(len(s)), "exponent": self.exponent(b)} for b, s in list(self._samples.items())}


def calibration_stamp(view: BackendView, now: float) -> float | None:
    """The calibration stamp of a view (it carries the age of its calibration)."""
    return None if view.calibration_age_s is None else now - view.calibration_age_s


class FidelityCorrected:
    """A Predictor: ``base``'s estimates, each QPU fidelity corrected by its device's exponent.

    Everything else (``observe``, ``source``, ``explore_factor``, ...) is the base's, so it can
    sit anywhere in the stack; ``overruns.wrap_predictor`` puts it right around the model."""

    def __init__(self, base: Any, corrections: FidelityCorrections | None = None) -> None:
        self.base = base
        self.fidelity_corrections = corrections if corrections is not None else FidelityCorrections()

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "fidelity_corrections"):   # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        estimates = self.base.predict(job, backends)
        corr = self.fidelity_corrections
        profile = profile_of(job.features) if job.features else None
        if not corr._samples and profile is None:
            return estimates
        import time

        now = time.time()
        views = {b.name: b for b in backends}
        out = []
        for est in estimates:
            view = views.get(est.backend)
            if view is None or view.spec.kind != "qpu":
                out.append(est)
                continue
            fid = est.fidelity
            if est.backend in corr:
                fid = corr.apply(est.backend, fid, calibration_stamp(view, now))
            fid = observed_fidelity(fid, profile)
            out.append(est if fid == est.fidelity else replace(est, fidelity=fid))
        return out

    def calibration_fidelity(self, job: JobView, backend: BackendView) -> float:
        """The base's (uncorrected) fidelity estimate of ``job`` on ``backend`` now: what a
        measurement is compared against."""
        return float(self.base.predict(job, [backend])[0].fidelity)


def corrected(fresh: Any, previous: Any = None) -> FidelityCorrected:
    """``fresh`` wrapped; a hot-reloaded model keeps the corrections learned so far."""
    if isinstance(fresh, FidelityCorrected):
        return fresh
    return FidelityCorrected(fresh, corrections_of(previous))


def corrections_of(predictor: Any) -> FidelityCorrections | None:
    """The corrections inside a predictor stack (wrappers forward attributes), or None."""
    if predictor is None:
        return None
    found = getattr(predictor, "fidelity_corrections", None)
    return found if isinstance(found, FidelityCorrections) else None


__all__ = ["FidelitySample", "FidelityCorrections", "FidelityCorrected", "fit_exponent", "corrected_fidelity",
           "corrected", "corrections_of", "calibration_stamp"]
