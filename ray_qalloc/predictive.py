"""Predictive scaling: ask for pool nodes a boot time before the demand that needs them.

Why: the reactive path (``autoscale.Requester``) asks Ray's autoscaler for a node only once jobs
queue, so every burst waits a node's boot time. When the history shows that something leads
the jobs (security-event surges, the hour of the day), a forecaster per demand class
(``forecast_classes``: the CPU pool, the GPU pool, each QPU architecture) predicts the jobs that
arrive while a node asked for now would serve — ``(t + boot_s, t + boot_s + horizon_s]``, see
``forecast`` for why the window is offset by the boot. This module turns each pool class's
forecast into a standing autoscaling request (``request_resources`` bundles of that pool's shape,
``qalloc_pool_cpu`` or ``qalloc_pool_gpu``, one per node: the pre-warm) and, for a class with a
reservation target (a QPU class's device, or a pool), a timed emergency ``reserve`` for the
threat desk while a surge is forecast. When a class's forecaster finds no leading signal it keeps
only the jobs' own recent history, and its request then follows the load it already sees.

Decisions (pure functions, unit tested without Ray):

* ``nodes_wanted``: the nodes that would serve, at full use over the serving window, the
  forecast work plus the work already queued or running: ``ceil((jobs·work_per_job_s +
  queued_work_s) / (node_cores·horizon_s))`` (Little's law: the forecast window's arrivals times
  the work of one, spread over the window, is the cores busy in it).
* ``request_size``: at most ``max_extra_nodes`` above the nodes the pool has now — a wrong
  forecast costs a bounded number of nodes.
* A request is a *floor* on the cluster (``request_resources`` is not additive and never scales
  below its bundles), so the controller asks for the whole wanted size, not a difference; when
  the forecast falls the request falls with it (``[]``: cleared) and idle nodes go back through
  the existing elastic path (``fleet._elastic_pools_tick``, then Ray's idle timeout).
* surge reservations: a class whose forecast exceeds its history's ``surge_quantile`` window,
  *and* whose model kept a feature beyond its own jobs (events or a season), gets a timed
  ``reserve`` on its target. A jobs-only model forecasts a surge only once it is under way — then
  the jobs are in the queue already and holding slots ahead of them buys nothing — and events
  are kept only where they lowered the held-out error (where they do not lead jobs, they are
  dropped, or kept only for what else they carry, such as the daily cycle).

``request_resources`` replaces the cluster's whole request, and the reactive ``Requester``
sends one too: both must go through one ``RequestMerger`` (per bundle shape the larger count
wins), or each would erase the other's.

Live wiring (the allocator's ops loop): ``PredictiveController.tick`` with the arrivals and
events since the last tick (per class, or one total that is all the CPU pool's);
``history_from_store`` seeds the controller from the job store and the security-event store at
start; ``predictive_live`` reads the per-class history, queue and capacity from an allocator.
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
from ray_qalloc.forecast_classes import CPU_POOL, POOL_RESOURCES, ClassForecaster, is_pool_class

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
    horizon_s: float = Field(90.0, gt=0, description="The window a new node is sized for, after it is up: jobs "
                             "arriving in (t + boot_s, t + boot_s + horizon_s] are forecast at t.")
    boot_s: float = Field(90.0, ge=0, description="A pool node's boot time: a node asked for now serves from this "
                          "far ahead, so the forecast window starts there (0: the next horizon_s).")
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
    reserve_on_surge: bool = Field(False, description="When a class's forecast is a surge (and its model kept a "
                                   "leading feature: events or a season), reserve slots of that class for "
                                   "emergency jobs through the threat desk.")
    reserve_slots: int = Field(1, ge=1, le=1024, description="Slots (cores of a pool) reserved on a surge.")
    reserve_for_s: float = Field(600.0, gt=0, description="How long a surge reservation lasts.")
    surge_quantile: float = Field(0.95, gt=0, lt=1, description="A forecast above this quantile of the class's "
                                  "history windows is a surge.")
    min_class_jobs: float = Field(20.0, ge=0, description="A class with fewer jobs in the history gets no forecaster.")

    @model_validator(mode="after")
    def _shape(self) -> "PredictiveScalingSettings":
        if self.bin_s > self.horizon_s:
            raise ValueError("bin_s must not exceed horizon_s")
        if self.min_history_s > self.history_s:
            raise ValueError("min_history_s must not exceed history_s")
        return self

    def forecaster(self) -> Forecaster:
        """One class's forecaster (unfitted)."""
        return Forecaster(bin_s=self.bin_s, horizon_s=self.horizon_s, lead_s=self.boot_s, lookback_s=self.lookback_s,
                          lags=self.lags, margin=self.margin, folds=self.folds)

    def class_forecaster(self) -> ClassForecaster:
        return ClassForecaster(self.forecaster, min_jobs=self.min_class_jobs)


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
PerClass = Mapping[str, float]


