"""What the scheduler's queue holds and hands out: its knobs, a queued job, the policy interface
and a pass's result.

Why a module of its own: these are value objects every part of the scheduler reads (the
index, the pass, preemption, the allocator, the benchmarks); keeping them apart from the
state machine lets each part import them without importing the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from ray_qalloc.placement.load import LiveView, Run, _Without
from ray_qalloc.placement.model import JobView, LiveState, Plan
from ray_qalloc.placement.pipeline import Choice, objective_rows, score_row, select
from ray_qalloc.priority import RANK as _RANK

__all__ = ["Decision", "Entry", "Item", "PassResult", "Policy", "QallocPolicy", "SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the queue; all have working defaults."""

    # backend -> slots, or pool (scheduler node) -> cores, kept for emergency jobs
    reserved: Mapping[str, int] = field(default_factory=dict)
    aging_s: float = 300.0            # a batch job waiting this long is served as normal
    qpu_wait_high_s: float = 600.0    # QPU congested above this predicted wait ...
    qpu_wait_low_s: float = 300.0     # ... and clear again below this one
    lookahead: int = 64               # jobs per class examined past ones that cannot start
    preempt_min_remaining_s: float = 5.0   # preempt only runs with at least this much left
    preemption: bool = True
    preempt_recheck_batch: int = 32   # waiting emergency jobs re-considered for preemption per second
    explain: bool = True              # keep every backend's scores of a dispatch (for explain)
    # Pure optimisations, each with its production default; 0 turns it off (every pass sees
    # everything), which the reference-scheduler test needs for an exact comparison.
    decline_ttl_s: float = 1.0        # a free backend whose jobs all chose to wait is skipped this long (x1-2)
    congestion_interval_s: float = 1.0    # QPU congestion re-evaluated at most this often
    preempt_recheck_s: float = 1.0    # waiting emergency jobs re-considered for preemption this often
    check_invariants: bool = False    # validate_state() after every mutating call (tests)


@dataclass
class Entry:
    """A queued job with its plan, made once at enqueue."""

    job: JobView
    plan: Plan
    arrival: float                    # when the job was accepted (its place in line)
    seq: int = 0
    cls: str = "normal"               # current class (batch may age to normal)
    flagged: str | None = None        # why it will miss its deadline, once flagged
    excluded: frozenset[str] = frozenset()   # backends dropped by congestion, for explain
    # unique among all entries, renewed when its key changes (aging): index items of an older
    # entry of the same job (queued, started, queued again) or of an older key are stale
    version: int = 0

    @property
    def deadline_at(self) -> float:
        d = self.job.deadline_s
        return self.arrival + d if d is not None else math.inf

    def key(self) -> tuple[int, float, float, int]:
        """Class, then earliest deadline, then arrival (a re-queued job keeps its place without
        its old ``seq``), then ``seq`` among equal arrivals."""
        return (_RANK[self.cls], self.deadline_at, self.arrival, self.seq)


class Policy(Protocol):
    """Where a job goes, given its plan and live load (qalloc's ``select``, or a baseline)."""

    name: str

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice: ...


class QallocPolicy:
    name = "qalloc"

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        if type(live) is LiveView:
            return live.weigh(entry)
        if not entry.excluded:
            return select(entry.job, entry.plan, live)
        return select(entry.job, entry.plan, _Without(live, entry.excluded))


@dataclass
class Decision:
    entry: Entry
    choice: Choice
    scores: dict[str, dict[str, float]] = field(default_factory=dict)   # every backend's, at decision time
    # (backend, wait, can start) as the decision weighed them: every backend's scores are
    # rebuilt from these when explain asks, not on the hot path
    seen: tuple[tuple[str, float, bool], ...] = ()

    @property
    def explained(self) -> Choice:
        if not self.scores and self.seen:
            job, p = self.entry.job, self.entry.plan
            rows = {name: (run, base) for name, run, base in objective_rows(p, job.priority, job.intent)}
            for name, wait, can in self.seen:
                run, base = rows[name]
                completion = wait + run
                objective = math.log(completion if completion > 1e-6 else 1e-6) + base
                self.scores[name] = score_row(wait, can, p.estimates[name], run, objective)
        return Choice(self.choice.backend, self.choice.can_start, self.scores or self.choice.scores)


@dataclass
class PassResult:
    dispatch: list[Decision] = field(default_factory=list)
    flagged: list[Entry] = field(default_factory=list)          # newly flagged deadline misses
    unplaceable: list[Entry] = field(default_factory=list)      # no feasible backend at all
    preempt: list[tuple[Run, Entry]] = field(default_factory=list)   # (batch run to stop, emergency job)


Item = tuple[tuple[int, float, float, int], int, str]   # (entry key, entry version, job id)
