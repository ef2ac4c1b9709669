"""``Metrics``: the typed calls the dispatcher, fleet, monitors and API make to record metrics.

Why a facade and not ``ray.util.metrics`` objects scattered through the code:

* **Bounded tags in one place.** Every value goes through its tag's domain (``table.py``,
  ``tags.py``) and folds to ``"other"`` when it falls outside, so no caller can create an
  unbounded series by passing a job id or a raw path.
* **Cheap on the hot path.** A call folds its tags, then adds to an in-process buffer under a
  lock (about a microsecond; ``tests/test_metrics.py`` measures it). A daemon thread hands the
  buffer to Ray every ``flush_s`` (1 s): counters are summed first, so a thousand decisions
  become one ``Counter.inc``. Ray's own record call costs 2.5–3.5 µs and Ray exports only every
  ``metrics_report_interval_ms`` (10 s by default) anyway, so the second of delay is invisible.
* **Gauges that stay visible.** Ray 2.60's metrics agent evicts a gauge series that was not set
  again within two report intervals (measured: a gauge set once in an actor vanished from the
  scrape after ~2 intervals). A queue depth that stays 5 for a minute must read 5, so the
  facade keeps the last value of every gauge series and sets it again every half interval,
  until :meth:`Metrics.forget` drops it (a removed pool) or the process ends (then it ages out).
* **Never in the way.** Disabled by a flag (``QALLOC_METRICS__ENABLED=0`` or
  ``Metrics(enabled=False)``), or while Ray is not initialised, a call returns after one or two
  checks and buffers nothing. A recording that raises (a bad value from a caller) is counted in
  ``qalloc_metrics_dropped_total`` and never reaches the caller: metrics must not fail a job.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

from ray_qalloc.metrics import table as T
from ray_qalloc.metrics.tags import Domain, Index, code_class

log = logging.getLogger("ray_qalloc.metrics")

ENABLED_ENV = "QALLOC_METRICS__ENABLED"
"""``0``/``false``/``no``/``off`` turns recording off (the path a ``Settings.metrics.enabled`` field
would take through the config tree's ``QALLOC_<section>__<field>`` overrides)."""

MAX_PENDING_OBSERVATIONS = 100_000
"""Histogram observations buffered between flushes; past this they are dropped and counted."""

BREAKER_STATES = {"closed": 0.0, "half-open": 1.0, "half_open": 1.0, "open": 2.0}
"""The fleet's breaker states (``Member.breaker``) as the gauge's values."""

_DEFAULT_REPORT_INTERVAL_S = 10.0

_Key = tuple[int, tuple[str, ...]]
_F = TypeVar("_F", bound=Callable[..., None])

_I = T.INDEX
_QUEUE_DEPTH, _QUEUE_WAIT, _FINISHED = _I["qalloc_queue_depth"], _I["qalloc_queue_wait_seconds"], \
    _I["qalloc_jobs_finished_total"]
_DECISIONS, _PRED_ERR = _I["qalloc_decisions_total"], _I["qalloc_prediction_error_log_ratio"]
_RUN, _ATTEMPT_FAIL = _I["qalloc_run_seconds"], _I["qalloc_attempt_failures_total"]
_BREAKER, _HEALTHY = _I["qalloc_breaker_state"], _I["qalloc_backend_healthy"]
_PENDING, _OPERATIONAL = _I["qalloc_provider_pending_jobs"], _I["qalloc_provider_operational"]
_DRIFT, _CALIBRATION = _I["qalloc_drift_score"], _I["qalloc_calibration_value"]
_API_REQ, _API_SEC = _I["qalloc_api_requests_total"], _I["qalloc_api_request_seconds"]
_NODE_CPU, _NODE_MEM_USED, _NODE_MEM_TOTAL, _NODE_GPU = (
    _I["qalloc_node_cpu_utilization_ratio"], _I["qalloc_node_memory_used_bytes"],
    _I["qalloc_node_memory_total_bytes"], _I["qalloc_node_gpu_utilization_ratio"])
_NODE_GPU_MEM_USED, _NODE_GPU_MEM_TOTAL = (_I["qalloc_node_gpu_memory_used_bytes"],
                                          _I["qalloc_node_gpu_memory_total_bytes"])
_ALERTS, _ALERTS_FIRING = _I["qalloc_alerts_total"], _I["qalloc_alerts_firing"]
_DROPPED = _I["qalloc_metrics_dropped_total"]
_SINK_RECORDS, _SINK_LAG = _I["qalloc_sink_records_total"], _I["qalloc_sink_lag_records"]
_EVENTS = _I["qalloc_events_total"]

# The domains the calls fold with, read once from the table (so the table stays the authority).
_D = T.TAGS
_PRIORITY, _POOL = _D["qalloc_queue_depth"]["priority"], _D["qalloc_queue_depth"]["pool"]
_BACKEND, _METHOD = _D["qalloc_run_seconds"]["backend"], _D["qalloc_run_seconds"]["method"]
_STATE = _D["qalloc_jobs_finished_total"]["state"]
_DECISION_OUTCOME = _D["qalloc_decisions_total"]["outcome"]
_ATTEMPT_OUTCOME = _D["qalloc_attempt_failures_total"]["outcome"]
_DEVICE = _D["qalloc_calibration_value"]["device"]
_QUBIT = _D["qalloc_calibration_value"]["qubit"]
_QUANTITY = _D["qalloc_calibration_value"]["quantity"]
_ROUTE, _CODE = _D["qalloc_api_requests_total"]["route"], _D["qalloc_api_requests_total"]["code"]
_NODE, _GPU = _D["qalloc_node_gpu_utilization_ratio"]["node"], _D["qalloc_node_gpu_utilization_ratio"]["gpu"]
_RULE, _SEVERITY = _D["qalloc_alerts_total"]["rule"], _D["qalloc_alerts_total"]["severity"]
_EVENT_SOURCE, _EVENT_FORMAT, _EVENT_OUTCOME = (_D["qalloc_events_total"]["source"],
                                            _D["qalloc_events_total"]["format"], _D["qalloc_events_total"]["outcome"])
_SINK, _RECORD, _FORWARD_OUTCOME = (_D["qalloc_sink_records_total"]["sink"], _D["qalloc_sink_records_total"]["record"],
                                   _D["qalloc_sink_records_total"]["outcome"])
assert isinstance(_QUBIT, Index) and isinstance(_GPU, Index)

# One Ray metric object per name and process, shared by every Metrics instance.
_RAY_INSTRUMENTS: dict[int, Any] = {}
_RAY_LOCK = threading.Lock()
_INSTANCES: "weakref.WeakSet[Metrics]" = weakref.WeakSet()


class Sample(NamedTuple):
    """One buffered recording, as :meth:`Metrics.pending` shows it."""

    kind: str
    name: str
    tags: dict[str, str]
    value: float


def _ray_up() -> bool:
    """Ray is initialised in this process (without importing Ray where nobody has)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _env_enabled() -> bool:
    return os.environ.get(ENABLED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _report_interval_s() -> float:
    """Ray's export cadence in this process: ``max(metrics_report_interval_ms, 1000)``."""
    try:
        import ray

        return max(float(ray._config.metrics_report_interval_ms()), 1000.0) / 1000.0
    except Exception:  # noqa: BLE001 - an older or newer Ray: assume its documented default
        return _DEFAULT_REPORT_INTERVAL_S


def _recording(fn: _F) -> _F:
    """The guard every recording call shares: off → return at once; an error → counted, swallowed."""

    @functools.wraps(fn)
    def wrapper(self: "Metrics", *args: Any, **kwargs: Any) -> None:
        if not self._enabled or (self._require_ray and not _ray_up()):
            return
        try:
            fn(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - metrics must never fail the caller's work
            self._drop("error")
            if not self._warned:
                self._warned = True
                log.warning("metrics: %s failed; further failures are only counted", fn.__name__, exc_info=True)

    return wrapper  # type: ignore[return-value]


class Metrics:
    """Records ray-qalloc's metrics (see ``table.METRICS`` for names, tags and buckets).

    One instance per process is the norm (``ray_qalloc.metrics.metrics``). ``flush_s=None``
    starts no thread (call :meth:`flush`); ``require_ray=False`` buffers even without Ray (what
    the unit tests use to look at folded tags with :meth:`pending`).
    """

    def __init__(self, *, enabled: bool | None = None, flush_s: float | None = 1.0,
                 require_ray: bool = True) -> None:
        self._enabled = _env_enabled() if enabled is None else bool(enabled)
        self._flush_s = flush_s
        self._require_ray = require_ray
        self._warned = False
        self._init_state()
        _INSTANCES.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[_Key, float] = {}
        self._observations: list[tuple[_Key, float]] = []
        self._gauges: dict[_Key, float] = {}
        self._dirty: set[_Key] = set()
        self._pushed: dict[_Key, float] = {}
        self._tag_dicts: dict[_Key, dict[str, str]] = {}
        self._refresh_s: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __reduce__(self) -> tuple[Any, ...]:
        # Buffers and threads stay in their process; a copy elsewhere starts empty.
        return (_rebuild, (self._enabled, self._flush_s, self._require_ray))

    # ---- switches ----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        """Turn recording on or off at run time; off also discards what is buffered."""
        self._enabled = bool(enabled)
        if not enabled:
            with self._lock:
                self._counts.clear()
                self._observations.clear()
                self._gauges.clear()
                self._dirty.clear()

    # ---- queue -------------------------------------------------------------------------------
    @_recording
    def queued(self, cls: str, pool: str | None, n: int) -> None:
        """Jobs of class ``cls`` waiting now for ``pool`` (None: not placed yet)."""
        self._set(_QUEUE_DEPTH, (_PRIORITY.fold(cls), _POOL.fold(pool)), float(n))

    @_recording
    def waited(self, cls: str, backend: str, seconds: float) -> None:
        """A job of class ``cls`` started on ``backend`` after waiting ``seconds`` since acceptance."""
        if _nonneg(seconds):
            self._observe(_QUEUE_WAIT, (_PRIORITY.fold(cls), _BACKEND.fold(backend)), seconds)
        else:
            self._drop("bad_value")

    @_recording
    def finished(self, cls: str, state: str) -> None:
        """A job reached a terminal state (``completed``, ``failed``, ``cancelled``)."""
        self._add(_FINISHED, (_PRIORITY.fold(cls), _STATE.fold(state)), 1.0)

    # ---- placement ---------------------------------------------------------------------------
    @_recording
    def decision(self, outcome: str, n: int = 1) -> None:
        """``n`` placement decisions that ended in ``outcome`` (placed, held, failover, ...)."""
        if n > 0:
            self._add(_DECISIONS, (_DECISION_OUTCOME.fold(outcome),), float(n))

    @_recording
    def prediction_error(self, backend: str, log_ratio: float, method: str | None = None) -> None:
        """``log_ratio = ln(actual / predicted)`` of a completed run: its size goes to the
        histogram, its sign to the ``direction`` tag (Ray's buckets must be positive)."""
        if not math.isfinite(log_ratio):
            self._drop("bad_value")
            return
        direction = "over" if log_ratio > 0 else "under"
        self._observe(_PRED_ERR, (_BACKEND.fold(backend), _METHOD.fold(method), direction), abs(log_ratio))

    # ---- runs --------------------------------------------------------------------------------
    @_recording
    def ran(self, backend: str, method: str | None, seconds: float) -> None:
        """A run on ``backend`` (a pool, a candidate name or a QPU) with ``method`` took ``seconds``."""
        if _nonneg(seconds):
            self._observe(_RUN, (_BACKEND.fold(backend), _METHOD.fold(method)), seconds)
        else:
            self._drop("bad_value")

    @_recording
    def attempt_failed(self, backend: str, outcome: str) -> None:
        """An attempt on ``backend`` ended without a result (actor_died, timed_out, ...)."""
        self._add(_ATTEMPT_FAIL, (_BACKEND.fold(backend), _ATTEMPT_OUTCOME.fold(outcome)), 1.0)

    # ---- backends ----------------------------------------------------------------------------
    @_recording
    def breaker(self, backend: str, state: str | float) -> None:
        """The circuit breaker of ``backend``: ``closed``/``half-open``/``open`` (or 0/1/2)."""
        value = BREAKER_STATES.get(state) if isinstance(state, str) else float(state)
        if value is None or value not in (0.0, 1.0, 2.0):
            self._drop("bad_value")
            return
        self._set(_BREAKER, (_BACKEND.fold(backend),), value)

    @_recording
    def health(self, backend: str, up: bool) -> None:
        """Whether ``backend`` answers its health probe."""
        self._set(_HEALTHY, (_BACKEND.fold(backend),), 1.0 if up else 0.0)

    @_recording
    def provider_queue(self, backend: str, pending_jobs: int, operational: bool) -> None:
        """A QPU provider's word on ``backend``: jobs of others ahead, and in service or not."""
        tags = (_BACKEND.fold(backend),)
        self._set_finite(_PENDING, tags, float(pending_jobs))
        self._set(_OPERATIONAL, tags, 1.0 if operational else 0.0)

    # ---- calibration -------------------------------------------------------------------------
    @_recording
    def drift(self, device: str, score: float) -> None:
        """The calibration drift score of a QPU."""
        self._set_finite(_DRIFT, (_DEVICE.fold(device),), score)

    @_recording
    def calibration(self, device: str, qubit: int, quantity: str, value: float, *,
                    n_qubits: int | None = None) -> None:
        """One calibration value of one qubit. ``n_qubits`` (the device's size) bounds the qubit
        tag; without it only the hard cap (``QUBIT.cap``) does."""
        self._set_finite(_CALIBRATION, (_DEVICE.fold(device), _QUBIT.fold(qubit, n_qubits),
                                        _QUANTITY.fold(quantity)), value)

    # ---- API ---------------------------------------------------------------------------------
    @_recording
    def api_request(self, route: str | None, code: int, seconds: float | None = None) -> None:
        """One HTTP request. ``route`` must be the matched route's *template*
        (``request.scope["route"].path``, e.g. ``/v1/jobs/{job_id}``), None when none matched."""
        r = _ROUTE.fold(route)
        self._add(_API_REQ, (r, _CODE.fold(code_class(code))), 1.0)
        if seconds is not None:
            if _nonneg(seconds):
                self._observe(_API_SEC, (r,), seconds)
            else:
                self._drop("bad_value")

    # ---- nodes -------------------------------------------------------------------------------
    @_recording
    def node(self, node: str, *, cpu_ratio: float | None = None, memory_used_bytes: float | None = None,
             memory_total_bytes: float | None = None) -> None:
        """A node's CPU utilisation (0..1) and memory, from the classical monitor."""
        tags = (_NODE.fold(node),)
        for idx, value in ((_NODE_CPU, cpu_ratio), (_NODE_MEM_USED, memory_used_bytes),
                           (_NODE_MEM_TOTAL, memory_total_bytes)):
            if value is not None:
                self._set_finite(idx, tags, value)

    @_recording
    def gpu(self, node: str, gpu: int, utilization_ratio: float) -> None:
        """Utilisation (0..1) of GPU ``gpu`` of ``node``."""
        self._set_finite(_NODE_GPU, (_NODE.fold(node), _GPU.fold(gpu)), utilization_ratio)

    @_recording
    def gpu_memory(self, node: str, gpu: int, *, used_bytes: float, total_bytes: float) -> None:
        """Memory in use and in all of GPU ``gpu`` of ``node`` (NVML: other processes' too)."""
        tags = (_NODE.fold(node), _GPU.fold(gpu))
        self._set_finite(_NODE_GPU_MEM_USED, tags, used_bytes)
        self._set_finite(_NODE_GPU_MEM_TOTAL, tags, total_bytes)

    # ---- alerts ------------------------------------------------------------------------------
    @_recording
    def alert(self, rule: str, severity: str) -> None:
        """An alert was raised by ``rule``."""
        self._add(_ALERTS, (_RULE.fold(rule), _SEVERITY.fold(severity)), 1.0)

    @_recording
    def alerts_firing(self, rule: str, severity: str, n: int) -> None:
        """How many alerts of ``rule`` fire now."""
        self._set(_ALERTS_FIRING, (_RULE.fold(rule), _SEVERITY.fold(severity)), float(n))

    # ---- security events ---------------------------------------------------------------------
    @_recording
    def events_in(self, source: str, fmt: str | None, outcome: str, n: int = 1) -> None:
        """``n`` security event records from ``source`` (http, syslog_tcp, syslog_udp) in format
        ``fmt`` (None: not recognised) ended as ``outcome`` (stored, duplicate, rejected)."""
        if n > 0:
            self._add(_EVENTS, (_EVENT_SOURCE.fold(source), _EVENT_FORMAT.fold(fmt), _EVENT_OUTCOME.fold(outcome)),
                      float(n))

    # ---- sinks (forwarded records) -------------------------------------------------------------
    @_recording
    def sink_records(self, sink: str, record: str, outcome: str, n: int = 1) -> None:
        """``n`` records of kind ``record`` (jobs, audit) forwarded to ``sink`` ended as ``outcome``
        (delivered, failed, dead)."""
        if n > 0:
            self._add(_SINK_RECORDS, (_SINK.fold(sink), _RECORD.fold(record), _FORWARD_OUTCOME.fold(outcome)),
                      float(n))

    @_recording
    def sink_lag(self, sink: str, records: int) -> None:
        """How many subscribed records ``sink`` has not received yet."""
        self._set(_SINK_LAG, (_SINK.fold(sink),), float(records))

    # ---- gauge series lifetime ---------------------------------------------------------------
    def forget(self, **tags: str) -> int:
        """Stop re-setting the gauge series whose tags match all of ``tags`` (say
        ``forget(backend="cpu-1a2b3c4d")`` when a pool is gone): Ray then lets them age out.
        Values are folded by each metric's own domain. Returns how many series were dropped."""
        with self._lock:
            gone = [key for key in self._gauges if _matches(key, tags)]
            for key in gone:
                del self._gauges[key]
                self._dirty.discard(key)
                self._pushed.pop(key, None)
        return len(gone)

    # ---- buffer ------------------------------------------------------------------------------
    def _add(self, idx: int, tags: tuple[str, ...], value: float) -> None:
        key = (idx, tags)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + value
        if self._thread is None:
            self._start()

    def _set(self, idx: int, tags: tuple[str, ...], value: float) -> None:
        key = (idx, tags)
        with self._lock:
            self._gauges[key] = value
            self._dirty.add(key)
        if self._thread is None:
            self._start()

    def _set_finite(self, idx: int, tags: tuple[str, ...], value: float) -> None:
        if math.isfinite(value):
            self._set(idx, tags, float(value))
        else:
            self._drop("bad_value")

    def _observe(self, idx: int, tags: tuple[str, ...], value: float) -> None:
        with self._lock:
            full = len(self._observations) >= MAX_PENDING_OBSERVATIONS
            if not full:
                self._observations.append(((idx, tags), float(value)))
        if full:
            self._drop("overflow")
        elif self._thread is None:
            self._start()

    def _drop(self, reason: str) -> None:
        key = (_DROPPED, (reason,))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + 1.0

    def pending(self) -> list[Sample]:
        """What the next flush would hand to Ray: summed counters, single observations, and the
        kept value of every gauge series (whether or not it is due for a refresh)."""
        with self._lock:
            counts, obs, gauges = dict(self._counts), list(self._observations), dict(self._gauges)
        out = [Sample("counter", T.METRICS[i].name, self._tags(i, t), v) for (i, t), v in counts.items()]
        out += [Sample("histogram", T.METRICS[i].name, self._tags(i, t), v) for (i, t), v in obs]
        out += [Sample("gauge", T.METRICS[i].name, self._tags(i, t), v) for (i, t), v in gauges.items()]
        return out

    def flush(self) -> int:
        """Hand what is buffered to Ray now (the thread does this every ``flush_s``); return how
        many Ray record calls were made. Without Ray (or disabled) the buffer is discarded."""
        now = time.monotonic()
        refresh = self._refresh_interval()
        with self._lock:
            counts, self._counts = self._counts, {}
            obs, self._observations = self._observations, []
            due = [(k, v) for k, v in self._gauges.items()
                   if k in self._dirty or now - self._pushed.get(k, -math.inf) >= refresh]
            self._dirty.clear()
            for k, _ in due:
                self._pushed[k] = now
        if not self._enabled or not _ray_up():
            return 0
        calls = 0
        for (idx, tags), value in counts.items():
            _instrument(idx).inc(value, self._tags(idx, tags))
            calls += 1
        for (idx, tags), value in obs:
            _instrument(idx).observe(value, self._tags(idx, tags))
            calls += 1
        for (idx, tags), value in due:
            _instrument(idx).set(value, self._tags(idx, tags))
            calls += 1
        return calls

    def _tags(self, idx: int, tags: tuple[str, ...]) -> dict[str, str]:
        key = (idx, tags)
        d = self._tag_dicts.get(key)
        if d is None:   # bounded: keys are folded tag values
            d = self._tag_dicts[key] = dict(zip(T.METRICS[idx].tag_keys, tags))
        return d

    def _refresh_interval(self) -> float:
        """Re-set a gauge every half export interval, so each of Ray's exports carries it."""
        if self._refresh_s is None:
            if not _ray_up():
                return _DEFAULT_REPORT_INTERVAL_S / 2
            self._refresh_s = _report_interval_s() / 2
        return self._refresh_s

    # ---- the flushing thread -----------------------------------------------------------------
    def _start(self) -> None:
        if self._flush_s is None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="qalloc-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._flush_s is not None
        while not self._stop.wait(self._flush_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the next round may work
                log.debug("metrics flush failed", exc_info=True)

    def close(self) -> None:
        """Flush once more and stop the thread (a restart of recording starts a new one)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        try:
            self.flush()
        finally:
            self._stop = threading.Event()


def _nonneg(seconds: float) -> bool:
    return 0.0 <= seconds < math.inf


def _matches(key: _Key, tags: dict[str, str]) -> bool:
    idx, values = key
    domains: dict[str, Domain] = dict(T.METRICS[idx].tags)
    for k, v in tags.items():
        domain = domains.get(k)
        if domain is None:
            return False
        pos = T.METRICS[idx].tag_keys.index(k)
        if values[pos] != domain.fold(v):
            return False
    return True


def _instrument(idx: int) -> Any:
    inst = _RAY_INSTRUMENTS.get(idx)
    if inst is None:
        with _RAY_LOCK:
            inst = _RAY_INSTRUMENTS.get(idx)
            if inst is None:
                inst = _RAY_INSTRUMENTS[idx] = _make_instrument(T.METRICS[idx])
    return inst


def _make_instrument(d: T.MetricDef) -> Any:
    from ray.util import metrics as ray_metrics

    if d.kind == "counter":
        return ray_metrics.Counter(d.name, d.description, tag_keys=d.tag_keys)
    if d.kind == "gauge":
        return ray_metrics.Gauge(d.name, d.description, tag_keys=d.tag_keys)
    return ray_metrics.Histogram(d.name, d.description, boundaries=list(d.boundaries), tag_keys=d.tag_keys)


def _rebuild(enabled: bool, flush_s: float | None, require_ray: bool) -> Metrics:
    return Metrics(enabled=enabled, flush_s=flush_s, require_ray=require_ray)


def _instances() -> Iterator[Metrics]:
    return iter(list(_INSTANCES))


def _after_fork_in_child() -> None:
    # The parent's thread and lock did not come along: start afresh, keep nothing buffered.
    for m in _instances():
        m._init_state()


def _flush_at_exit() -> None:
    for m in _instances():
        try:
            m.flush()
        except Exception:  # noqa: BLE001 - Ray may already be going down
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_at_exit)
