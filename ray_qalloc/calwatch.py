"""The allocator's calibration loop: every QPU's calibration, read on a period, into placement.

Why a loop of its own and not the health probe: a calibration is a few hundred numbers per
device and changes on the provider's schedule (minutes to hours), a ping must answer in
milliseconds every couple of seconds. Reading calibration on each ping would make health
checks slow; reading it once at start (what the fleet did) let placement plan on a snapshot
that the device had long left behind.

One round, every ``monitor.calibration_period_s`` (the first at start-up):

1. each QPU backend actor is asked for its ``calibration()`` and per-qubit gate errors
   (bounded in time; a device that does not answer keeps its last values and turns stale);
2. the ``QuantumMonitor`` records them (the series in SQL, drift detection, staleness) —
   decide and commit before anything acts on it;
3. the fleet member takes the new values (summary, per-qubit profile, age), and when any
   member changed the queue is planned again, so queued jobs see the device as it is now
   (fidelity estimates, the coherence budget, freshness).

Drift events are kept for whoever reads them next (alerts, the dashboard, ``explain``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Any, Awaitable, Callable, Iterable

from ray_qalloc.config import Settings
from ray_qalloc.monitor.calseries import CalibrationSeries, Retention
from ray_qalloc.monitor.detect import DriftEvent, Staleness
from ray_qalloc.monitor.quantum import QuantumMonitor

log = logging.getLogger("ray_qalloc.calwatch")

MAX_EVENTS = 1_000
"""Drift events kept in memory for readers (the series keeps every sample)."""

Offload = Callable[..., Awaitable[Any]]


def series_url(settings: Settings) -> str:
    from ray_qalloc.monitor.cli import default_series_url

    return settings.monitor.series_url or default_series_url(settings.data_dir)


def open_monitor(settings: Settings, clock: Callable[[], float] = time.time) -> QuantumMonitor:
    """The allocator's monitor over its configured series (devices are added as they answer)."""
    m = settings.monitor
    series = CalibrationSeries(series_url(settings), retention=Retention(max_age_s=m.retention_s))
    return QuantumMonitor({}, series, period_s=m.calibration_period_s, clock=clock,
                          max_stale_periods=m.max_stale_periods)


async def _inline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


