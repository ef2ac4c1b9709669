"""What the allocator has seen, kept for the two readers that judge it: metrics and alerts.

Why one observer and not calls scattered through the dispatcher: the same facts feed a
Prometheus series and an alert rule (a run's predicted and measured time is a histogram
sample *and* a prediction-error sample; a health change is a gauge *and* a flapping
history), so they are recorded once, here, at the moment they happen. The dispatcher and the
fleet call the ``on_*`` hooks (each a deque append and a buffered metric, microseconds);
the allocator's operations loop asks for a snapshot (``observations``) for the alert engine
and refreshes the gauges that describe state rather than events (queue depth, health,
breakers, calibration, nodes).

Histories are bounded twice: by age (``window_s``, the longest window a rule may look at)
and by count (``max_samples``), so a busy allocator's memory does not grow with its uptime.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable, Mapping

from ray_qalloc.alerts.engine import (CalibrationStatus, DeadlineOutcome, DriftEvent, HealthChange, MemoryUsage,
                                      Observations, PredictionSample, QuotaUsage)
from ray_qalloc.metrics import metrics

DEFAULT_WINDOW_S = 6 * 3600.0
DEFAULT_MAX_SAMPLES = 20_000
RECENT_DECISIONS = 200
"""Starts kept with their reason, for the dashboard's recent decisions."""
HEALTH_HISTORY = 64
"""Health changes kept per backend (flapping rules look at the last few minutes)."""


class Observer:
    """Bounded histories of events, and the snapshot rules are evaluated on."""

    def __init__(self, *, window_s: float = DEFAULT_WINDOW_S, max_samples: int = DEFAULT_MAX_SAMPLES,
                 clock: Callable[[], float] = time.time) -> None:
        self.window_s = float(window_s)
        self.clock = clock
        self._health: dict[str, collections.deque[HealthChange]] = {}
        self._deadlines: collections.deque[DeadlineOutcome] = collections.deque(maxlen=max_samples)
        self._predictions: collections.deque[PredictionSample] = collections.deque(maxlen=max_samples)
        self._drift: dict[str, collections.deque[DriftEvent]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.decisions: collections.deque[dict[str, object]] = collections.deque(maxlen=RECENT_DECISIONS)
        # told of each health change (the change stream's durable backend log)
        self.on_health_change: Callable[[str, bool, float], None] | None = None

    # ---- events (called where they happen) -------------------------------------------------
    def on_decision(self, outcome: str, n: int = 1) -> None:
        if n > 0:
            self.counts[f"decision.{outcome}"] += n
            metrics.decision(outcome, n)

    def on_started(self, priority: str, backend: str, waited_s: float, *, job_id: str | None = None,
                   reason: str | None = None, at: float | None = None) -> None:
        self.counts["started"] += 1
        metrics.waited(priority, backend, max(waited_s, 0.0))
        if job_id is not None:
            self.decisions.append({"at": self.clock() if at is None else at, "job_id": job_id,
                                   "priority": priority, "backend": backend, "waited_s": max(waited_s, 0.0),
                                   "reason": reason or ""})

    def on_completed(self, backend: str, method: str | None, predicted_s: float | None, actual_s: float | None,
                     at: float | None = None) -> None:
        """A run that produced the job's result (its measured time against the prediction)."""
        at = self.clock() if at is None else at
        if actual_s is None or not actual_s > 0:
            return
        metrics.ran(backend, method, actual_s)
        if predicted_s is not None and predicted_s > 0:
            self._predictions.append(PredictionSample(at, backend, predicted_s, actual_s))
            metrics.prediction_error(backend, math.log(actual_s / predicted_s), method)

    def on_attempt_failed(self, backend: str, outcome: str) -> None:
        self.counts[f"attempt.{outcome}"] += 1
        metrics.attempt_failed(backend, outcome)

    def on_finished(self, priority: str, state: str, *, deadline_s: float | None = None,
                    created_at: float | None = None, at: float | None = None) -> None:
        """A job reached a terminal state; a job with a deadline adds a met/missed outcome
        (a failed or cancelled job with a deadline did not meet it)."""
        at = self.clock() if at is None else at
        self.counts[f"finished.{state}"] += 1
        metrics.finished(priority, state)
        if deadline_s is not None and created_at is not None and state != "cancelled":
            met = state == "completed" and at - created_at <= deadline_s
            self._deadlines.append(DeadlineOutcome(at, priority, met))

    def on_health(self, backend: str, up: bool, at: float | None = None) -> None:
        at = self.clock() if at is None else at
        history = self._health.setdefault(backend, collections.deque(maxlen=HEALTH_HISTORY))
        if not history or history[-1].up != up:
            history.append(HealthChange(at, up))
            if self.on_health_change is not None:
                self.on_health_change(backend, up, at)
        metrics.health(backend, up)

    def on_drift(self, device: str, series: str, factor: float, at: float) -> None:
        """A drift event of the quantum monitor (``factor``: value / baseline)."""
        magnitude = abs(math.log(factor)) if factor > 0 and math.isfinite(factor) else 0.0
        events = self._drift.setdefault(device, collections.deque(maxlen=1_000))
        events.append(DriftEvent(at, series, magnitude))
        metrics.drift(device, magnitude)

    def forget_backend(self, name: str) -> None:
        """A backend left the fleet: its subject disappears, so its alerts resolve."""
        self._health.pop(name, None)
        metrics.forget(backend=name)

    # ---- the snapshot ----------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        for dq in (self._deadlines, self._predictions):
            while dq and dq[0].at < cutoff:
                dq.popleft()
        for events in self._drift.values():
            while events and events[0].at < cutoff:
                events.popleft()

    def observations(self, *, queue_waits: Mapping[str, list[float]], breakers: Mapping[str, str],
                     calibrated_at: Mapping[str, float | None], quotas: Mapping[str, Mapping[str, QuotaUsage]],
                     node_memory: Mapping[str, MemoryUsage], now: float | None = None) -> Observations:
        """The snapshot the alert engine decides on: what only the allocator knows now (queue,
        breakers, calibration ages, quotas, nodes) with the histories kept here."""
        now = self.clock() if now is None else now
        self._prune(now)
        calibrations = {name: CalibrationStatus(at, tuple(self._drift.get(name, ())))
                        for name, at in calibrated_at.items()}
        return Observations(queue_waits=dict(queue_waits),
                            backend_health={k: tuple(v) for k, v in self._health.items()},
                            breakers=dict(breakers), calibrations=calibrations,
                            deadline_outcomes=tuple(self._deadlines), prediction_errors=tuple(self._predictions),
                            quotas={t: dict(q) for t, q in quotas.items()}, node_memory=dict(node_memory))
