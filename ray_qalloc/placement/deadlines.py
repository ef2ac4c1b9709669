"""Time-driven changes to queued jobs: deadline flags, congestion and maintenance exclusions.

Why apart from the pass: each is a rule about one job or one backend over time, with its own
heap or interval, that the pass consults once; none of them decides where a job goes.
"""

from __future__ import annotations

import heapq
import math
from typing import Iterable

from ray_qalloc.placement.entry import Entry, PassResult
from ray_qalloc.placement.pipeline import Choice


class TimeRules:
    """Deadlines, congestion and maintenance windows (a mixin of ``Scheduler``)."""

    def _flag(self, entry: Entry, choice: Choice, now: float, out: PassResult) -> None:
        if entry.flagged is not None or math.isinf(entry.deadline_at):
            return
        s = choice.scores.get(choice.backend or "", {})
        finish = now + s.get("completion_s", 0.0)
        if finish > entry.deadline_at:
            entry.flagged = (f"predicted to finish {finish - entry.deadline_at:.3g} s after its deadline "
                             f"(best option {choice.backend}: completion {s.get('completion_s', 0.0):.3g} s)")
            out.flagged.append(entry)

    def _expire_deadlines(self, now: float, out: PassResult) -> None:
        """Flag queued jobs that can no longer meet their deadline even on the fastest backend."""
        heap = self._deadlines
        while heap and heap[0][0] < now:
            latest, seq, job_id = heapq.heappop(heap)
            entry = self.entries.get(job_id)
            if entry is not None and entry.flagged is None and entry.seq == seq:
                entry.flagged = f"still queued {now - latest:.3g} s after the latest start that meets its deadline"
                out.flagged.append(entry)

    def _congestion(self, now: float) -> frozenset[str]:
        """QPUs whose predicted wait passed the high mark (until it falls below the low one).
        Re-evaluated at most once per ``congestion_interval_s``: waits move on that time scale,
        not per decision."""
        if now - self._congestion_checked >= self.config.congestion_interval_s:
            self._congestion_checked = now
            for name, b in self.backends.items():
                if b.spec.kind != "qpu":
                    continue
                w = self.predicted_wait(name, now)
                if b.congested and w < self.config.qpu_wait_low_s:
                    b.congested = False
                elif not b.congested and w > self.config.qpu_wait_high_s:
                    b.congested = True
            self._congested = frozenset(n for n, b in self.backends.items() if b.congested)
        return self._congested

    def set_windows(self, backend: str, windows: Iterable[tuple[float, float]]) -> None:
        """Maintenance windows (start, end) of a backend: no run starts there that would not
        end before a window begins, nor during one. Runs already going are not stopped."""
        ws = tuple(sorted((float(a), float(b)) for a, b in windows if b > a))
        if ws:
            self.windows[backend] = ws
        else:
            self.windows.pop(backend, None)

    def _exclusions(self, entry: Entry, congested: frozenset[str], now: float) -> frozenset[str]:
        """Backends this job skips in this pass: congested QPUs, for an ``auto`` job, only if a
        healthy simulator meets its floor (skipping them for a simulator that is down would
        leave it nothing to choose); and backends whose maintenance window a run started now
        would reach (predicted runtime), or that are in one."""
        out: frozenset[str] = frozenset()
        est = entry.plan.estimates
        if congested and entry.job.intent == "auto":
            floor = entry.job.fidelity_min or 0.0
            backends = self.backends
            sims_ok = any(backends[b].spec.kind == "simulator" and backends[b].healthy and e.fidelity >= floor
                          for b, e in est.items() if b in backends)
            if sims_ok:
                out = frozenset(b for b in est if b in congested)
        if self.windows:
            late = [b for b in est if b in self.windows
                    and any(now < end and now + est[b].runtime_s > start for start, end in self.windows[b])]
            if late:
                out = out | frozenset(late)
        return out