class CalibrationWatch:
    """Reads QPU calibrations through the fleet's actors; see the module docstring."""

    def __init__(self, fleet: Any, monitor: QuantumMonitor, on_change: Callable[[list[str]], None], *,
                 timeout_s: float = 30.0, offload: Offload | None = None,
                 clock: Callable[[], float] = time.time, observer: Any = None) -> None:
        self.fleet = fleet
        self.monitor = monitor
        self.on_change = on_change
        self.timeout_s = float(timeout_s)
        self.offload: Offload = offload or _inline
        self.clock = clock
        self.observer = observer
        self.rounds = 0
        self.last_round_s = 0.0
        self._events: collections.deque[DriftEvent] = collections.deque(maxlen=MAX_EVENTS)

    @property
    def period_s(self) -> float:
        return self.monitor.period_s

    def _qpu_hosts(self) -> list[Any]:
        members = self.fleet.members
        return [h for h in self.fleet.hosts.values()
                if h.kind == "backend" and h.actor is not None
                and any(n in members and members[n].spec.kind == "qpu" for n in h.members)]

    async def tick(self, now: float | None = None, names: Iterable[str] | None = None) -> list[DriftEvent]:
        """One round over every QPU (or the ``names`` given); returns the drift events it raised."""
        now = self.clock() if now is None else float(now)
        wanted = set(names) if names is not None else None
        hosts = [h for h in self._qpu_hosts() if wanted is None or h.name in wanted]
        t0 = time.perf_counter()
        fetched = await asyncio.gather(*(self._fetch(h) for h in hosts))
        events: list[DriftEvent] = []
        changed: list[str] = []
        for host, (cal, per_qubit, error) in zip(hosts, fetched):
            if error is not None:
                self.monitor.record_failure(host.name, error)
                continue
            try:
                events += await self.offload(self.monitor.record, host.name, cal, per_qubit, now)
            except Exception:  # the series' database is down: placement still takes the values
                log.exception("recording the calibration of %s failed", host.name)
            if cal is None:
                continue
            for name in host.members:
                member = self.fleet.members.get(name)
                if member is not None and member.set_calibration(cal):
                    changed.append(name)
            _record_metrics(host.name, cal)
        self._events.extend(events)
        if self.observer is not None:
            for e in events:
                if e.kind in ("rise", "drop"):
                    self.observer.on_drift(e.device, e.key.label, e.factor, e.at)
        self.rounds += 1
        self.last_round_s = time.perf_counter() - t0
        for e in events:
            log.warning("calibration drift on %s: %s", e.device, e.message)
        if changed:
            self.on_change(changed)
        return events

    async def _fetch(self, host: Any) -> tuple[Any, Any, BaseException | None]:
        """(calibration, per-qubit gate errors, error); calibration None: nothing new since the
        member's (a successful read all the same)."""
        known = self._known_taken_at(host)
        newer = getattr(host.actor, "calibration_if_newer", None)
        try:
            if newer is not None and known is not None:
                cal = await asyncio.wait_for(_aref(newer.remote(known)), self.timeout_s)
                if cal is None:
                    return None, None, None
            else:
                cal = await asyncio.wait_for(_aref(host.actor.calibration.remote()), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a device that does not answer keeps its last values
            return None, None, exc
        try:
            per_qubit = await asyncio.wait_for(_aref(host.actor.qubit_gate_errors.remote()), self.timeout_s)
        except Exception:  # noqa: BLE001 - an executor without per-qubit errors (older actor, a fake)
            per_qubit = None
        return cal, per_qubit, None

    def _known_taken_at(self, host: Any) -> float | None:
        """The calibration time placement already has for this host, once the series has it too."""
        times = [self.fleet.members[n].calibration_taken_at for n in host.members if n in self.fleet.members]
        known = min((t for t in times if t is not None), default=None)
        try:
            recorded = self.monitor.current(host.name)
        except Exception:  # not watched yet: fetch it whole
            return None
        if recorded is None or known is None or recorded.taken_at < known:
            return None
        return known

    async def run(self) -> None:
        """Tick forever on the monitor's period (the allocator's task), the first round at once
        (the fleet's first probe gave placement a calibration; this records it in the series)."""
        while True:
            try:
                await self.tick()
            except Exception:  # never let the loop die
                log.exception("calibration round failed")
            await asyncio.sleep(self.period_s)

    # ---- reading ---------------------------------------------------------------------------
    def events(self, since: float | None = None) -> list[DriftEvent]:
        return [e for e in self._events if since is None or e.at >= since]

    def stale(self, now: float | None = None) -> dict[str, Staleness]:
        return self.monitor.stale(now)

    def status(self, now: float | None = None) -> list[dict[str, Any]]:
        """Per device: how old its calibration is (the provider's time), when we last read it,
        whether reading has gone stale (no successful read for ``max_stale_periods`` periods:
        placement is planning on old numbers), the series in drift alarm, the last error.

        A provider that publishes once a day is not stale because its numbers are a day old;
        a monitor that cannot read it for three periods is."""
        now = self.clock() if now is None else float(now)
        limit = self.monitor.max_stale_periods * self.monitor.period_s
        out = []
        for name in self.monitor.devices():
            cal = self.monitor.staleness(name, now)
            read = self.monitor.last_sampled(name)
            read_age = None if read is None else max(now - read, 0.0)
            out.append({"device": name, "age_s": cal.age_s if math.isfinite(cal.age_s) else None,
                        "read_age_s": read_age, "stale": read_age is None or read_age > limit,
                        "alarms": sorted(k.label for k in self.monitor.alarms(name)),
                        "error": self.monitor.last_error(name)})
        return out


def _record_metrics(device: str, cal: Any) -> None:
    """Per-qubit T1, T2 and readout error as gauges (the dashboard's calibration panel)."""
    from ray_qalloc.metrics import metrics

    n = len(cal.t1_s)
    for quantity, values in (("t1_seconds", cal.t1_s), ("t2_seconds", cal.t2_s), ("readout_error", cal.readout_error)):
        for q, v in enumerate(values):
            if v is not None and v == v:
                metrics.calibration(device, q, quantity, float(v), n_qubits=n)


async def _aref(ref: Any) -> Any:
    return await ref
