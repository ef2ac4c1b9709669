"""Taking a backend out of service without losing work: cordon, drain, maintenance windows.

Why at the scheduler and not as a placement filter: a filter would drop a cordoned QPU from
the plans, and a quantum job allowed only there would have no backend left and be failed.
A cordon instead makes the backend unavailable to new starts (as a down backend is): jobs
whose plans hold another backend go there (an ``auto`` job to a simulator when its size and
fidelity floor allow, a ``quantum`` job to another QPU — their plans already say which), and
a job with nowhere else to go waits until the backend is back. Running jobs finish.

Drain = cordon, and the caller can wait until nothing runs there. A maintenance window
(start, end) is announced ahead: no run starts on the backend that its prediction says would
not end before the window begins, and none during it.

Every change is decided, committed to the admin state (audited), then applied.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pydantic import BaseModel, Field, model_validator

from ray_qalloc.exceptions import QAllocError, UnknownBackend

if TYPE_CHECKING:  # pragma: no cover
    from ray_qalloc.adminstate import AdminState
    from ray_qalloc.dispatch import Dispatcher

STATE_KEY = "maintenance"


class MaintenanceWindow(BaseModel):
    start: float = Field(description="Unix time the maintenance begins.")
    end: float = Field(description="Unix time it ends.")
    reason: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _ordered(self) -> "MaintenanceWindow":
        if not self.end > self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self


class BackendMaintenance(BaseModel):
    cordoned: bool = False
    draining: bool = False
    reason: str = Field("", max_length=500)
    since: float | None = None
    by: str = ""
    windows: list[MaintenanceWindow] = Field(default_factory=list)

    def in_window(self, now: float) -> MaintenanceWindow | None:
        return next((w for w in self.windows if w.start <= now < w.end), None)

    def idle(self) -> bool:
        return not self.cordoned and not self.windows


class MaintenanceBook(BaseModel):
    """Per backend (placement candidate) name: its cordon and windows. What is persisted."""

    backends: dict[str, BackendMaintenance] = Field(default_factory=dict)

    def of(self, name: str) -> BackendMaintenance:
        return self.backends.get(name) or BackendMaintenance()

    def cordoned(self) -> set[str]:
        return {n for n, b in self.backends.items() if b.cordoned}

    def prune(self, now: float) -> "MaintenanceBook":
        """Windows that ended are dropped (they are in the audit trail)."""
        out = {}
        for n, b in self.backends.items():
            b = b.model_copy(update={"windows": [w for w in b.windows if w.end > now]})
            if not b.idle():
                out[n] = b
        return MaintenanceBook(backends=out)


class MaintenanceDesk:
    """The allocator's maintenance operations: names resolved, changes committed, then applied
    to the dispatcher (cordoned set → scheduler health) and the scheduler (windows)."""

    def __init__(self, d: "Dispatcher", admin: "AdminState", kick: Callable[[], None]) -> None:
        self.d, self.admin, self.kick = d, admin, kick
        self.book = MaintenanceBook()
        self._timers: list[asyncio.TimerHandle] = []

    # ---- names -------------------------------------------------------------------------------
    def resolve(self, name: str) -> list[str]:
        """A candidate name, a pool (all its variants) or a QPU backend."""
        fleet = self.d.fleet
        if name in fleet.members:
            return [name]
        host = fleet.hosts.get(name)
        if host is not None and host.members:
            return list(host.members)
        known = sorted(set(fleet.hosts) | {n for n, m in fleet.members.items() if m.spec.kind == "qpu"})
        raise UnknownBackend(f"no backend, pool or QPU named {name!r}.", field="name",
                             fix=f"use one of: {', '.join(known)} (or a pool variant from `GET /v1/backends`).")

    # ---- state -------------------------------------------------------------------------------
    async def load(self) -> None:
        """At start: what an operator set before the restart holds again."""
        raw = await self.d.db(self.admin.get, STATE_KEY, None)
        self.book = MaintenanceBook.model_validate(raw) if raw else MaintenanceBook()
        self.apply()

    async def _commit(self, book: MaintenanceBook, *, actor: str, action: str, detail: str) -> None:
        book = book.prune(time.time())
        await self.d.db(self.admin.put, STATE_KEY, book.model_dump(mode="json"), actor=actor, action=action,
                        detail=detail)
        self.book = book
        self.apply()

    def apply(self) -> None:
        """Make the scheduler see the book: cordoned backends are unavailable to new starts,
        windows exclude starts that would reach them; a pass runs at each window's edges."""
        d = self.d
        cordoned = {n for n in self.book.cordoned() if n in d.fleet.members}
        changed = cordoned ^ d.cordoned
        d.cordoned = cordoned
        for name in changed:
            m = d.fleet.members.get(name)
            if m is not None and name in d.sched.backends:
                d.sched.set_health(name, m.healthy and not d.out_of_service(name))
        for name in set(d.sched.windows) | set(self.book.backends):
            if name in d.sched.backends:
                d.sched.set_windows(name, [(w.start, w.end) for w in self.book.of(name).windows])
        self._arm_timers()
        self.kick()

    def _arm_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers = []
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        now = time.time()
        for b in self.book.backends.values():
            for w in b.windows:
                for edge in (w.start, w.end):
                    if edge > now:
                        self._timers.append(loop.call_later(edge - now + 0.01, self.kick))

    # ---- operations ---------------------------------------------------------------------------
    async def cordon(self, name: str, *, actor: str, reason: str = "", drain: bool = False) -> dict[str, Any]:
        names = self.resolve(name)
        book = self.book.model_copy(deep=True)
        now = time.time()
        for n in names:
            cur = book.of(n)
            book.backends[n] = cur.model_copy(update={"cordoned": True, "draining": drain or cur.draining,
                                                      "reason": reason or cur.reason, "since": cur.since or now,
                                                      "by": actor})
        await self._commit(book, actor=actor, action="drain" if drain else "cordon",
                           detail=f"{name}: {reason}" if reason else name)
        return self.status(name)

    async def uncordon(self, name: str, *, actor: str) -> dict[str, Any]:
        names = self.resolve(name)
        book = self.book.model_copy(deep=True)
        for n in names:
            cur = book.of(n)
            book.backends[n] = cur.model_copy(update={"cordoned": False, "draining": False, "reason": "",
                                                      "since": None, "by": actor})
        await self._commit(book, actor=actor, action="uncordon", detail=name)
        return self.status(name)

    async def add_window(self, name: str, window: MaintenanceWindow, *, actor: str) -> dict[str, Any]:
        names = self.resolve(name)
        if window.end <= time.time():
            raise QAllocError(f"the window ends at {window.end}, which has passed.", field="end",
                              fix="give an end in the future (Unix seconds).")
        book = self.book.model_copy(deep=True)
        for n in names:
            cur = book.of(n)
            book.backends[n] = cur.model_copy(update={"windows": [*cur.windows, window]})
        await self._commit(book, actor=actor, action="window",
                           detail=f"{name}: {window.start:.0f}–{window.end:.0f} {window.reason}".strip())
        return self.status(name)

    async def clear_windows(self, name: str, *, actor: str) -> dict[str, Any]:
        names = self.resolve(name)
        book = self.book.model_copy(deep=True)
        for n in names:
            book.backends[n] = book.of(n).model_copy(update={"windows": []})
        await self._commit(book, actor=actor, action="clear_windows", detail=name)
        return self.status(name)

    async def wait_drained(self, name: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        names = self.resolve(name)
        while self._running_on(names) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.status(name)

    # ---- views --------------------------------------------------------------------------------
    def _running_on(self, names: Iterable[str]) -> list[str]:
        wanted = set(names)
        return sorted(r.job.id for r in self.d._all_runs() if r.backend in wanted)

    def status(self, name: str | None = None) -> dict[str, Any]:
        """Per backend under maintenance (or the named one): state, runs still going there, and
        queued jobs that have no other backend (they wait for it)."""
        names = self.resolve(name) if name is not None else sorted(self.book.backends)
        now = time.time()
        out_of_service = self.book.cordoned()
        rows = []
        for n in names:
            b = self.book.of(n)
            stuck = sorted(q.job.id for q in self.d.queued.values()
                           if n in q.plan.estimates and all(x in out_of_service or x not in self.d.sched.backends
                                                            for x in q.plan.estimates))
            window = b.in_window(now)
            rows.append({"backend": n, "cordoned": b.cordoned, "draining": b.draining, "reason": b.reason,
                         "since": b.since, "by": b.by, "in_window": window.model_dump() if window else None,
                         "windows": [w.model_dump() for w in b.windows], "running": self._running_on([n]),
                         "waiting_for_it": stuck})
        drained = all(not r["running"] for r in rows)
        return {"backends": rows, "drained": drained}

    def why(self, name: str, now: float | None = None) -> str | None:
        """Why placement may not start a job on ``name`` now (for explain), if it is maintenance."""
        b = self.book.backends.get(name)
        if b is None:
            return None
        now = time.time() if now is None else now
        if b.cordoned:
            what = "draining" if b.draining else "cordoned"
            return f"{what} by {b.by or 'an operator'}" + (f": {b.reason}" if b.reason else "")
        w = b.in_window(now)
        if w is not None:
            return f"in maintenance until {w.end:.0f}" + (f": {w.reason}" if w.reason else "")
        nxt = min((w.start for w in b.windows if w.start > now), default=None)
        if nxt is not None:
            return f"maintenance from {nxt:.0f}: runs that would not end by then go elsewhere"
        return None
