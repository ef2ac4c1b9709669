"""Preemption: an emergency job that cannot start anywhere may take a batch simulator run's slot.

Why apart from the pass: it is a second, rarer decision with state of its own (emergency jobs
to look at, and when they were last looked at) and a victim search the pass never needs. The
scheduler tells it which emergency jobs arrived or declined a free slot; after each pass it
proposes (victim run, emergency job) pairs, and the caller stops the victim and re-queues it
in its place.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Iterator

from ray_qalloc.placement.load import BackendSlotState, LiveView, Run
from ray_qalloc.placement.pipeline import static_objective
from ray_qalloc.priority import CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from ray_qalloc.placement.scheduler import Entry, PassResult, Scheduler

_EMERGENCY, _BATCH = CLASSES[0], CLASSES[-1]


def _entry_key(entry: "Entry") -> tuple[int, float, float, int]:
    return entry.key()


class Preemption:
    """Which batch runs to stop, and for which emergency jobs (see the module's docstring)."""

    def __init__(self, sched: "Scheduler") -> None:
        self.sched = sched
        # emergency jobs to consider at the next pass: new arrivals, and those a pass saw
        # waiting; each is checked once, so a pass never rescans the queue
        self.new: set[str] = set()
        self.waiting: dict[str, None] = {}   # insertion-ordered set
        self.recheck_at = -math.inf

    def arrived(self, job_id: str) -> None:
        """An emergency job was queued (or raised to emergency): looked at after the next pass."""
        self.new.add(job_id)

    def declined(self, job_id: str) -> None:
        """An emergency job declined a free slot for a better one: no preemption needed now; the
        bounded once-a-second recheck looks at it again while it waits (checking every declining
        emergency job after every pass cost a victim search each)."""
        if job_id not in self.new:
            self.waiting.setdefault(job_id, None)

    def run(self, now: float, out: "PassResult") -> None:
        """Emergency jobs that cannot start anywhere may take a long batch simulator run's slot."""
        s = self.sched
        if not s.config.preemption:
            return
        taken: set[str] = set()
        candidates, self.new = self.new, set()
        if now - self.recheck_at >= s.config.preempt_recheck_s and self.waiting:
            # jobs checked before that are still waiting: loads move (overruns, batch runs
            # starting), so they are looked at again — once per ``preempt_recheck_s``, a bounded
            # number per pass, oldest first, so a pass never rescans a long emergency queue
            self.recheck_at = now
            waiting = self.waiting
            for job_id in list(itertools.islice(waiting, s.config.preempt_recheck_batch)):
                del waiting[job_id]
                candidates.add(job_id)
        # most urgent first: the first victims go to the jobs first in line (and a set's order
        # would depend on string hashing, i.e. differ between processes)
        for entry in sorted((s.entries[j] for j in candidates if j in s.entries), key=_entry_key):
            job_id = entry.job.id
            if any(s.backends[b].can_start_emergency for b in entry.plan.estimates if b in s.backends):
                # a backend is free for it: the pass starts it, or it chose to wait for a better one
                self.waiting[job_id] = None
                continue
            victim = self.victim(entry, now, taken)
            if victim is None:
                self.waiting[job_id] = None   # nothing worth stopping now; looked at again
            else:
                taken.add(victim.job_id)
                out.preempt.append((victim, entry))

    def victim(self, entry: "Entry", now: float, taken: set[str]) -> Run | None:
        """The batch simulator run whose slot would serve this emergency job best — and only if
        taking it beats the job's best option as things stand (waiting for a busy backend may
        be better than a slow free one: then stopping someone's work gains nothing)."""
        s = self.sched
        current = LiveView(s, now, True).weigh(entry, all_backends=True)
        if current.backend is None:
            return None
        best_obj = current.scores[current.backend]["objective"]
        static = static_objective(entry.plan, entry.job.priority, entry.job.intent)
        best: Run | None = None
        for b, est in entry.plan.estimates.items():
            state = s.backends.get(b)
            if state is None or state.spec.kind != "simulator" or not state.healthy:
                continue
            obj = math.log(max(est.runtime_s, 1e-6)) + static[b]
            if obj >= best_obj:
                continue
            for run in self.victims_for(state, taken, now):
                best_obj, best = obj, run
                break
        return best

    def victims_for(self, state: BackendSlotState, taken: set[str], now: float) -> Iterator[Run]:
        """Batch runs whose stop would let ``state``'s backend start a run: its own, and — for a
        pool's variant, whose cores every variant of the pool shares — those of its siblings that
        free enough cores (a batch MPS run's core serves an emergency statevector job)."""
        s = self.sched
        spec = state.spec
        ok = lambda r: (r.priority == _BATCH and r.job_id not in taken  # noqa: E731
                        and r.remaining(now) >= s.config.preempt_min_remaining_s)
        yield from (r for r in state.runs.values() if ok(r))
        if spec.threads <= 0 or len(state.runs) >= spec.slots:
            return
        cores = s.node_cpus.get(state.node, 1.0)
        free = cores - s._node_busy.get(state.node, 0.0)
        for name in s._nodes.get(state.node, ()):
            sib = s.backends[name]
            if name == spec.name or sib.spec.threads <= 0:
                continue
            for r in sib.runs.values():
                if ok(r) and free + sib.spec.threads >= spec.threads:
                    yield r
