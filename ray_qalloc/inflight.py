"""Jobs in flight: a queued job as the dispatcher keeps it, and one running attempt.

Why a module of its own: the dispatcher (passes and commits), the run life (watch, complete,
fail over, stop) and backups (hedges, probes) all read and write these records; none of them
owns the shape.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from ray_qalloc.jobs import PreparedJob
from ray_qalloc.placement import JobView, Plan

__all__ = ["Queued", "Running", "circuit_key"]


@dataclass
class Queued:
    job: PreparedJob
    view: JobView
    plan: Plan
    enqueued_at: float
    created_at: float


@dataclass
class Running:
    job: PreparedJob
    view: JobView
    plan: Plan
    backend: str
    attempt: int
    started_at: float
    predicted_s: float
    task: asyncio.Task | None = None
    created_at: float = 0.0
    sched_id: str = ""                 # the scheduler's key of this run (a backup has its own)
    backup: "Running | None" = None    # the hedge of this run, while it runs
    primary: "Running | None" = None   # set on a backup: the run it hedges
    overrun_noted: bool = False
    probe: bool = False                # a backup raced on an idle core (stopped when a job waits)
    backup_pending: bool = False       # a backup's commit is in flight (no second one meanwhile)
    accepted_at: float = 0.0           # the submit call reached the allocator (fast path only)
    committed_at: float = 0.0          # its accept+dispatch commit returned

    def __post_init__(self) -> None:
        if not self.sched_id:
            self.sched_id = self.job.id


def circuit_key(job: PreparedJob) -> str:
    """Content hash of the circuit and its shots: what "the same circuit again" means."""
    return hashlib.blake2b(job.payload, digest_size=12).hexdigest() + f":{job.shots}"
