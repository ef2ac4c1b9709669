"""The dispatch pass: which queued jobs start where, now (``Scheduler.decide``).

A pass reads the heads of the free backends' indexes in (class, deadline, arrival) order,
weighs each job against live load, starts those whose best backend is free and holds the
others for the backend they wait for (``placement/holds.py``) until something that could
change their choice happens. Why apart: this is the hot path (a pass per freed slot), and
its cost is what ``benchmarks/decision_latency.py`` measures.
"""

from __future__ import annotations

import heapq
import math

from ray_qalloc.placement.entry import Decision, Entry, Item, PassResult, QallocPolicy
from ray_qalloc.placement.load import LiveView
from ray_qalloc.placement.pipeline import Choice, objective_rows, select
from ray_qalloc.priority import CLASSES

_EMERGENCY = CLASSES[0]
_NONE: frozenset[str] = frozenset()


class DispatchPass:
    """The pass half of ``Scheduler`` (a mixin: the state lives on the scheduler)."""

    def _head(self, backend: str, skip: set[str], parked: list[tuple[str, Item]]) -> Item | None:
        """Best current item of a backend's index. Stale items are dropped; items of jobs that
        chose to wait in this pass are parked and pushed back after it."""
        heap = self._index[backend]
        entries = self.entries
        heappop = heapq.heappop
        while heap:
            item = heap[0]
            entry = entries.get(item[2])
            if entry is None or entry.version != item[1]:
                heappop(heap)
            elif item[2] in skip:
                parked.append((backend, heappop(heap)))
            else:
                return item
        return None

    def decide(self, now: float) -> PassResult:
        """One pass: which queued jobs start where, now; flags, preemptions, unplaceable jobs."""
        out = PassResult()
        congested = self._congestion(now)
        self._expire_deadlines(now, out)
        for entry in self._pending_unplaceable:
            if self.entries.get(entry.job.id) is entry:   # not removed, nor queued again since
                del self.entries[entry.job.id]
                out.unplaceable.append(entry)
        self._pending_unplaceable.clear()
        if not self.entries:
            return out
        self._age(now)
        holds = self._holds
        if self.config.decline_ttl_s > 0.0 and holds.groups:
            self._unhold(holds.expired(now))
        # runtime of jobs examined in this pass that wait for a backend (and are not held: the
        # held ones' is in ``holds.work``, which the views read too)
        ahead: dict[str, float] = {}
        skip: set[str] = set()
        parked: list[tuple[str, Item]] = []
        misses = 0
        heads, walk = self._heads(now, skip, parked)
        carried, self._carry = self._carry, {}
        # insertion-ordered (a dict, not a set): ``_end_pass`` draws each declined backend's
        # jittered timeout in this order, and a set's order follows the process's string-hash
        # seed, so the same inputs would decide differently in another process
        examined: dict[str, None] = {}
        live_n, live_e = LiveView(self, now, False, ahead, holds.work), LiveView(self, now, True, ahead, holds.work)
        fast = type(self.policy).choose is QallocPolicy.choose   # qalloc's own selector: weigh inline
        config = self.config
        lookahead, explain = config.lookahead, config.explain
        entries, startable, windows = self.entries, self._startable, self.windows
        advance = self._advance
        heappop = heapq.heappop
        while heads and misses < lookahead:
            if not startable:
                break       # the pass filled every free slot: no head left can start (nor change state)
            item, backend = heappop(heads)
            job_id = item[2]
            entry = entries.get(job_id)
            if entry is None or entry.version != item[1] or job_id in skip:
                # taken or skipped since this head was read: re-read the backend's head
                advance(backend, walk, heads, skip, parked)
                continue
            if backend not in startable and not any(b in startable for b in entry.plan.estimates):
                continue    # its backends filled up earlier in this pass: nothing to start it on
            if backend:
                examined[backend] = None
            self.examined += 1
            # items of this job held off free indexes: held again if it declines again
            kept = carried.pop(job_id, None)
            if job_id in holds.holding:     # weighed again: its own work no longer counts ahead of it
                held = holds.drop(job_id)
                if held is not None:
                    kept = held[2] if kept is None else kept + held[2]
            emergency = entry.cls == _EMERGENCY
            live = live_e if emergency else live_n
            entry.excluded = (self._exclusions(entry, congested, now) if congested or windows
                              else _NONE)
            seen: list[tuple[str, float, bool]] | None = [] if fast and explain else None
            # qalloc's own selector weighs inline and reads, on the same walk, the best free
            # option a waiting job's threshold needs (``_waits``); other policies are asked
            free: tuple[float, float, float] | None = None
            if fast:
                choice, best_free, run_y, base_y = live.weigh_free(entry, seen)
                free = (best_free, run_y, base_y)
            else:
                choice = self.policy.choose(entry, live, now)
            if choice.backend is None:
                if not any(b in self.backends for b in entry.plan.estimates):
                    out.unplaceable.append(entry)
                    self.remove(job_id)
                    continue
                # every backend of its plan is out of reach for now (down, or held for
                # emergency jobs): it waits, it is not given up
                choice = Choice(None, False, {})
            if entry.flagged is None and entry.job.deadline_s is not None:
                self._flag(entry, choice, now, out)
            if choice.can_start:
                if seen is not None:
                    out.dispatch.append(Decision(entry, choice, {}, tuple(seen)))
                else:
                    scores = select(entry.job, entry.plan, live, detailed=True).scores if explain else {}
                    out.dispatch.append(Decision(entry, choice, scores))
                self.start(job_id, choice.backend, now, entry.plan.estimates[choice.backend].runtime_s)
            else:
                # it prefers to wait (for a busy backend, or a slot reserved for emergencies)
                skip.add(job_id)
                misses += 1
                self._waits(entry, choice, live, now, ahead, kept or [], free)
            advance(backend, walk, heads, skip, parked)
        self._end_pass(now, parked, carried, examined)
        if self.config.preemption:
            self._preempt.run(now, out)
        return out

    def _end_pass(self, now: float, parked: list[tuple[str, Item]],
                  carried: dict[str, list[tuple[str, Item]]], examined: dict[str, None]) -> None:
        """Items read past go back (or stay held while their job waits); released waiters the
        pass did not reach go back in line; free backends whose jobs all chose to wait are
        not re-read until something changes for them or a jittered timeout passes (overruns
        make waits grow; the jitter spreads their re-reading over passes). ``examined`` is in
        the order the pass reached the backends, so which backend draws which timeout follows
        from the inputs alone, never from the process's string-hash seed."""
        memo = self.config.decline_ttl_s > 0.0
        holds = self._holds
        if parked:
            self._push_back(pi for pi in parked if not (memo and holds.park(*pi)))
        for job_id, kept in carried.items():
            entry = self.entries.get(job_id)
            if entry is not None:
                self._push_back(it for it in kept if it[1][1] == entry.version)
        index, entries, startable = self._index, self.entries, self._startable
        for b in examined:
            if b in startable:
                # declined only if a queued job is left to decline it: stale items at the head
                # are dropped first, so whether this heap was compacted cannot matter
                heap = index[b]
                while heap and ((e := entries.get(heap[0][2])) is None or e.version != heap[0][1]):
                    heapq.heappop(heap)
                if heap:
                    self._declined[b] = now + self._decline_ttl()

    def _heads(self, now: float, skip: set[str], parked: list[tuple[str, Item]]
               ) -> tuple[list[tuple[Item, str]], set[str]]:
        """The heads of the startable, not declined backends' indexes (which this pass walks,
        head after head), and the jobs queued since their free backends were declined (weighed
        alone: backend "" reads no index), best first as a heap; a pass costs
        O(startable + examined·log)."""
        declined = self._declined
        heads: list[tuple[Item, str]] = []
        walk: set[str] = set()
        index, entries, heappop = self._index, self.entries, heapq.heappop
        for b in self._startable:
            heap = index[b]
            if heap and (not declined or declined.get(b, -math.inf) <= now):
                walk.add(b)
                # ``_head`` inline: one read per free backend at the start of every pass
                while heap:
                    item = heap[0]
                    entry = entries.get(item[2])
                    if entry is None or entry.version != item[1]:
                        heappop(heap)
                    elif item[2] in skip:
                        parked.append((b, heappop(heap)))
                    else:
                        heads.append((item, b))
                        break
        heads.extend((item, "") for item in self._fresh)
        self._fresh.clear()
        heapq.heapify(heads)
        return heads, walk

    def _advance(self, backend: str, walk: set[str], heads: list[tuple[Item, str]], skip: set[str],
                 parked: list[tuple[str, Item]]) -> None:
        """Push the next head of a walked backend that can still start a run."""
        if backend in walk and backend in self._startable:
            nxt = self._head(backend, skip, parked)
            if nxt is not None:
                heapq.heappush(heads, (nxt, backend))

    def _waits(self, entry: Entry, choice: Choice, live: LiveView, now: float, ahead: dict[str, float],
               kept: list[tuple[str, Item]], free: tuple[float, float, float] | None = None) -> None:
        """A job chose to wait: its work counts ahead on the backend it waits for — held (with
        the items ``kept`` off free indexes) while that memo is on, else for this pass only.
        ``free``: (best free objective, chosen backend's runtime and base) as ``weigh_free`` read
        them while weighing this job, so its threshold needs no second walk of its plan."""
        job_id = entry.job.id
        emergency = live.emergency
        if emergency:
            self._preempt.declined(job_id)
        holds = self._holds
        if choice.backend in entry.plan.estimates:
            run_s = entry.plan.estimates[choice.backend].runtime_s
            if self.config.decline_ttl_s > 0.0:
                latest = (self._latest_end(entry, choice.backend, live, now) if free is None
                          else self._latest_end_from(*free, choice.backend, live, now))
                holds.hold(job_id, choice.backend, run_s, latest, emergency, now + self._decline_ttl())
            else:
                ahead[choice.backend] = ahead.get(choice.backend, 0.0) + run_s
        if kept:
            self._push_back(holds.adopt(job_id, kept) if job_id in holds.holding else kept)

    def _latest_end(self, entry: Entry, waits_for: str, live: LiveView, now: float) -> float:
        """The latest predicted end of ``waits_for``'s runs at which this job still prefers
        waiting for it to its best free backend: past it, the job should be weighed again."""
        backends = self.backends
        emergency = live.emergency
        best_free, run_y, base_y = math.inf, 0.0, 0.0
        for name, run, base in objective_rows(entry.plan, entry.job.priority, entry.job.intent):
            if name == waits_for:
                run_y, base_y = run, base
                continue
            b = backends.get(name)
            if b is None or not b.healthy or name in entry.excluded:
                continue
            if b.can_start_emergency if emergency else b.can_start:
                # a free backend's wait is the work held or weighed ahead of this job there
                wait = live.extra(name) / max(b.spec.slots, 1) + b.external_wait_s
                obj = math.log(max(wait + run, 1e-6)) + base
                if obj < best_free:
                    best_free = obj
        if best_free == math.inf:
            return math.inf
        # log(wait + run_y) + base_y <= best_free  <=>  wait <= exp(best_free - base_y) - run_y;
        # the wait it saw includes the work ahead of it in this pass
        y = backends[waits_for]
        ahead_y = live.extra(waits_for) / max(y.spec.slots, 1) + y.external_wait_s
        return now + math.exp(min(best_free - base_y, 700.0)) - run_y - ahead_y

    def _latest_end_from(self, best_free: float, run_y: float, base_y: float, waits_for: str, live: LiveView,
                         now: float) -> float:
        """``_latest_end`` given the best free objective and ``waits_for``'s risk-adjusted runtime
        and base part, as the weighing read them (the same formula: the tests compare the two)."""
        if best_free == math.inf:
            return math.inf
        y = self.backends[waits_for]
        ahead_y = live.extra(waits_for) / max(y.spec.slots, 1) + y.external_wait_s
        return now + math.exp(min(best_free - base_y, 700.0)) - run_y - ahead_y

    def _decline_ttl(self) -> float:
        ttl = self.config.decline_ttl_s
        if ttl <= 0.0:
            return 0.0
        self._jitter = (self._jitter * 1103515245 + 12345) & 0x7FFFFFFF
        return ttl * (1.0 + self._jitter / 0x7FFFFFFF)
