"""Backup attempts: hedges beside overrunning runs, probes on idle cores.

Why a mixin of its own: one concern — a second attempt of a running job, started on free
capacity where it is predicted to finish sooner (a hedge), or racing a method never measured
on the circuit while a core idles (a probe); the first result wins and the other run is
stopped (``runlife.py``). Bounded: at most one backup per job, never on a QPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ray_qalloc.fleet import Fleet
from ray_qalloc.inflight import Queued, Running
from ray_qalloc.placement.scheduler import Scheduler
from ray_qalloc.store import JobStore

log = logging.getLogger("ray_qalloc.dispatch")

_HEDGE_SUFFIX = "#backup"


class Backups:
    """Mixed into ``Dispatcher``, whose state these methods use."""

    fleet: Fleet
    sched: Scheduler
    store: JobStore
    running: dict[str, Running]
    draining: bool
    hedges: int
    probes: int
    _backup_seq: int
    kick: Callable[[], None]
    db: Callable[..., Any]
    stop: Callable[[Running], None]
    launch: Callable[..., Running]
    _is_live: Callable[[Running], bool]
    _forget: Callable[[Running], None]
    restarted: set[str]
    restart: Callable[[Running, str], bool]

    async def stop_probes(self) -> int:
        """A job waits: every probe gives its core back (nothing is learned from a cut-short probe)."""
        stopped = 0
        for r in list(self.running.values()):
            b = r.backup
            if b is not None and b.probe and self._is_live(b):
                self.stop(b)
                self._forget(b)
                await self.db(self.store.close_attempt, b.job.id, b.attempt, "probe_stopped",
                              "a queued job needed the core")
                stopped += 1
        if stopped:
            self.kick()
        return stopped

    # ==== hedging ===============================================================================
    async def hedge_tick(self, now: float, decide: Callable[..., list[Any]] | None, note_overrun: Callable[..., None] | None,
                   k: float, min_elapsed_s: float = 0.0,
                   restart: Callable[[list[Running], float], list[tuple[str, str]]] | None = None) -> int:
        """Runs past ``k``× their prediction (and ``min_elapsed_s``): remember the overrun at once
        (so the next job of that circuit goes elsewhere), start one backup where ``decide``
        says it pays, and stop and place again, where ``restart`` says it pays, a run that got
        none. Returns the backups started and runs restarted."""
        started = 0
        overrunning = [r for r in self.running.values() if r.backup is None and not r.backup_pending
                       and now - r.started_at > max(k * r.predicted_s, min_elapsed_s)]
        if not overrunning:
            return 0
        for r in overrunning:
            if note_overrun is not None and not r.overrun_noted:
                r.overrun_noted = True
                note_overrun(r, now)
        if decide is None or self.draining:
            return 0
        for job_id, backend in decide(overrunning, now):
            r = self.running.get(job_id)
            if r is None or r.backup is not None or backend == r.backend:
                continue
            if await self.start_backup(r, backend):
                started += 1
        if restart is not None:
            left = [r for r in overrunning if self.running.get(r.job.id) is r and r.backup is None
                    and not r.backup_pending and r.job.id not in self.restarted]
            for job_id, why in restart(left, now) if left else ():
                r = self.running.get(job_id)
                if r is not None and self.restart(r, why):
                    started += 1
        return started

    async def start_backup(self, r: Running, backend: str, *, probe: bool = False) -> bool:
        est = r.plan.estimates.get(backend)
        if est is None or backend not in self.fleet.members or r.backup is not None or r.backup_pending:
            return False
        r.backup_pending = True   # set before the first await: a concurrent pass or tick sees it
        try:
            return await self._start_backup(r, backend, est, probe)
        finally:
            r.backup_pending = False

    async def _start_backup(self, r: Running, backend: str, est: Any, probe: bool) -> bool:
        # the backup's core is taken in the scheduler's books before the commit (no pass may give
        # it away meanwhile), and given back if the commit says the job is no longer running
        now = time.time()
        # its own scheduler key: a job may have had a backup before (one promoted to its run
        # still holds the earlier key)
        self._backup_seq += 1
        sid = f"{r.job.id}{_HEDGE_SUFFIX}{self._backup_seq}"
        self.sched.start(sid, backend, now, est.runtime_s, r.job.priority.value)
        try:
            attempt = await self.db(self.store.hedge, r.job.id, backend, predicted_s=est.runtime_s)
        except Exception:
            self.sched.finish(sid)
            raise
        if attempt is None or not self._is_live(r) or r.backup is not None:
            self.sched.finish(sid)
            if attempt is not None:
                await self.db(self.store.close_attempt, r.job.id, attempt, "superseded", "the job ended meanwhile")
            return False
        q = Queued(r.job, r.view, r.plan, now, r.created_at)
        self.launch(q, backend, attempt, primary=r, sched_id=sid).probe = probe
        if probe:
            self.probes += 1
            log.info("job %s: probe on %s (idle core) beside %s", r.job.id, backend, r.backend)
            return True
        self.hedges += 1
        log.warning("job %s overran %.3g s on %s (predicted %.3g s): backup attempt %d on %s",
                    r.job.id, now - r.started_at, r.backend, r.predicted_s, attempt, backend)
        return True
