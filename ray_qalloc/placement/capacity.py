"""A pool's cores for planning: the node's cores less what other work is measured to use.

Why: Ray counts only the CPUs it handed out. On a shared HPC node another user's job can hold
half the cores; a pool that plans on all of them starts runs that crawl, and its wait
estimates (how long until a core frees) are too short by the same factor. Each health ping
brings what the pool's node measured (``NodeStats.busy_cores``); our own runs' threads are
subtracted (``foreign_busy_cores``), the rest is smoothed (one ping catches a run starting or
ending between reading and counting) and, beyond a slack for noise and Ray's own processes,
taken off the pool's cores in whole cores, never below one (a pool with a core of its own
runs one thing at a time rather than nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ForeignLoad:
    """Per pool: smoothed foreign load (cores) and the cores placement plans with."""

    slack: float = 0.5
    alpha: float = 0.5                  # weight of the newest reading
    foreign: dict[str, float] = field(default_factory=dict)

    def update(self, pool: str, cores: float, busy: float | None, own_threads: float) -> float:
        """The cores to plan with after this reading (``busy`` None: not measured, all cores)."""
        cores = max(float(cores), 1.0)
        if busy is None or not math.isfinite(busy):
            return cores
        raw = max(float(busy) - max(float(own_threads), 0.0), 0.0)
        prev = self.foreign.get(pool)
        f = raw if prev is None else self.alpha * raw + (1.0 - self.alpha) * prev
        self.foreign[pool] = f
        return self.plan_cores(pool, cores)

    def plan_cores(self, pool: str, cores: float) -> float:
        taken = math.floor(max(self.foreign.get(pool, 0.0) - self.slack, 0.0))
        return max(max(float(cores), 1.0) - taken, 1.0)

    def forget(self, pool: str) -> None:
        self.foreign.pop(pool, None)