@dataclass
class ClassDecision:
    """One class's part of a tick."""

    forecast_jobs: float | None = None      # jobs expected in the class's serving window (None: no model)
    wanted_nodes: int = 0                   # pool classes only
    requested_nodes: int = 0
    surge: bool = False
    groups: tuple[str, ...] = ()


@dataclass
class Decision:
    """What one tick decided (also what the allocator logs and shows). The top-level figures are
    totals over the classes; ``per_class`` has each class's."""

    at: float
    forecast_jobs: float | None = None       # jobs expected in the serving window, all classes (None: no model yet)
    forecast_work_s: float | None = None
    wanted_nodes: int = 0
    requested_nodes: int = 0
    bundles: list[Bundle] = field(default_factory=list)
    reserve: dict[str, Any] | None = None    # the first of ``reserves`` (kept for callers that take one)
    reserves: list[dict[str, Any]] = field(default_factory=list)   # threat-desk actions (``Allocator.threat_add``)
    groups: tuple[str, ...] = ()             # the CPU pool's kept features (or the first class's)
    per_class: dict[str, ClassDecision] = field(default_factory=dict)
    why: str = ""


def _per_class(x: float | PerClass | None, default_class: str = CPU_POOL) -> dict[str, float]:
    """A per-class figure from a mapping, or from one number that is all the CPU pool's."""
    if x is None:
        return {}
    if isinstance(x, Mapping):
        return {str(k): float(v) for k, v in x.items()}
    return {default_class: float(x)}


