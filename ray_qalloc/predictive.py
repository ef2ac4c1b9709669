"""Predictive scaling: ask for pool nodes a boot time before the demand that needs them.

Why: the reactive path (``autoscale.Requester``) asks Ray's autoscaler for a node only once jobs
queue, so every burst waits a node's boot time. When the history shows that something leads
the jobs (security-event surges, the hour of the day), ``forecast.Forecaster`` predicts the jobs
of the next ``horizon_s``; this module turns that forecast into a standing autoscaling request
(``request_resources`` bundles of ``qalloc_pool_cpu``, one per node) and, optionally, a timed
emergency ``reserve`` for the threat desk. When the forecaster finds no leading signal it keeps
only the jobs' own recent history, and the request then follows the load it already sees.

Decisions (pure functions, unit tested without Ray):

* ``nodes_wanted``: the nodes that would serve, at full use over the horizon, the forecast work
  plus the work already queued or running: ``ceil((jobs·work_per_job_s + queued_work_s) /
  (node_cores·horizon_s))``.
* ``request_size``: at most ``max_extra_nodes`` above the nodes the pool has now — a wrong
  forecast costs a bounded number of nodes.
* A request is a *floor* on the cluster (``request_resources`` is not additive and never scales
  below its bundles), so the controller asks for the whole wanted size, not a difference; when
  the forecast falls the request falls with it (``[]``: cleared) and idle nodes go back through
  the existing elastic path (``fleet._elastic_pools_tick``, then Ray's idle timeout).

``request_resources`` replaces the cluster's whole request, and the reactive ``Requester``
sends one too: both must go through one ``RequestMerger`` (per bundle shape the larger count
wins), or each would erase the other's.

Live wiring (the allocator's ops loop): ``PredictiveController.tick`` with the arrivals and
events since the last tick; ``history_from_store`` seeds the controller from the job store and
the security-event store at start.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_qalloc.forecast import FitReport, Forecaster

log = logging.getLogger("ray_qalloc.predictive")

POOL_RESOURCE = "qalloc_pool_cpu"      # = backends.pools.POOL_RESOURCE_CPU (not imported: keep this module light)
Bundle = dict[str, float]

# OCSF severity_id → band. 1-6 are ordered (Informational … Fatal); 0 (Unknown) and 99 (Other)
# say nothing about urgency and count as low.
BANDS: tuple[str, ...] = ("low", "medium", "high")
_HIGH = (4, 5, 6)
_MEDIUM = (3,)


def band_of(severity_id: int) -> int:
    """The band index (``BANDS``) of an OCSF ``severity_id``."""
    return 2 if severity_id in _HIGH else 1 if severity_id in _MEDIUM else 0


class PredictiveScalingSettings(BaseModel):
    """Predictive scaling of the elastic simulator pool (off by default: it spends money on a
    forecast, and needs ``min_history_s`` of history before it acts at all)."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(False, description="Forecast demand and request pool nodes ahead of it.")
    bin_s: float = Field(10.0, gt=0, description="Width of a history bin (arrivals and events are counted per bin).")
    horizon_s: float = Field(90.0, gt=0, description="How far ahead demand is forecast: about a node's boot time.")
    lookback_s: float = Field(360.0, gt=0, description="History the features see (should cover event→job lags).")
    lags: int = Field(12, ge=1, le=64, description="Blocks the lookback is cut into, per series.")
    refit_s: float = Field(600.0, gt=0, description="Refit the forecaster every this many seconds of history.")
    min_history_s: float = Field(6 * 3600.0, gt=0, description="No forecast (and no request) before this much history.")
    history_s: float = Field(15 * 86_400.0, gt=0, description="History kept for fitting (≥ 2 weeks: weekly seasonality).")
    margin: float = Field(0.05, ge=0, lt=1, description="Relative drop of held-out error a feature group (events, "
                          "seasonality) must bring to be kept; it must also win in most folds.")
    folds: int = Field(4, ge=2, le=20, description="Time-ordered cross-validation folds.")
    max_extra_nodes: int = Field(4, ge=0, description="Most nodes requested above what the pool has now.")
    node_cores: float | None = Field(None, gt=0, description="Cores of one pool node; None: as measured on the "
                                     "pools the cluster has (the caller passes it).")
    reserve_on_surge: bool = Field(False, description="On a surge of high-severity events (while events are a kept "
                                   "feature), reserve cores for emergency jobs through the threat desk.")
    reserve_slots: int = Field(1, ge=1, le=1024, description="Cores reserved on a surge.")
    reserve_for_s: float = Field(600.0, gt=0, description="How long a surge reservation lasts.")
    surge_quantile: float = Field(0.999, gt=0, lt=1, description="A bin whose high-severity count exceeds this "
                                  "quantile of the history's bins is a surge.")

    @model_validator(mode="after")
    def _shape(self) -> "PredictiveScalingSettings":
        if self.bin_s > self.horizon_s:
            raise ValueError("bin_s must not exceed horizon_s")
        if self.min_history_s > self.history_s:
            raise ValueError("min_history_s must not exceed history_s")
        return self

    def forecaster(self) -> Forecaster:
        return Forecaster(bin_s=self.bin_s, horizon_s=self.horizon_s, lookback_s=self.lookback_s, lags=self.lags,
                          margin=self.margin, folds=self.folds)


