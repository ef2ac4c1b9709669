"""The allocator's operators' side: drain and resume, live configuration, maintenance
(cordon, drain, windows), the audit trail, and the operators' views (dashboard, alerts,
calibration status).

Why a mixin of its own: these are one concern — what an operator asks of the running
allocator, each change committed to the audited admin state before it applies — reached
through the same allocator actor (one Ray actor, one event loop, one store thread) as the job
path that ``allocator.py`` holds, but apart from it. The HTTP side is ``api_admin.py``. The
methods use the allocator's parts (``self.d``, ``self.live``, ``self.maint``, ``self.admin``,
``self.alerts``, ``self.calwatch``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine

from pydantic import ValidationError

from ray_qalloc.exceptions import QAllocError
from ray_qalloc.maintenance import MaintenanceWindow

if TYPE_CHECKING:
    from ray_qalloc.adminstate import AdminState
    from ray_qalloc.dispatch import Dispatcher
    from ray_qalloc.liveconfig import LiveConfig
    from ray_qalloc.maintenance import MaintenanceDesk


class OperatorOps:
    """Mixed into ``Allocator``."""

    d: Dispatcher
    live: LiveConfig
    maint: MaintenanceDesk
    admin: AdminState
    alerts: Any                   # alerts.service.AlertService, when alerts are enabled (live config swaps it)
    calwatch: Any                 # calwatch.CalibrationWatch or calhub.HubWatch
    _kick: asyncio.Event
    _wait_ready: Callable[[], Coroutine[Any, Any, None]]   # Allocator's: waits until the allocator serves

    async def drain_all(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Graceful shutdown, step one: start no new runs, wait up to ``timeout_s`` for the
        running ones to finish. Queued (and newly submitted) jobs stay in the store; the next
        allocator to start, or ``resume()``, runs them."""
        await self._wait_ready()
        self.d.draining = True
        deadline = time.monotonic() + timeout_s
        while self.d.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"running": len(self.d.running), "queued": len(self.d.queued)}

    async def resume(self) -> None:
        self.d.draining = False
        self._kick.set()

    # ---- live configuration (liveconfig.py) ----------------------------------------------------
    async def config(self) -> dict[str, Any]:
        """The settings in force, what was changed live, and which keys may change."""
        await self._wait_ready()
        return self.live.view()

    async def set_config(self, changes: dict[str, Any], actor: str = "admin",
                         unset: list[str] | None = None) -> dict[str, Any]:
        """Change settings on the running allocator: validated whole, audited, durable, applied."""
        await self._wait_ready()
        out = await self.live.set(changes, actor=actor, unset=unset or ())
        self._kick.set()
        return out

    # ---- maintenance (maintenance.py) ----------------------------------------------------------
    async def cordon(self, name: str, reason: str = "", actor: str = "admin") -> dict[str, Any]:
        """No new runs start on ``name`` (a candidate, a pool or a QPU); running ones finish."""
        await self._wait_ready()
        return await self.maint.cordon(name, actor=actor, reason=reason)

    async def drain(self, timeout_s: float = 60.0, name: str | None = None, reason: str = "",
                    actor: str = "admin") -> dict[str, Any]:
        """With ``name``: cordon it and wait up to ``timeout_s`` for its runs to end (its queued
        jobs go to their next-best backends). Without: the whole allocator (see ``drain_all``)."""
        if name is None:
            return await self.drain_all(timeout_s)
        await self._wait_ready()
        await self.maint.cordon(name, actor=actor, reason=reason, drain=True)
        return await self.maint.wait_drained(name, timeout_s)

    async def uncordon(self, name: str, actor: str = "admin") -> dict[str, Any]:
        await self._wait_ready()
        return await self.maint.uncordon(name, actor=actor)

    async def maintenance_window(self, name: str, start: float, end: float, reason: str = "",
                                 actor: str = "admin") -> dict[str, Any]:
        await self._wait_ready()
        try:
            window = MaintenanceWindow(start=start, end=end, reason=reason)
        except ValidationError as exc:   # the caller's mistake, said plainly (not an outage)
            raise QAllocError(f"bad maintenance window: {exc.errors()[0]['msg']}",
                              field="end", fix="give start < end, in Unix seconds.") from None
        return await self.maint.add_window(name, window, actor=actor)

    async def clear_maintenance_windows(self, name: str, actor: str = "admin") -> dict[str, Any]:
        await self._wait_ready()
        return await self.maint.clear_windows(name, actor=actor)

    async def maintenance(self, name: str | None = None) -> dict[str, Any]:
        await self._wait_ready()
        return self.maint.status(name)

    async def audit(self, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Operators' changes, newest first: who, when, action, old → new."""
        await self._wait_ready()
        return await self.d.db(self.admin.audit, key=key, limit=limit)

    # ---- views: dashboard, alerts, calibration -------------------------------------------------
    async def dashboard(self) -> dict[str, Any]:
        """Everything one refresh of the operators' page shows (dashboard.py)."""
        from ray_qalloc import dashboard

        alerts = await self.alerts_view(20)
        prefetch = getattr(self.calwatch, "prefetch", None)
        if prefetch is not None:
            await prefetch()
        return dashboard.data(self, alerts)

    async def alerts_view(self, limit: int = 100) -> dict[str, Any]:
        """Firing alerts, the newest events and per-sink delivery state."""
        await self._wait_ready()
        if self.alerts is None:
            return {"enabled": False, "firing": [], "recent": [], "sinks": {}}
        from ray_qalloc.alerts.service import alert_dict

        recent = await self.d.db(self.alerts.recent, limit)
        counts = await self.d.db(self.alerts.delivery_counts)
        return {"enabled": True, "firing": [alert_dict(a) for a in self.alerts.firing()],
                "recent": [alert_dict(e) for e in recent], "sinks": counts}

    async def calibration_status(self) -> list[dict[str, Any]]:
        """Per QPU: calibration age, staleness, series in alarm, last fetch error."""
        await self._wait_ready()
        return self.calwatch.status()

    async def refresh_calibration(self, name: str | None = None) -> list[dict[str, Any]]:
        """Read calibrations now (one QPU or all), instead of waiting for the period."""
        await self._wait_ready()
        events = await self.calwatch.tick(names=None if name is None else [name])
        return [{"device": e.device, "series": e.key.label, "kind": e.kind, "at": e.at, "factor": e.factor,
                 "message": e.message} for e in events]


__all__ = ["OperatorOps"]
