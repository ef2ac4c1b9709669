"""``QuantumMonitor``: samples every QPU's calibration each period, keeps the series, watches for drift.

Why a separate object and not a method of each backend: detection compares a device with
its own history, which outlives any backend actor (a restarted actor forgets; the series
does not), and placement wants one place to ask "which devices are drifting or stale".
The monitor owns no thread and no Ray handle: ``tick(now)`` does one round, so tests drive
it with a simulated clock and the allocator's fleet calls it from whatever loop it has
(``start()`` gives a plain daemon thread for programs that have none).

One round, per device whose period has elapsed:

1. ``backend.calibration()`` (and per-qubit gate errors where the backend has them);
2. append to the ``CalibrationSeries`` (nothing new when ``taken_at`` did not move);
3. feed the ``DriftDetector`` with the same values; collect its events.

A device whose ``calibration()`` raises is kept, with the error remembered; it turns stale
when its last recorded calibration ages past ``max_stale_periods`` periods. On first sight
of a device the detector is rebuilt from the stored series (``replay_s`` of history), so a
restarted monitor keeps its baselines and open alarms.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ray_qalloc.backends.base import Backend, Calibration
from ray_qalloc.exceptions import ConfigError, UnknownBackend
from ray_qalloc.monitor.calseries import CalibrationSeries, SeriesKey, Snapshot, samples_from_calibration
from ray_qalloc.monitor.detect import DriftDetector, DriftEvent, DriftScore, Staleness, staleness

log = logging.getLogger(__name__)

DEFAULT_PERIOD_S = 900.0


@dataclass
class _Device:
    """What the monitor knows of one device between rounds."""

    name: str
    backend: Any
    next_due: float = -math.inf
    last_sampled: float | None = None       # monitor clock of the last successful sample
    last_taken_at: float | None = None      # the calibration's own time
    last_error: str | None = None
    current: Snapshot | None = None
    replayed: bool = False


@dataclass(frozen=True)
class RefreshTiming:
    """CPU and wall seconds of the last refresh of one device (calibration, store, detect)."""

    cpu_s: float
    wall_s: float
    calibration_s: float
    samples: int


def backend_name(backend: Any) -> str:
    return str(backend.spec().name)


def is_monitored(backend: Any) -> bool:
    """QPUs (real or emulated) have calibrations worth watching; simulators do not."""
    try:
        return backend.spec().kind == "qpu"
    except Exception:  # a backend that cannot say what it is: let calibration() decide
        return True


class QuantumMonitor:
    """Calibration series + drift detection + staleness over a set of QPU backends."""

    def __init__(self, backends: Mapping[str, Backend] | Iterable[Backend], series: CalibrationSeries,
                 detector: DriftDetector | None = None, period_s: float = DEFAULT_PERIOD_S,
                 clock: Callable[[], float] | None = None, *, max_stale_periods: float = 2.0,
                 replay_s: float = 7 * 86_400.0) -> None:
        if period_s <= 0:
            raise ConfigError(f"monitor period {period_s} s is not positive.", fix="use a period above 0 s.")
        self.series = series
        self.detector = detector or DriftDetector()
        self.period_s = float(period_s)
        self.clock = clock or time.time
        self.max_stale_periods = float(max_stale_periods)
        self.replay_s = float(replay_s)
        self._lock = threading.RLock()
        self._devices: dict[str, _Device] = {}
        self._timings: dict[str, RefreshTiming] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        items = backends.items() if isinstance(backends, Mapping) else ((backend_name(b), b) for b in backends)
        for name, backend in items:
            self.add(backend, name=name)

    # -- membership --------------------------------------------------------------------------

    def add(self, backend: Backend | None, *, name: str | None = None) -> None:
        """Watch ``backend`` (simulators are ignored: they have no calibration). ``backend=None``
        with a ``name`` watches a passive device: ``tick`` leaves it to whoever calls ``record``."""
        if backend is not None and not is_monitored(backend):
            return
        if name is None:
            if backend is None:
                raise ValueError("a passive device needs a name")
            name = backend_name(backend)
        with self._lock:
            self._devices[name] = _Device(name, backend)

    def remove(self, name: str) -> None:
        with self._lock:
            self._devices.pop(name, None)

    def devices(self) -> list[str]:
        with self._lock:
            return sorted(self._devices)

    # -- rounds ------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[DriftEvent]:
        """Sample every device whose period has elapsed at ``now``; returns the events raised."""
        now = self.clock() if now is None else float(now)
        events: list[DriftEvent] = []
        with self._lock:
            due = [d for d in self._devices.values() if d.next_due <= now]
            for device in due:
                events += self._refresh(device, now)
                device.next_due = now + self.period_s
        return events

    def refresh(self, name: str, now: float | None = None) -> list[DriftEvent]:
        """Sample one device now, whatever its schedule."""
        now = self.clock() if now is None else float(now)
        with self._lock:
            device = self._device(name)
            events = self._refresh(device, now)
            device.next_due = now + self.period_s
            return events

    def _refresh(self, device: _Device, now: float) -> list[DriftEvent]:
        if device.backend is None:   # passive: its owner fetches and calls record()
            return []
        wall0 = time.perf_counter()
        try:
            calibration: Calibration | None = device.backend.calibration()
            gate_errors = getattr(device.backend, "qubit_gate_errors", None)
            per_qubit = gate_errors() if callable(gate_errors) and calibration is not None else None
        except Exception as exc:  # a provider outage must not stop the other devices' rounds
            self._failed(device, exc)
            return []
        return self._record(device, calibration, per_qubit, now, time.perf_counter() - wall0)

    def record(self, name: str, calibration: Calibration | None,
               per_qubit: Mapping[str, tuple[float, ...]] | None = None, now: float | None = None) -> list[DriftEvent]:
        """Record a calibration fetched by someone else (the allocator reads its QPUs through
        their Ray actors, asynchronously); a device not watched yet is added as a passive one."""
        now = self.clock() if now is None else float(now)
        with self._lock:
            device = self._devices.get(name)
            if device is None:
                device = self._devices[name] = _Device(name, None)
            events = self._record(device, calibration, per_qubit, now, 0.0)
            device.next_due = now + self.period_s
            return events

    def record_failure(self, name: str, exc: BaseException) -> None:
        """A fetch by the owner of a passive device failed (kept; it turns stale in time)."""
        with self._lock:
            device = self._devices.get(name)
            if device is None:
                device = self._devices[name] = _Device(name, None)
            self._failed(device, exc)

    def _failed(self, device: _Device, exc: BaseException) -> None:
        device.last_error = f"{exc.__class__.__name__}: {exc}"
        log.warning("calibration of %s failed: %s", device.name, device.last_error)

    def _record(self, device: _Device, calibration: Calibration | None,
                per_qubit: Mapping[str, tuple[float, ...]] | None, now: float, cal_s: float) -> list[DriftEvent]:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if not device.replayed:
            self._replay(device, now)
        device.last_error = None
        device.last_sampled = now
        if calibration is None:
            return []
        at = float(calibration.taken_at)
        written = 0
        events: list[DriftEvent] = []
        if device.last_taken_at is None or at > device.last_taken_at:   # only new calibrations cost anything
            values = samples_from_calibration(calibration, per_qubit)
            written = self.series.append(device.name, at, values, now=now)
            events = self.detector.update(device.name, at, values)
            device.current = Snapshot(device.name, at, values)
            device.last_taken_at = at
        self._timings[device.name] = RefreshTiming(time.process_time() - cpu0, time.perf_counter() - wall0 + cal_s,
                                                   cal_s, written)
        return events

    def _replay(self, device: _Device, now: float) -> None:
        """Rebuild the detector (and ``current``) of a device from its stored history."""
        device.replayed = True
        if self.detector.last_at(device.name) is not None:
            return  # the detector already follows this device (shared with another monitor)
        history = self.series.history(device.name, since=now - self.replay_s)
        if history:
            self.detector.replay(device.name, history)
            at, values = history[-1]
            device.current = Snapshot(device.name, at, values)
            device.last_taken_at = at

    def _device(self, name: str) -> _Device:
        device = self._devices.get(name)
        if device is None:
            raise UnknownBackend(f"the quantum monitor does not watch {name!r}.",
                              fix=f"use one of: {', '.join(sorted(self._devices)) or 'none (add a QPU backend)'}.")
        return device

    # -- reading -----------------------------------------------------------------------------

    def current(self, name: str) -> Snapshot | None:
        """The device's newest calibration as recorded (from the series after a restart)."""
        with self._lock:
            device = self._device(name)
            if device.current is None:
                device.current = self.series.latest(name)
            return device.current

    def events(self, name: str | None = None, *, since: float | None = None) -> list[DriftEvent]:
        return self.detector.events(name, since=since)

    def alarms(self, name: str) -> dict[SeriesKey, DriftScore]:
        """The series of ``name`` that are in alarm now (what placement should avoid)."""
        return self.detector.alarms(name)

    def staleness(self, name: str, now: float | None = None) -> Staleness:
        now = self.clock() if now is None else float(now)
        with self._lock:
            device = self._device(name)
            last = device.last_taken_at if device.last_taken_at is not None else self.series.last_taken_at(name)
        return staleness(name, last, now, self.period_s, self.max_stale_periods)

    def stale(self, now: float | None = None) -> dict[str, Staleness]:
        """Devices whose calibration is older than ``max_stale_periods`` periods (or missing)."""
        now = self.clock() if now is None else float(now)
        out = {name: self.staleness(name, now) for name in self.devices()}
        return {name: s for name, s in out.items() if s.stale}

    def last_sampled(self, name: str) -> float | None:
        """When the device's calibration was last read successfully (monitor clock; None: never)."""
        with self._lock:
            return self._device(name).last_sampled

    def last_error(self, name: str) -> str | None:
        with self._lock:
            return self._device(name).last_error

    def timing(self, name: str) -> RefreshTiming | None:
        """How long the last refresh of ``name`` took (CPU and wall), for benchmarks and metrics."""
        return self._timings.get(name)

    # -- optional thread ---------------------------------------------------------------------

    def start(self) -> None:
        """Tick every period on a daemon thread (programs without a loop of their own)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:  # keep watching: one bad round must not end monitoring
                    log.exception("quantum monitor round failed")
                self._stop.wait(self.period_s)

        self._thread = threading.Thread(target=loop, name="qalloc-quantum-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