# ---- pure decisions --------------------------------------------------------------------------------
def nodes_wanted(forecast_jobs: float, work_per_job_s: float, queued_work_s: float, node_cores: float,
                 horizon_s: float) -> int:
    """Nodes that serve the forecast work plus the queued/running work within the horizon, at full use."""
    work = max(forecast_jobs, 0.0) * max(work_per_job_s, 0.0) + max(queued_work_s, 0.0)
    per_node = max(node_cores, 1e-9) * horizon_s
    return max(0, math.ceil(work / per_node - 1e-9))


def request_size(wanted: int, capacity_nodes: int, max_extra_nodes: int) -> int:
    """The request's node count: what is wanted, but never more than ``max_extra_nodes`` above now."""
    return max(0, min(int(wanted), int(capacity_nodes) + max(int(max_extra_nodes), 0)))


def bundles_for(nodes: int, resource: str = POOL_RESOURCE) -> list[Bundle]:
    """One ``{resource: 1}`` bundle per node (a pool node offers ``qalloc_pool_cpu: 1``)."""
    return [{resource: 1.0} for _ in range(max(nodes, 0))]


def merge_requests(parts: Sequence[Sequence[Mapping[str, float]]]) -> list[Bundle]:
    """Several floors on the cluster as one request: per bundle shape, the largest count of any part."""
    best: Counter[tuple[tuple[str, float], ...]] = Counter()
    for part in parts:
        counts = Counter(tuple(sorted((k, float(v)) for k, v in b.items())) for b in part)
        for shape, n in counts.items():
            best[shape] = max(best[shape], n)
    return [dict(shape) for shape in sorted(best) for _ in range(best[shape])]


class RequestMerger:
    """One sender for the reactive and the predictive request (``request_resources`` replaces
    the whole request: two senders would erase each other). ``part(name)`` is the ``send``
    callable of one of them; the merged request goes out only when it changes."""

    def __init__(self, send: Callable[[list[Bundle]], None]) -> None:
        self._send = send
        self._parts: dict[str, list[Bundle]] = {}
        self.current: list[Bundle] | None = None

    def part(self, name: str) -> Callable[[Sequence[Mapping[str, float]]], None]:
        def send(bundles: Sequence[Mapping[str, float]]) -> None:
            self._parts[name] = [dict(b) for b in bundles]
            merged = merge_requests(list(self._parts.values()))
            if merged != self.current and (merged or self.current):
                self._send(merged)
            self.current = merged
        return send


