"""The one table of ray-qalloc's own metrics: name, kind, unit, description, tags, buckets.

Why one table: the facade that records (``facade.py``), the Grafana dashboard that plots
(``grafana.py``) and the tests that scrape a real Prometheus all read it, so a metric cannot be
recorded under one name and plotted under another, and a tag cannot be plotted that is never
recorded. Add a metric here first; the dashboard follows by regenerating it
(``python -m ray_qalloc.metrics.grafana``), and a test fails until the committed dashboard does.

Names follow Prometheus' conventions: the ``qalloc_`` namespace, the base unit as a suffix
(``_seconds``, ``_bytes``, ``_ratio``), counters ending in ``_total``. Ray's exporter puts
``ray_`` in front of every application metric (verified with Ray 2.60: ``qalloc_run_seconds``
is scraped as ``ray_qalloc_run_seconds_bucket``/``_count``/``_sum``) and adds its own labels
(``SessionName``, ``NodeAddress``, ``WorkerId``, ``Component``, ...), so queries aggregate
over those with ``sum by``/``max by`` the tags listed here.

Every tag key names a bounded domain (``tags.py``); nothing unbounded (job ids, tenants, raw
paths) is ever a tag.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

from ray_qalloc.metrics.tags import NONE, OTHER, Choice, Domain, Index, Named
from ray_qalloc.priority import CLASSES

Kind = Literal["counter", "gauge", "histogram"]
Aggregation = Literal["sum", "max", "min"]

RAY_PREFIX = "ray_"
"""What Ray's metrics agent prepends to every application metric it exports."""


# ---- tag domains ------------------------------------------------------------------------------
def _backend_name(raw: str) -> str:
    """A candidate ``cpu-1a2b3c4d/mps@2`` or a hedge ``qpu_fez#backup`` → the backend it runs on
    (the pool or QPU); the method is a tag of its own and threads are not a tag."""
    return raw.partition("#")[0].partition("/")[0]


def _device_name(raw: str) -> str:
    """``fake_torino`` (Qiskit's name of an emulated device) → ``qpu_torino`` (ray-qalloc's), so
    that calibration and backend metrics of one QPU carry the same value."""
    raw = raw.lower()
    return "qpu_" + raw.removeprefix("fake_") if raw.startswith("fake_") else raw


_ID_LIKE = re.compile(r"[0-9a-fA-F-]{12,}|[0-9]+")


def _route_template(raw: str) -> str:
    """A route template (``/v1/jobs/{job_id}``) passes; a raw path whose segment looks like an id
    (``/v1/jobs/3f2a9c...``) folds at once, before it can take one of the route cap's places."""
    for segment in raw.split("/"):
        if segment and not segment.startswith("{") and _ID_LIKE.fullmatch(segment):
            return OTHER
    return raw


def _node_name(raw: str) -> str:
    """A Ray node id (56 hex digits) → its first 8, as pool names use (``cpu-1a2b3c4d``)."""
    return raw.lower()[:8]


_QPU_FAMILIES = "qpu|ibm|braket|ionq"

PRIORITY = Choice(CLASSES, doc="priority class (ray_qalloc.priority.CLASSES)")
POOL = Named(r"(cpu|gpu)-[0-9a-z]{1,16}", cap=256, normalise=_backend_name,
             doc="simulator pool: cpu-<node> / gpu-<node>; 'none' before a job has one")
BACKEND = Named(rf"(cpu|gpu)-[0-9a-z]{{1,16}}|(aer|fake|{_QPU_FAMILIES})_[a-z0-9_]{{1,48}}", cap=256,
                normalise=_backend_name, doc="where a run goes: a pool (cpu-<node>) or a QPU (qpu_<device>)")
DEVICE = Named(rf"({_QPU_FAMILIES})_[a-z0-9_]{{1,48}}", cap=64, normalise=_device_name,
               doc="a QPU by its backend name (qpu_torino, ibm_torino); fake_<x> reads as qpu_<x>")
METHOD = Choice(("statevector", "mps", "stabilizer", "density_matrix", "extended_stabilizer",
                 "tensor_network", "unitary", "superop", "automatic", "qpu"),
                aliases={"matrix_product_state": "mps", "sv": "statevector", "dm": "density_matrix",
                         "clifford": "stabilizer", "tn": "tensor_network"},
                doc="simulation method (Aer's long names accepted), or qpu")
