"""The calibration hub: the quantum monitor in a process of its own, so the allocator does not pay for it.

Why a separate actor: reading every QPU's calibration is a Ray call per device per period, and
a new 127-qubit calibration costs milliseconds to record (hundreds of series samples, the drift
detector, the per-qubit profile). At a 1 Hz refresh of 100 devices that was most of a core
*inside the allocator*, whose event loop must place jobs in microseconds (benchmarks.operations
measured 67 %). The hub does exactly what ``CalibrationWatch`` did — the same class, over a
small fleet of its own — and the allocator takes one **digest** per period: the devices whose
calibration changed (summary and ranked profile, computed here), the drift events, and the
per-device status. One Ray call per period, whatever the number of devices.

Order and durability are unchanged: the hub records a calibration in the series (decide and
commit) before the digest offers it, and the allocator applies it to placement after. The hub
is detached with ``max_restarts=-1``; a restarted hub rebuilds its detectors from the series
(``QuantumMonitor`` replays on first sight) and the allocator re-sends its device list.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import ray

from ray_qalloc.calwatch import CalibrationWatch, open_monitor
from ray_qalloc.config import Settings

log = logging.getLogger("ray_qalloc.calhub")

MAX_EVENTS = 1_000


def hub_name(settings: Settings) -> str:
    return f"{settings.allocator_name}-calhub"


def hub_options(settings: Settings) -> dict[str, Any]:
    return {"name": hub_name(settings), "namespace": settings.namespace, "lifetime": "detached",
            "get_if_exists": True, "max_restarts": -1, "max_task_retries": -1, "num_cpus": 0,
            "max_concurrency": 64}


# ---- the hub's own small fleet (what CalibrationWatch reads and writes) ------------------------
@dataclass
class _Spec:
    name: str
    kind: str = "qpu"


@dataclass
class _Member:
    """Takes a calibration the way a fleet member does, keeping what placement needs."""

    spec: _Spec
    version: int = 0
    calibration: dict[str, Any] | None = None
    calibration_taken_at: float | None = None
    qubits: Any = None
    on_new: Callable[["_Member"], None] | None = None

    def set_calibration(self, cal: Any) -> bool:
        from ray_qalloc.placement.model import QubitProfile

        taken_at = getattr(cal, "taken_at", None)
        if cal is None or (self.calibration is not None and taken_at == self.calibration_taken_at):
            return False
        self.calibration = cal.summary()
        self.calibration_taken_at = taken_at
        self.qubits = QubitProfile.of(cal)
        if self.on_new is not None:
            self.on_new(self)
        return True


@dataclass
class _Host:
    name: str
    actor: Any
    kind: str = "backend"
    members: list[str] = field(default_factory=list)


class _Fleet:
    def __init__(self) -> None:
        self.hosts: dict[str, _Host] = {}
        self.members: dict[str, _Member] = {}


class CalibrationHub:
    """Polls the QPUs it is told about; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fleet = _Fleet()
        self.version = 0
        self.changed: dict[str, int] = {}               # device -> version of its newest change
        self._events: collections.deque[tuple[int, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self._event_seq = 0
        self.watch_ = CalibrationWatch(self.fleet, open_monitor(settings), lambda names: None,
                                       timeout_s=max(settings.health_timeout_s, 10.0))
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._cpu0 = time.process_time()
        self._t0 = time.monotonic()

    # ---- what the allocator tells it ----------------------------------------------------------
    async def watch(self, devices: Mapping[str, Any]) -> int:
        """The QPUs to read (name -> its backend actor); the set replaces the last one."""
        for name in [n for n in self.fleet.hosts if n not in devices]:
            del self.fleet.hosts[name]
            self.fleet.members.pop(name, None)
            self.changed.pop(name, None)
        new = []
        for name, actor in devices.items():
            host = self.fleet.hosts.get(name)
            if host is None:
                self.fleet.hosts[name] = _Host(name, actor, members=[name])
                self.fleet.members[name] = _Member(_Spec(name), on_new=self._new)
                new.append(name)
            else:
                host.actor = actor
        if new:    # read at once: the caller's next digest has them (placement must not wait a period)
            await self.tick(new)
        self._ensure_loop()
        return len(self.fleet.hosts)

    async def configure(self, period_s: float, max_stale_periods: float) -> None:
        changed = float(period_s) != self.watch_.monitor.period_s
        self.watch_.monitor.period_s = float(period_s)
        self.watch_.monitor.max_stale_periods = float(max_stale_periods)
        if changed:
            self._wake.set()     # a shorter period takes effect now, not after the old one

    def _new(self, member: _Member) -> None:
        self.version += 1
        member.version = self.version
        self.changed[member.spec.name] = self.version

    # ---- the loop ----------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.watch_.period_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # never let the loop die
                log.exception("calibration round failed")

    async def tick(self, names: list[str] | None = None) -> list[Any]:
        """One round now (all devices, or ``names``); returns the drift events it raised."""
        events = await self.watch_.tick(names=names)
        for e in events:
            self._event_seq += 1
            self._events.append((self._event_seq, e))
        return events

    # ---- what the allocator reads ------------------------------------------------------------
    async def digest(self, since_version: int = 0, since_event: int = 0) -> dict[str, Any]:
        """What changed after ``since_version``, the events after ``since_event``, and every
        device's status (age, read age, staleness, alarms, last error)."""
        fleet = self.fleet
        changed = {name: {"taken_at": fleet.members[name].calibration_taken_at,
                          "summary": fleet.members[name].calibration, "profile": fleet.members[name].qubits}
                   for name, v in self.changed.items() if v > since_version and name in fleet.members}
        return {"version": self.version, "changed": changed,
                "events": [e for seq, e in self._events if seq > since_event], "event_seq": self._event_seq,
                "status": self.watch_.status(), "devices": sorted(fleet.hosts),
                "last_sampled": {n: self.watch_.monitor.last_sampled(n) for n in self.watch_.monitor.devices()}}

    async def views(self) -> dict[str, Any]:
        """Per device the current per-qubit snapshot and open alarms (the dashboard's heatmap)."""
        m = self.watch_.monitor
        out = {}
        for name in m.devices():
            try:
                out[name] = {"snapshot": m.current(name), "alarms": dict(m.alarms(name))}
            except Exception:  # not recorded yet
                continue
        return out

    async def stats(self) -> dict[str, Any]:
        """The hub's own cost: CPU seconds and wall seconds since it started, its rounds."""
        return {"cpu_s": time.process_time() - self._cpu0, "wall_s": time.monotonic() - self._t0,
                "rounds": self.watch_.rounds, "last_round_s": self.watch_.last_round_s,
                "devices": len(self.fleet.hosts), "pid": os.getpid()}

    async def watch_synthetic(self, n: int, seed: int = 0) -> int:
        """Load testing: ``n`` in-process emulated 127-qubit devices that publish a new
        calibration at every read (benchmarks.operations measures the monitor with these)."""
        devices = {f"qpu_syn{i:04d}": _Synthetic(seed + i) for i in range(n)}
        return await self.watch(devices)


class _Synthetic:
    """A device that answers like a backend actor (``.remote()`` returning an awaitable)."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.base = _base()
        self.rng = np.random.default_rng(seed)
        self.calibration = _Method(self._calibration)
        self.qubit_gate_errors = _Method(lambda: None)

    def _calibration(self) -> Any:
        import math
        from dataclasses import replace

        import numpy as np

        rng, base = self.rng, self.base

        def w(values: tuple[float, ...], sd: float) -> tuple[float, ...]:
            arr = np.asarray(values, dtype=float)
            return tuple((arr * np.exp(rng.normal(0.0, sd, arr.shape))).tolist())

        edges = {k: v * math.exp(rng.normal(0.0, 0.05)) for k, v in base.edge_error.items()}
        return replace(base, taken_at=time.time(), t1_s=w(base.t1_s, 0.05), t2_s=w(base.t2_s, 0.05),
                       readout_error=w(base.readout_error, 0.03), edge_error=edges)


_BASE: list[Any] = []


def _base() -> Any:
    if not _BASE:
        from ray_qalloc.backends.fake_qpu import FakeQPUBackend

        _BASE.append(FakeQPUBackend("fake_sherbrooke").calibration())
    return _BASE[0]


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return _done(self.fn(*args))


async def _done(value: Any) -> Any:
    return value


RemoteCalibrationHub = ray.remote(CalibrationHub)


class HubWatch:
    """The allocator's side: the CalibrationWatch surface, fed by the hub's digests."""

    def __init__(self, hub: Any, fleet: Any, on_change: Callable[[list[str]], None], *, period_s: float,
                 max_stale_periods: float, observer: Any = None) -> None:
        self.hub = hub
        self.fleet = fleet
        self.on_change = on_change
        self.observer = observer
        self.monitor = _MonitorView(self, period_s, max_stale_periods)
        self.version = 0
        self.event_seq = 0
        self.rounds = 0
        self._status: list[dict[str, Any]] = []
        self._last_sampled: dict[str, float | None] = {}
        self._views: dict[str, Any] = {}
        self._events: collections.deque[Any] = collections.deque(maxlen=MAX_EVENTS)
        self._devices: dict[str, Any] = {}

    @property
    def period_s(self) -> float:
        return self.monitor.period_s

    def _qpu_actors(self) -> dict[str, Any]:
        members = self.fleet.members
        return {h.name: h.actor for h in self.fleet.hosts.values()
                if h.kind == "backend" and h.actor is not None
                and any(n in members and members[n].spec.kind == "qpu" for n in h.members)}

    async def sync_devices(self) -> None:
        """Tell the hub the QPUs of the fleet when they changed (start, membership, restart)."""
        devices = self._qpu_actors()
        if set(devices) != set(self._devices) or any(devices[n] is not self._devices.get(n) for n in devices):
            await self.hub.watch.remote(devices)
            self._devices = devices

    async def pull(self) -> list[Any]:
        """Take one digest: changed calibrations into placement, events to the observer."""
        d = await self.hub.digest.remote(self.version, self.event_seq)
        if d["version"] < self.version or set(d["devices"]) != set(self._devices):
            # the hub restarted (it knows no devices, its versions start again): tell it the
            # devices again and take everything it has as new
            self._devices = {}
            await self.sync_devices()
            self.version, self.event_seq = 0, 0
            d = await self.hub.digest.remote(0, 0)
        changed: list[str] = []
        for device, c in d["changed"].items():
            host = self.fleet.hosts.get(device)
            for name in (host.members if host is not None else []):
                member = self.fleet.members.get(name)
                if member is not None and member.set_calibration_parts(c["taken_at"], c["summary"], c["profile"]):
                    changed.append(name)
        self.version = d["version"]
        self.event_seq = d["event_seq"]
        self._status = d["status"]
        self._last_sampled = d["last_sampled"]
        events = d["events"]
        self._events.extend(events)
        if self.observer is not None:
            for e in events:
                if e.kind in ("rise", "drop"):
                    self.observer.on_drift(e.device, e.key.label, e.factor, e.at)
        for e in events:
            log.warning("calibration drift on %s: %s", e.device, e.message)
        self.rounds += 1
        if changed:
            self.on_change(changed)
        return events

    async def run(self) -> None:
        try:
            await self.hub.configure.remote(self.monitor.period_s, self.monitor.max_stale_periods)
        except Exception:  # noqa: BLE001 - the hub is starting; a later change resends
            log.warning("could not configure the calibration hub")
        while True:
            try:
                await self.sync_devices()
                await self.pull()
            except Exception:  # the hub is restarting: the next period
                log.exception("calibration digest failed")
            await asyncio.sleep(self.period_s)

    async def tick(self, now: float | None = None, names: Any = None) -> list[Any]:
        await self.sync_devices()
        raised = await self.hub.tick.remote(None if names is None else list(names))
        await self.pull()
        return raised

    async def prefetch(self) -> None:
        """The per-qubit snapshots and alarms for a dashboard refresh (not in every digest)."""
        try:
            self._views = await asyncio.wait_for(self.hub.views.remote(), 10.0)
        except Exception:  # noqa: BLE001 - the page shows the table without heatmaps
            self._views = {}

    def events(self, since: float | None = None) -> list[Any]:
        return [e for e in self._events if since is None or e.at >= since]

    def status(self, now: float | None = None) -> list[dict[str, Any]]:
        return list(self._status)


class _MonitorView:
    """What the allocator's readers ask of ``calwatch.monitor``, answered from the digests."""

    def __init__(self, watch: HubWatch, period_s: float, max_stale_periods: float) -> None:
        self._watch = watch
        self._period_s = float(period_s)
        self._max_stale = float(max_stale_periods)

    def _configure(self) -> None:
        try:
            asyncio.get_running_loop().create_task(_call(self._watch.hub.configure.remote(self._period_s,
                                                                                          self._max_stale)))
        except RuntimeError:   # no loop (constructed outside the actor): sent at the first sync
            pass

    @property
    def period_s(self) -> float:
        return self._period_s

    @period_s.setter
    def period_s(self, value: float) -> None:
        self._period_s = float(value)
        self._configure()

    @property
    def max_stale_periods(self) -> float:
        return self._max_stale

    @max_stale_periods.setter
    def max_stale_periods(self, value: float) -> None:
        self._max_stale = float(value)
        self._configure()

    def last_sampled(self, name: str) -> float | None:
        if name not in self._watch._last_sampled:
            raise KeyError(name)
        return self._watch._last_sampled[name]

    def current(self, name: str) -> Any:
        return self._watch._views[name]["snapshot"]

    def alarms(self, name: str) -> Any:
        return self._watch._views[name]["alarms"]


async def _call(ref: Any) -> Any:
    try:
        return await ref
    except Exception:  # noqa: BLE001 - the hub is restarting; the next change resends
        log.warning("could not configure the calibration hub")