# ---- the controller --------------------------------------------------------------------------------
@dataclass
class Decision:
    """What one tick decided (also what the allocator logs and shows)."""

    at: float
    forecast_jobs: float | None = None       # jobs expected in the next horizon (None: no model yet)
    forecast_work_s: float | None = None
    wanted_nodes: int = 0
    requested_nodes: int = 0
    bundles: list[Bundle] = field(default_factory=list)
    reserve: dict[str, Any] | None = None    # a threat-desk action to take (``Allocator.threat_add``)
    groups: tuple[str, ...] = ()
    why: str = ""


class PredictiveController:
    """Bins the arrivals and events it is told about, refits the forecaster every ``refit_s``,
    and keeps a predictive autoscaling request (``request``) in step with the forecast.

    ``request(bundles)``: where the request goes (``RequestMerger.part("predictive")`` live; a
    recorder in tests and in the benchmark). ``clock``: time of the refit bookkeeping.
    ``work_per_job_s``: mean core-seconds of one job (``mean_job_seconds`` live).
    ``reserve_target``: the pool (or backend) a surge reservation is for; None: no reservations.
    """

    def __init__(self, settings: PredictiveScalingSettings, request: Callable[[list[Bundle]], None], *,
                 clock: Callable[[], float] = time.time, node_cores: float | None = None,
                 work_per_job_s: float = 1.0, reserve_target: str | None = None, resource: str = POOL_RESOURCE,
                 refit: bool = True) -> None:
        self.settings = settings
        self._request = request
        self._clock = clock
        self.node_cores = node_cores or settings.node_cores or 1.0
        self.work_per_job_s = work_per_job_s
        self.reserve_target = reserve_target
        self.resource = resource
        self.refit_enabled = refit                 # the benchmark freezes the model fitted on its training part
        self.forecaster = settings.forecaster()
        self._jobs: list[float] = []
        self._events: list[np.ndarray] = []
        self._t0: float | None = None              # start of the first kept bin
        self._open_start: float | None = None
        self._open_jobs = 0.0
        self._open_events = np.zeros(len(BANDS))
        self._last_fit: float | None = None
        self._surge_at: float | None = None        # high-severity count per bin above which a bin is a surge
        self._reserved_until = -math.inf
        self.current: list[Bundle] | None = None   # the last request sent (None: none yet)
        self.last: Decision | None = None

    # ---- history ----------------------------------------------------------------------------------
    @property
    def history_bins(self) -> int:
        return len(self._jobs)

    def seed(self, job_counts: Sequence[float], event_counts: np.ndarray | None, t0: float) -> None:
        """Start from a stored history (``history_from_store``): bins of ``settings.bin_s`` from ``t0``."""
        jobs = [float(x) for x in job_counts]
        ev = np.zeros((len(jobs), len(BANDS))) if event_counts is None else np.asarray(event_counts, dtype=float)
        self._jobs, self._events = jobs, [row.copy() for row in ev.reshape(len(jobs), len(BANDS))]
        self._t0 = t0
        self._open_start = t0 + len(jobs) * self.settings.bin_s
        self._trim()

    def _trim(self) -> None:
        keep = int(self.settings.history_s / self.settings.bin_s)
        extra = len(self._jobs) - keep
        if extra > 0 and self._t0 is not None:
            del self._jobs[:extra], self._events[:extra]
            self._t0 += extra * self.settings.bin_s

    def _observe(self, now: float, job_arrivals: float, event_counts: Sequence[float] | Mapping[str, float]) -> None:
        if self._open_start is None:
            self._open_start = self._t0 = now - (now % self.settings.bin_s)
        if isinstance(event_counts, Mapping):
            ev = np.array([float(event_counts.get(b, 0.0)) for b in BANDS])
        else:
            ev = np.zeros(len(BANDS))
            vals = np.asarray(event_counts, dtype=float).reshape(-1)[: len(BANDS)]
            ev[: len(vals)] = vals
        self._open_jobs += float(job_arrivals)
        self._open_events += ev
        b = self.settings.bin_s
        closed = 0
        while now >= self._open_start + b:
            self._jobs.append(self._open_jobs)
            self._events.append(self._open_events)
            self._open_jobs, self._open_events = 0.0, np.zeros(len(BANDS))
            self._open_start += b
            closed += 1
            if closed > self.settings.history_s / b:   # a long gap: skip ahead, the history restarts
                self._jobs, self._events = [], []
                self._open_start = self._t0 = now - (now % b)
                break
        if closed:
            self._trim()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self._jobs, dtype=float), np.vstack(self._events) if self._events else np.zeros((0, len(BANDS)))

    # ---- fitting ---------------------------------------------------------------------------------
    def fit(self) -> FitReport | None:
        """Fit on the history held now (None while it is shorter than ``min_history_s``)."""
        if self.history_bins * self.settings.bin_s < self.settings.min_history_s or self._t0 is None:
            return None
        if self.history_bins < self.forecaster.min_bins():
            return None
        jobs, events = self._arrays()
        report = self.forecaster.fit(jobs, events, self._t0)
        self._surge_at = float(np.quantile(events[:, -1], self.settings.surge_quantile))
        self._last_fit = self._clock()
        log.info("demand forecaster fitted on %d bins: %s, held-out WAPE %.3f", len(jobs), "+".join(report.groups),
                 report.cv_wape)
        return report

    def _maybe_refit(self) -> None:
        due = self._last_fit is None or (self.refit_enabled and self._clock() - self._last_fit >= self.settings.refit_s)
        if due:
            try:
                self.fit()
            except (ValueError, np.linalg.LinAlgError) as exc:   # too little variety yet: try at the next refit
                log.debug("forecaster not fitted: %s", exc)
                self._last_fit = self._clock()

    def forecast(self) -> float | None:
        """Jobs expected in the next horizon, from the closed bins (None: no model, or too little history)."""
        f = self.forecaster
        if not f.fitted or self._t0 is None or self.history_bins < f.lookback_bins:
            return None
        k = f.lookback_bins
        jobs = np.asarray(self._jobs[-k:], dtype=float)
        events = np.vstack(self._events[-k:])
        return f.predict(jobs, events, self._t0 + (self.history_bins - k) * self.settings.bin_s)

    # ---- one tick ----------------------------------------------------------------------------------
    def tick(self, now: float, job_arrivals: float, event_counts: Sequence[float] | Mapping[str, float],
             capacity_nodes: int, queued_work_s: float, *, node_cores: float | None = None) -> Decision:
        """Record what arrived since the last tick; decide the predictive request and send it if it changed.

        ``event_counts``: per band (``BANDS`` order, or a mapping by band name). ``capacity_nodes``:
        pool nodes up or booting now. ``queued_work_s``: core-seconds queued plus the rest of the
        running work. Disabled: records nothing, sends nothing."""
        if not self.settings.enabled:
            return Decision(at=now, why="disabled")
        if node_cores:
            self.node_cores = node_cores
        self._observe(now, job_arrivals, event_counts)
        self._maybe_refit()
        d = Decision(at=now)
        fc = self.forecast()
        report = self.forecaster.report
        if fc is None or report is None:
            d.why = "no model yet"
            self._send([])
        else:
            d.groups = report.groups
            d.forecast_jobs = fc
            d.forecast_work_s = fc * self.work_per_job_s
            d.wanted_nodes = nodes_wanted(fc, self.work_per_job_s, queued_work_s, self.node_cores,
                                          self.settings.horizon_s)
            d.requested_nodes = request_size(d.wanted_nodes, capacity_nodes, self.settings.max_extra_nodes)
            d.bundles = bundles_for(d.requested_nodes, self.resource)
            d.why = f"forecast {fc:.1f} jobs in {self.settings.horizon_s:.0f} s ({'+'.join(report.groups)})"
            self._send(d.bundles)
            d.reserve = self._surge_reserve(now, report)
        self.last = d
        return d

    def _send(self, bundles: list[Bundle]) -> None:
        if bundles != self.current and (bundles or self.current):
            log.info("predictive autoscaling request: %s", f"{len(bundles)} x {self.resource}" if bundles else "cleared")
            self._request(bundles)
        self.current = bundles

    def _surge_reserve(self, now: float, report: FitReport) -> dict[str, Any] | None:
        """A timed ``reserve`` when the last closed bin's high-severity count is a surge — only
        while events were kept as a feature (i.e. they have led jobs in this history)."""
        s = self.settings
        if not (s.reserve_on_surge and self.reserve_target and "events" in report.groups and self._events):
            return None
        if self._surge_at is None or now < self._reserved_until:
            return None
        high = float(self._events[-1][-1])
        if high <= self._surge_at:
            return None
        self._reserved_until = now + s.reserve_for_s
        return {"id": f"predictive:{self.reserve_target}:{int(now)}", "kind": "reserve", "target": self.reserve_target,
                "slots": s.reserve_slots, "for_s": s.reserve_for_s, "by": "predictive",
                "reason": f"{high:.0f} high-severity events in {s.bin_s:.0f} s (surge above {self._surge_at:.0f})"}

    def clear(self) -> None:
        """Drop the predictive request (shutting down, or switched off)."""
        self._send([])