QUBIT = Index(cap=1024, doc="qubit index, below the device's size")
QUANTITY = Choice(("t1_seconds", "t2_seconds", "readout_error", "gate_error_1q", "gate_error_2q",
                   "frequency_hz"), aliases={"t1": "t1_seconds", "t2": "t2_seconds"},
                  doc="calibration quantity; the unit is in its name")
DECISION_OUTCOME = Choice(("placed", "held", "preempted", "hedged", "failover", "unplaceable", "rejected",
                           "deadline_at_risk"), doc="what a placement decision did")
ATTEMPT_OUTCOME = Choice(("actor_died", "timed_out", "backend_error", "error", "stopped", "unreachable",
                          "lost", "cancelled"), doc="how a failed attempt ended (runlife._classify)")
JOB_STATE = Choice(("completed", "failed", "cancelled"), doc="terminal job state (jobs.TERMINAL_STATES)")
DIRECTION = Choice(("over", "under"), doc="over: ran longer than predicted")
ROUTE = Named(r"/[A-Za-z0-9_{}:.\-/]{0,99}", cap=64, normalise=_route_template,
              doc="route template, never a raw path; 'none' when no route matched")
CODE = Choice(("1xx", "2xx", "3xx", "4xx", "5xx"), doc="HTTP status class")
NODE = Named(r"[0-9a-f]{8}|local", cap=512, normalise=_node_name, doc="first 8 hex digits of the Ray node id")
GPU = Index(cap=16, doc="GPU index on its node")
RULE = Named(r"[a-z][a-z0-9_.\-]{0,63}", cap=128, doc="alert rule name")
SEVERITY = Choice(("info", "warning", "critical"), aliases={"warn": "warning", "error": "critical"},
                  doc="alert severity")
DROP_REASON = Choice(("overflow", "bad_value", "error"), doc="why a recording was dropped")
SINK = Named(r"[A-Za-z0-9_.\-]{1,64}", cap=64, doc="a configured sink's name (alerts.sinks)")
RECORD = Choice(("jobs", "audit"), doc="kind of record forwarded to a sink")
FORWARD_OUTCOME = Choice(("delivered", "failed", "dead"), doc="what became of one attempt to forward a record: "
                         "delivered, failed (retried later), dead (refused for good, skipped)")
EVENT_SOURCE = Choice(("http", "syslog_tcp", "syslog_udp"), doc="how security events came in")
EVENT_FORMAT = Choice(("cef", "leef", "syslog", "ocsf", "stix"), doc="security event format; 'none' when a "
                      "record was not recognised")
EVENT_OUTCOME = Choice(("stored", "duplicate", "rejected"), doc="what became of a security event record")


# ---- metric definitions -----------------------------------------------------------------------
# Buckets. Ray requires positive boundaries. Ray's exported ``_sum`` is not the sum of the values
# but of each bucket's midpoint (Ray 2.60 aggregates histograms as bucket counts), so a mean read
# from _sum/_count is only as exact as the buckets: prefer quantiles, and keep buckets tight.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
               1800.0, 3600.0)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# |ln(actual / predicted)| at factors 1.1, 1.25, 1.5, 2, 3, 5, 10, 30, 100, 1000.
LOG_RATIO_BUCKETS = tuple(round(math.log(f), 6) for f in (1.1, 1.25, 1.5, 2, 3, 5, 10, 30, 100, 1000))


