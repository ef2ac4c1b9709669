"""Recovery at start-up: the queue rebuilt from the JobStore, runs in flight re-attached.

Why a module of its own: the allocator's queue is memory only, so every (re)start rebuilds it
from the store, and that rule — QUEUED jobs are queued again; a RUNNING job is re-attached to
the executor that runs it (which keeps its in-flight and recent runs), or re-queued when that
executor is gone — is one concern, apart from the facade that calls it once (``allocator.py``)
and from the dispatcher whose state it fills (``dispatch.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_qalloc.inflight import Running
from ray_qalloc.jobs import JobState, PreparedJob, compact

if TYPE_CHECKING:
    from ray_qalloc.dispatch import Dispatcher

# Attempt outcomes that say nothing against the backend: it is not blocked for the job's next plan.
RESTING_OUTCOMES = ("running", "completed", "superseded", "requeued", "unreachable", "lost", "preempted",
                    "hedge_lost", "stopped")


def recover(d: Dispatcher) -> None:
    """Rebuild the queue from the store; re-attach to runs that were in flight."""
    to_reattach = []
    for rec in d.store.active():
        job = compact(rec.to_prepared())
        attempts = d.store.attempts(rec.id)
        blocked = frozenset(a["backend"] for a in attempts if a["outcome"] not in RESTING_OUTCOMES)
        view = d.view(job, blocked)
        if rec.state == JobState.QUEUED:
            d.enqueue(job, view, rec.created_at)
        else:
            to_reattach.append((job, view, rec, attempts))
    for job, view, rec, attempts in to_reattach:
        reattach(d, job, view, rec, attempts)


def reattach(d: Dispatcher, job: PreparedJob, view: Any, rec: Any, attempts: list[dict[str, Any]]) -> None:
    """Re-attach to the job's newest running attempt (a hedge's other attempt is closed)."""
    live = [a for a in attempts if a["outcome"] == "running"]
    attempt = max(live, key=lambda a: a["n"]) if live else None
    for a in live:
        if a is not attempt:
            d.store.close_attempt(job.id, a["n"], "superseded", "allocator restarted during a hedge")
    m = d.fleet.members.get(attempt["backend"]) if attempt else None
    actor = d.fleet.actor_of(m.spec.name) if m else None
    if attempt is None or m is None or actor is None:
        if attempt is not None:
            d.store.end_attempt(job.id, attempt["n"], "requeued", "allocator restarted", then="requeue")
        d.enqueue(job, view, rec.created_at)
        return
    p = d.plan_for(view)
    predicted = attempt.get("predicted_s") or 1.0
    r = Running(job, view, p, m.spec.name, attempt["n"], attempt["started_at"], predicted,
                created_at=rec.created_at)
    d.sched.start(job.id, m.spec.name, attempt["started_at"], predicted, job.priority.value)
    if attempt.get("provider_job_id"):
        ref = actor.reattach.remote(job.id, r.attempt, attempt["provider_job_id"], job.shots,
                                    payload=job.payload)   # an estimator job's observables
    else:
        ref = actor.attach.remote(job.id, r.attempt)
    d.attach(r, ref)


__all__ = ["RESTING_OUTCOMES", "reattach", "recover"]