# ---- history from the stores ---------------------------------------------------------------------------
def history_from_store(engine: Any, since: float, bin_s: float, *, until: float | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Jobs accepted (``jobs.created_at``) and security events received (``received_at``, by
    severity band) per bin of ``bin_s`` from ``since`` to ``until`` (default now).

    Two aggregate queries (GROUP BY bin), integer arithmetic on microseconds so that SQLite and
    PostgreSQL cut bins alike (a float→integer cast truncates on one and rounds on the other:
    at µs resolution that cannot move a job to another 10-s bin in practice). A store without the
    security-event table gives zero events. Returns ``(job_counts[T], event_counts[T, 3])``."""
    import sqlalchemy as sa

    from ray_qalloc.store import jobs_table

    until = time.time() if until is None else until
    n = max(0, math.ceil((until - since) / bin_s - 1e-9))
    jobs = np.zeros(n)
    events = np.zeros((n, len(BANDS)))
    if n == 0:
        return jobs, events
    bin_us = int(round(bin_s * 1_000_000))
    since_us, until_us = int(round(since * 1_000_000)), int(round(until * 1_000_000))
    j = jobs_table.c
    jb = (sa.cast((j.created_at - sa.literal(float(since))) * 1_000_000, sa.BigInteger)
          // sa.literal(bin_us, sa.BigInteger)).label("b")
    q_jobs = (sa.select(jb, sa.func.count()).where(j.created_at >= since, j.created_at < until)
              .group_by(jb))
    with engine.connect() as conn:
        for b, count in conn.execute(q_jobs):
            if 0 <= int(b) < n:
                jobs[int(b)] += count
        if sa.inspect(conn).has_table("security_events"):
            from ray_qalloc.integration.eventstore import events_table

            e = events_table.c
            eb = ((e.received_at - sa.literal(since_us, sa.BigInteger)) // sa.literal(bin_us, sa.BigInteger)).label("b")
            band = sa.case((e.severity_id.in_(_HIGH), 2), (e.severity_id.in_(_MEDIUM), 1), else_=0).label("band")
            q_ev = (sa.select(eb, band, sa.func.count())
                    .where(e.received_at >= since_us, e.received_at < until_us).group_by(eb, band))
            for b, k, count in conn.execute(q_ev):
                if 0 <= int(b) < n:
                    events[int(b), int(k)] += count
    return jobs, events


def mean_job_seconds(engine: Any, since: float) -> float | None:
    """Mean wall time of completed attempts started since ``since`` (the work one job brings);
    None when none completed. One aggregate query."""
    import sqlalchemy as sa

    from ray_qalloc.store import attempts_table

    a = attempts_table.c
    q = sa.select(sa.func.avg(a.wall_s)).where(a.outcome == "completed", a.started_at >= since, a.wall_s.is_not(None))
    with engine.connect() as conn:
        v = conn.execute(q).scalar()
    return None if v is None else float(v)