class PredictiveController:
    """Bins the arrivals (per demand class) and events it is told about, refits one forecaster
    per class every ``refit_s``, and keeps a predictive autoscaling request (``request``) in step
    with the pool classes' forecasts, and surge reservations with every class's.

    ``request(bundles)``: where the request goes (``RequestMerger.part("predictive")`` live; a
    recorder in tests and in the benchmark). ``clock``: time of the refit bookkeeping.
    ``work_per_job_s``: mean core-seconds of one job, one number or per class.
    ``reserve_targets``: per class, the backend or pool a surge reservation is for
    (``reserve_target``: the CPU pool's, the older single-target form); none: no reservations.
    """

    def __init__(self, settings: PredictiveScalingSettings, request: Callable[[list[Bundle]], None], *,
                 clock: Callable[[], float] = time.time, node_cores: float | PerClass | None = None,
                 work_per_job_s: float | PerClass = 1.0, reserve_target: str | None = None,
                 reserve_targets: Mapping[str, str] | None = None, resource: str = POOL_RESOURCE,
                 refit: bool = True) -> None:
        self.settings = settings
        self._request = request
        self._clock = clock
        self.node_cores = _per_class(node_cores or settings.node_cores)
        self.work_per_job_s = work_per_job_s
        self.reserve_targets: dict[str, str] = dict(reserve_targets or {})
        if reserve_target:
            self.reserve_targets.setdefault(CPU_POOL, reserve_target)
        self.resources = dict(POOL_RESOURCES) | {CPU_POOL: resource}
        self.refit_enabled = refit                 # the benchmark freezes the model fitted on its training part
        self.forecasters = settings.class_forecaster()
        self._jobs: dict[str, list[float]] = {}
        self._n = 0                                # closed bins held
        self._events: list[np.ndarray] = []
        self._t0: float | None = None              # start of the first kept bin
        self._open_start: float | None = None
        self._open_jobs: dict[str, float] = {}
        self._open_events = np.zeros(len(BANDS))
        self._last_fit: float | None = None
        self._reserved_until: dict[str, float] = {}
        self.current: list[Bundle] | None = None   # the last request sent (None: none yet)
        self.last: Decision | None = None
        self.seeded_by_class = False               # predictive_live re-seeds a one-series seed per class

    # ---- history ----------------------------------------------------------------------------------
    @property
    def history_bins(self) -> int:
        return self._n

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(self._jobs))

    def work_of(self, cls: str) -> float:
        w = self.work_per_job_s
        if isinstance(w, Mapping):
            return float(w.get(cls, np.mean(list(w.values())) if w else 1.0))
        return float(w)

    def seed(self, job_counts: Sequence[float] | np.ndarray | Mapping[str, Sequence[float] | np.ndarray],
             event_counts: np.ndarray | None, t0: float) -> None:
        """Start from a stored history: bins of ``settings.bin_s`` from ``t0``; ``job_counts`` per
        class (``predictive_live.class_history_from_store``) or one series that is all the CPU
        pool's (``history_from_store``)."""
        series = job_counts if isinstance(job_counts, Mapping) else {CPU_POOL: job_counts}
        jobs = {c: [float(x) for x in np.asarray(v, dtype=float).reshape(-1)] for c, v in series.items()}
        n = max((len(v) for v in jobs.values()), default=0)
        if any(len(v) != n for v in jobs.values()):
            raise ValueError("every class's series must have the same bins")
        ev = np.zeros((n, len(BANDS))) if event_counts is None else np.asarray(event_counts, dtype=float)
        self._jobs, self._n = jobs, n
        self._events = [row.copy() for row in ev.reshape(n, len(BANDS))]
        self._t0 = t0
        self._open_start = t0 + n * self.settings.bin_s
        self._trim()

    def _trim(self) -> None:
        keep = int(self.settings.history_s / self.settings.bin_s)
        extra = self._n - keep
        if extra > 0 and self._t0 is not None:
            for v in self._jobs.values():
                del v[:extra]
            del self._events[:extra]
            self._n -= extra
            self._t0 += extra * self.settings.bin_s

    def _observe(self, now: float, arrivals: Mapping[str, float], event_counts: Sequence[float] | Mapping[str, float]
                 ) -> None:
        b = self.settings.bin_s
        if self._open_start is None:
            self._open_start = self._t0 = now - (now % b)
        if isinstance(event_counts, Mapping):
            ev = np.array([float(event_counts.get(x, 0.0)) for x in BANDS])
        else:
            ev = np.zeros(len(BANDS))
            vals = np.asarray(event_counts, dtype=float).reshape(-1)[: len(BANDS)]
            ev[: len(vals)] = vals
        for cls, k in arrivals.items():
            self._open_jobs[cls] = self._open_jobs.get(cls, 0.0) + float(k)
            if cls not in self._jobs:                       # a class seen for the first time: no jobs before
                self._jobs[cls] = [0.0] * self._n
        self._open_events += ev
        closed = 0
        while now >= self._open_start + b:
            for cls, v in self._jobs.items():
                v.append(self._open_jobs.get(cls, 0.0))
            self._events.append(self._open_events)
            self._n += 1
            self._open_jobs, self._open_events = {}, np.zeros(len(BANDS))
            self._open_start += b
            closed += 1
            if closed > self.settings.history_s / b:   # a long gap: skip ahead, the history restarts
                self._jobs = {c: [] for c in self._jobs}
                self._events, self._n = [], 0
                self._open_start = self._t0 = now - (now % b)
                break
        if closed:
            self._trim()

    def _arrays(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ev = np.vstack(self._events) if self._events else np.zeros((0, len(BANDS)))
        return {c: np.asarray(v, dtype=float) for c, v in self._jobs.items()}, ev

    # ---- fitting ---------------------------------------------------------------------------------
    @property
    def forecaster(self) -> Forecaster:
        """The CPU pool's forecaster (or the first class's; an unfitted one when there is none)."""
        m = self.forecasters.models
        return m.get(CPU_POOL) or next(iter(m.values()), None) or self.settings.forecaster()

    @property
    def reports(self) -> dict[str, FitReport]:
        return self.forecasters.reports

    def fit(self) -> dict[str, FitReport] | None:
        """Fit every class on the history held now (None while it is shorter than ``min_history_s``
        or no class has enough jobs)."""
        if self._n * self.settings.bin_s < self.settings.min_history_s or self._t0 is None:
            return None
        if self._n < self.settings.forecaster().min_bins():
            return None
        jobs, events = self._arrays()
        reports = self.forecasters.fit(jobs, events, self._t0, self.settings.surge_quantile)
        self._last_fit = self._clock()
        for cls, r in reports.items():
            log.info("demand forecaster %s fitted on %d bins: %s, held-out WAPE %.3f", cls, r.rows,
                     "+".join(r.groups), r.cv_wape)
        return reports or None

    def _maybe_refit(self) -> None:
        due = self._last_fit is None or (self.refit_enabled and self._clock() - self._last_fit >= self.settings.refit_s)
        if due:
            try:
                self.fit()
            except (ValueError, np.linalg.LinAlgError) as exc:   # too little variety yet: try at the next refit
                log.debug("forecaster not fitted: %s", exc)
                self._last_fit = self._clock()

    def forecast(self) -> dict[str, float]:
        """Per fitted class, the jobs expected in its serving window, from the closed bins."""
        if not self.forecasters.fitted or self._t0 is None:
            return {}
        k = max(f.lookback_bins for f in self.forecasters.models.values())
        if self._n < k:
            return {}
        jobs = {c: np.asarray(v[-k:], dtype=float) for c, v in self._jobs.items()}
        events = np.vstack(self._events[-k:])
        return self.forecasters.predict(jobs, events, self._t0 + (self._n - k) * self.settings.bin_s)

    # ---- one tick ----------------------------------------------------------------------------------
    def tick(self, now: float, job_arrivals: float | PerClass, event_counts: Sequence[float] | Mapping[str, float],
             capacity_nodes: int | PerClass, queued_work_s: float | PerClass, *,
             node_cores: float | PerClass | None = None) -> Decision:
        """Record what arrived since the last tick; decide the predictive request and send it if it changed.

        ``job_arrivals``, ``capacity_nodes`` (pool nodes up or booting), ``queued_work_s``
        (core-seconds queued plus the rest of the running work) and ``node_cores``: per class, or
        one number that is all the CPU pool's. ``event_counts``: per band (``BANDS`` order, or a
        mapping by band name). Disabled: records nothing, sends nothing."""
        if not self.settings.enabled:
            return Decision(at=now, why="disabled")
        if node_cores:
            self.node_cores |= _per_class(node_cores)
        self._observe(now, _per_class(job_arrivals), event_counts)
        self._maybe_refit()
        d = Decision(at=now)
        fc = self.forecast()
        if not fc:
            d.why = "no model yet"
            self._send([])
            self.last = d
            return d
        capacity, queued = _per_class(capacity_nodes), _per_class(queued_work_s)
        bundles: list[Bundle] = []
        whys = []
        for cls in sorted(fc):
            report = self.forecasters.reports[cls]
            cd = ClassDecision(forecast_jobs=fc[cls], groups=report.groups)
            if is_pool_class(cls):
                cd.wanted_nodes = nodes_wanted(fc[cls], self.work_of(cls), queued.get(cls, 0.0),
                                               self.node_cores.get(cls, 1.0), self.settings.horizon_s)
                cd.requested_nodes = request_size(cd.wanted_nodes, int(capacity.get(cls, 0)),
                                                  self.settings.max_extra_nodes)
                bundles += bundles_for(cd.requested_nodes, self.resources.get(cls, POOL_RESOURCE))
            cd.surge = fc[cls] > self.forecasters.thresholds.get(cls, math.inf)
            action = self._surge_reserve(now, cls, cd, report)
            if action is not None:
                d.reserves.append(action)
            d.per_class[cls] = cd
            whys.append(f"{cls} {fc[cls]:.1f} ({'+'.join(report.groups)})")
        d.forecast_jobs = sum(fc.values())
        d.forecast_work_s = sum(v * self.work_of(c) for c, v in fc.items())
        d.wanted_nodes = sum(c.wanted_nodes for c in d.per_class.values())
        d.requested_nodes = sum(c.requested_nodes for c in d.per_class.values())
        d.bundles = bundles
        d.reserve = d.reserves[0] if d.reserves else None
        main = d.per_class.get(CPU_POOL) or next(iter(d.per_class.values()))
        d.groups = main.groups
        s = self.settings
        d.why = f"jobs forecast in ({s.boot_s:.0f} s, {s.boot_s + s.horizon_s:.0f} s]: " + ", ".join(whys)
        self._send(bundles)
        self.last = d
        return d

    def _send(self, bundles: list[Bundle]) -> None:
        if bundles != self.current and (bundles or self.current):
            log.info("predictive autoscaling request: %s", ", ".join(
                f"{n} x {k}" for k, n in sorted(Counter(next(iter(b)) for b in bundles).items())) or "cleared")
            self._request(bundles)
        self.current = bundles

    def _surge_reserve(self, now: float, cls: str, cd: ClassDecision, report: FitReport) -> dict[str, Any] | None:
        """A timed ``reserve`` on the class's target while a surge is forecast for it — only where
        the class's model kept a leading feature (see the module docstring)."""
        s = self.settings
        target = self.reserve_targets.get(cls)
        if not (s.reserve_on_surge and target and cd.surge and len(report.groups) > 1):
            return None
        if now < self._reserved_until.get(cls, -math.inf):
            return None
        self._reserved_until[cls] = now + s.reserve_for_s
        level = self.forecasters.thresholds[cls]
        return {"id": f"predictive:{target}:{int(now)}", "kind": "reserve", "target": target,
                "slots": s.reserve_slots, "for_s": s.reserve_for_s, "by": "predictive",
                "reason": f"{cls}: {cd.forecast_jobs:.0f} jobs forecast in {s.horizon_s:.0f} s from "
                          f"{s.boot_s:.0f} s on (surge above {level:.0f}; {'+'.join(report.groups)})"}

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