@dataclass(frozen=True)
class MetricDef:
    """One metric. ``group`` is its dashboard row; ``agg`` how a panel combines the series that
    several processes (Ray's ``WorkerId`` label) export for the same tags."""

    name: str
    kind: Kind
    unit: str
    description: str
    tags: tuple[tuple[str, Domain], ...]
    group: str
    boundaries: tuple[float, ...] = ()
    agg: Aggregation = "sum"

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.tags)

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes (histograms add ``_bucket``, ``_count``, ``_sum``)."""
        return RAY_PREFIX + self.name

    def series_names(self) -> tuple[str, ...]:
        if self.kind == "histogram":
            return tuple(f"{self.exported}_{s}" for s in ("bucket", "count", "sum"))
        return (self.exported,)


def _m(name: str, kind: Kind, unit: str, description: str, tags: tuple[tuple[str, Domain], ...], group: str,
       boundaries: tuple[float, ...] = (), agg: Aggregation = "sum") -> MetricDef:
    return MetricDef(name, kind, unit, description, tags, group, boundaries, agg)


METRICS: tuple[MetricDef, ...] = (
    # Queue
    _m("qalloc_queue_depth", "gauge", "jobs", "Jobs waiting, by priority class and the pool they wait for.",
       (("priority", PRIORITY), ("pool", POOL)), "Queue"),
    _m("qalloc_queue_wait_seconds", "histogram", "seconds", "Time from acceptance to the start of a run.",
       (("priority", PRIORITY), ("backend", BACKEND)), "Queue", WAIT_BUCKETS),
    _m("qalloc_jobs_finished_total", "counter", "jobs", "Jobs that reached a terminal state.",
       (("priority", PRIORITY), ("state", JOB_STATE)), "Queue"),
    # Placement
    _m("qalloc_decisions_total", "counter", "decisions", "Placement decisions, by what they did.",
       (("outcome", DECISION_OUTCOME),), "Placement"),
    _m("qalloc_prediction_error_log_ratio", "histogram", "ratio",
       "|ln(actual / predicted runtime)| of completed runs; direction over = ran longer than predicted.",
       (("backend", BACKEND), ("method", METHOD), ("direction", DIRECTION)), "Placement", LOG_RATIO_BUCKETS),
    # Runs
    _m("qalloc_run_seconds", "histogram", "seconds", "Measured runtime of completed runs.",
       (("backend", BACKEND), ("method", METHOD)), "Runs", RUN_BUCKETS),
    _m("qalloc_attempt_failures_total", "counter", "attempts", "Attempts that ended without a result.",
       (("backend", BACKEND), ("outcome", ATTEMPT_OUTCOME)), "Runs"),
    # Backends
    _m("qalloc_breaker_state", "gauge", "state", "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
       (("backend", BACKEND),), "Backends", agg="max"),
    _m("qalloc_backend_healthy", "gauge", "bool", "1 while a backend answers its health probe, else 0.",
       (("backend", BACKEND),), "Backends", agg="min"),
    _m("qalloc_provider_pending_jobs", "gauge", "jobs", "Jobs of other users ahead in a QPU provider's queue.",
       (("backend", BACKEND),), "Backends", agg="max"),
    _m("qalloc_provider_operational", "gauge", "bool", "1 while a QPU's provider has it in service, else 0.",
       (("backend", BACKEND),), "Backends", agg="min"),
    # Calibration
    _m("qalloc_drift_score", "gauge", "score", "Calibration drift of a QPU against its recent history.",
       (("device", DEVICE),), "Calibration", agg="max"),
    _m("qalloc_calibration_value", "gauge", "quantity",
       "Latest calibration per qubit; the unit is in the quantity's name.",
       (("device", DEVICE), ("qubit", QUBIT), ("quantity", QUANTITY)), "Calibration", agg="max"),
    # API
    _m("qalloc_api_requests_total", "counter", "requests", "HTTP requests, by route template and status class.",
       (("route", ROUTE), ("code", CODE)), "API"),
    _m("qalloc_api_request_seconds", "histogram", "seconds", "HTTP request latency, by route template.",
       (("route", ROUTE),), "API", API_BUCKETS),
    # Nodes
    _m("qalloc_node_cpu_utilization_ratio", "gauge", "ratio", "CPU utilisation of a node (0..1).",
       (("node", NODE),), "Nodes", agg="max"),
    _m("qalloc_node_memory_used_bytes", "gauge", "bytes", "Memory in use on a node.",
       (("node", NODE),), "Nodes", agg="max"),
    _m("qalloc_node_memory_total_bytes", "gauge", "bytes", "Memory of a node.", (("node", NODE),), "Nodes",
       agg="max"),
    _m("qalloc_node_gpu_utilization_ratio", "gauge", "ratio", "Utilisation of one GPU of a node (0..1).",
       (("node", NODE), ("gpu", GPU)), "Nodes", agg="max"),
    _m("qalloc_node_gpu_memory_used_bytes", "gauge", "bytes",
       "Memory in use on one GPU of a node (every process's, as NVML reports it).",
       (("node", NODE), ("gpu", GPU)), "Nodes", agg="max"),
    _m("qalloc_node_gpu_memory_total_bytes", "gauge", "bytes", "Memory of one GPU of a node.",
       (("node", NODE), ("gpu", GPU)), "Nodes", agg="max"),
    # Alerts
    _m("qalloc_alerts_total", "counter", "alerts", "Alerts raised, by rule and severity.",
       (("rule", RULE), ("severity", SEVERITY)), "Alerts"),
    _m("qalloc_alerts_firing", "gauge", "alerts", "Alerts firing now, by rule and severity.",
       (("rule", RULE), ("severity", SEVERITY)), "Alerts", agg="max"),
    # Security events
    _m("qalloc_events_total", "counter", "events", "Security event records in, by source, format and outcome "
       "(stored, duplicate: stored before, rejected: refused with a per-record error).",
       (("source", EVENT_SOURCE), ("format", EVENT_FORMAT), ("outcome", EVENT_OUTCOME)), "Security events"),
    # Sinks (job transitions and audit changes forwarded from the change feed)
    _m("qalloc_sink_records_total", "counter", "records", "Job transitions and audit changes forwarded to a "
       "sink, by outcome (delivered; failed: an attempt to be retried; dead: refused for good and skipped).",
       (("sink", SINK), ("record", RECORD), ("outcome", FORWARD_OUTCOME)), "Sinks"),
    _m("qalloc_sink_lag_records", "gauge", "records", "Job transitions and audit changes a sink subscribes to "
       "that it has not received yet.", (("sink", SINK),), "Sinks", agg="max"),
    # The metrics themselves
    _m("qalloc_metrics_dropped_total", "counter", "recordings",
       "Recordings the facade dropped (a full buffer, a non-finite value, an error).",
       (("reason", DROP_REASON),), "Metrics"),
)

BY_NAME: Mapping[str, MetricDef] = MappingProxyType({m.name: m for m in METRICS})
INDEX: Mapping[str, int] = MappingProxyType({m.name: i for i, m in enumerate(METRICS)})
TAGS: Mapping[str, Mapping[str, Domain]] = MappingProxyType(
    {m.name: MappingProxyType(dict(m.tags)) for m in METRICS})   # metric -> tag key -> domain

_NAME = re.compile(r"qalloc_[a-z][a-z0-9_]*")
_LABEL = re.compile(r"[a-z][a-z0-9_]*")
_UNIT_SUFFIXES = ("seconds", "bytes", "ratio")


def check(metrics: tuple[MetricDef, ...] = METRICS) -> None:
    """Raise ValueError on a table that breaks the naming or bucket rules (run at import)."""
    seen: set[str] = set()
    for m in metrics:
        problems = []
        if not _NAME.fullmatch(m.name):
            problems.append("name must match qalloc_[a-z][a-z0-9_]*")
        if m.name in seen:
            problems.append("defined twice")
        if (m.kind == "counter") != m.name.endswith("_total"):
            problems.append("counters, and only counters, end in _total")
        if m.unit in _UNIT_SUFFIXES and not m.name.endswith("_" + m.unit):
            problems.append(f"a metric in {m.unit} ends in _{m.unit}")
        if m.kind == "histogram":
            b = m.boundaries
            if not b or b[0] <= 0 or any(x >= y for x, y in zip(b, b[1:])):
                problems.append("histogram boundaries must be positive and increasing")
        elif m.boundaries:
            problems.append("only histograms have boundaries")
        keys = m.tag_keys
        if len(set(keys)) != len(keys) or not all(_LABEL.fullmatch(k) for k in keys) or "le" in keys:
            problems.append("tag keys must be distinct lowercase labels, not 'le'")
        if problems:
            raise ValueError(f"metric {m.name}: " + "; ".join(problems))
        seen.add(m.name)


check()

__all__ = ["METRICS", "BY_NAME", "INDEX", "TAGS", "MetricDef", "RAY_PREFIX", "NONE", "OTHER", "check"]
