"""The life of a run: launch it on its backend, watch it, complete it, fail it over, stop it.

Why a mixin of its own: these are one concern — what happens to an attempt after the pass
decided and the store committed it — over the dispatcher's state (one event loop, one store
thread). Failover follows SkyPilot: an attempt that dies with its actor, times out or raises
a backend error is placed again with that backend blocked; the attempts table keeps the
history. A run stopped on purpose (cancel, a lost hedge, preemption) is only closed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable

from ray_qalloc.config import Settings
from ray_qalloc.exceptions import BackendError
from ray_qalloc.fleet import ACTOR_GONE, Fleet
from ray_qalloc.inflight import Queued, Running
from ray_qalloc.jobs import JobState, PreparedJob
from ray_qalloc.observer import Observer
from ray_qalloc.placement import JobView, Plan, explain
from ray_qalloc.placement.scheduler import Run, Scheduler
from ray_qalloc.store import JobStore

log = logging.getLogger("ray_qalloc.dispatch")

_FINISHED_KEEP = 10_000
# A run off its prediction by more than this factor (either way) re-plans the queued jobs of
# its circuit: memory now knows better than the plans they were given.
_REPLAN_LOG_RATIO = math.log(2.0)


class RunLife:
    """Mixed into ``Dispatcher``, whose state these methods use."""

    settings: Settings
    store: JobStore
    fleet: Fleet
    sched: Scheduler
    predictor: Any
    kick: Callable[[], None]
    observer: Observer
    running: dict[str, Running]
    choices: dict[str, dict[str, Any]]
    flags: dict[str, str]
    waiters: dict[str, list[asyncio.Future[None]]]
    finished: collections.OrderedDict[str, dict[str, Any]]
    _preempting: dict[str, str]
    _restarting: dict[str, str]
    restarted: set[str]
    restarts: int
    _stopping: set[tuple[str, int]]
    db: Callable[..., Any]
    enqueue: Callable[..., None]
    plan_for: Callable[[JobView], Plan]
    annotated: Callable[[dict[str, Any]], dict[str, Any]]
    replan_circuit: Callable[..., int]

    # ==== runs ===================================================================================
    def launch(self, q: Queued, name: str, attempt: int, *, started_at: float | None = None,
               predicted_s: float | None = None, primary: Running | None = None,
               sched_id: str = "") -> Running:
        """Call the executor; the store already says RUNNING, the scheduler counts the run."""
        m = self.fleet.members[name]
        est = q.plan.estimates.get(name)
        predicted = predicted_s if predicted_s is not None else (est.runtime_s if est is not None else 1.0)
        r = Running(q.job, q.view, q.plan, name, attempt, started_at or time.time(), predicted,
                    created_at=q.created_at, sched_id=sched_id,
                    primary=primary)
        if primary is None:
            self.running[q.job.id] = r
            self.observer.on_decision("placed")
            self.observer.on_started(q.job.priority.value, name, r.started_at - q.created_at, job_id=q.job.id,
                                     reason=self.choices.get(q.job.id, {}).get("reason"))
        else:
            primary.backup = r
        try:
            ref = self.fleet.actor_of(name).run.remote(q.job.id, attempt, q.job.payload, q.job.shots,
                                                       **m.run_kwargs)
        except Exception as exc:  # no actor (gone, elastic and stopped), a bad call: this attempt failed
            r.task = None
            outcome = "actor_died" if self.fleet.actor_of(name) is None else "error"
            asyncio.ensure_future(self._ended(r, outcome, f"{type(exc).__name__}: {exc}"))
            return r
        r.task = asyncio.get_running_loop().create_task(self._watch(r, ref))
        return r

    def attach(self, r: Running, ref: Any) -> None:
        """Watch a run started before a restart (re-attached by the caller)."""
        self.running[r.job.id] = r
        r.task = asyncio.get_running_loop().create_task(self._watch(r, ref))

    def _timeout(self, r: Running) -> float:
        """The last line of defence (hedging is the first): a run that never ends is failed over."""
        return max(self.settings.run_timeout_floor_s, self.settings.run_timeout_factor * r.predicted_s)

    async def _watch(self, r: Running, ref: Any) -> None:
        try:
            elapsed = time.time() - r.started_at
            result = await asyncio.wait_for(_aref(ref), max(self._timeout(r) - elapsed, 1.0))
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self.stop(r)
            await self._ended(r, "timed_out", f"no result after {self._timeout(r):.0f} s")
            return
        except Exception as exc:  # noqa: BLE001 - classified: every failure ends this attempt
            outcome, error = _classify(exc)
            await self._ended(r, outcome, error)
            return
        if result is None:  # re-attach found nothing: the run was lost with its actor
            await self._ended(r, "lost", "the executor no longer knew this run", block=False)
            return
        await self.complete(r, result)

    async def _ended(self, r: Running, outcome: str, error: str, *, block: bool = True) -> None:
        """An attempt ended without a result. A run stopped on purpose is only closed; a run whose
        twin (hedge) still runs is closed and the twin goes on; otherwise the job fails over."""
        if not self._is_live(r):   # already handled (an unreachable pool, then the run's own error)
            return
        key = (r.job.id, r.attempt)
        if key in self._stopping:
            self._stopping.discard(key)
            if r.job.id in self._preempting and r.primary is None:
                self._preempting.pop(r.job.id, None)
                self._forget(r)
                await self.requeue_preempted(r)
                return
            if r.job.id in self._restarting and r.primary is None:
                reason = self._restarting.pop(r.job.id)
                self._forget(r)
                await self.requeue_restarted(r, reason)
                return
            self._forget(r)
            return
        if outcome == "stopped":   # stopped, but not by us (a pool restarting): place it again
            block = False
        twin = r.backup if r.primary is None else r.primary
        if twin is not None and self._is_live(twin):
            log.warning("job %s attempt %d on %s: %s (%s); its other attempt goes on",
                        r.job.id, r.attempt, r.backend, outcome, error)
            self._count_failure(r.backend, outcome)
            self._forget(r)
            await self.db(self.store.close_attempt, r.job.id, r.attempt, outcome, error)
            return
        await self.failover(r, outcome, error, block=block)

    def _is_live(self, r: Running) -> bool:
        main = self.running.get(r.job.id)
        return main is r or (main is not None and main.backup is r)

    def _forget(self, r: Running) -> None:
        """Drop a run from memory and the scheduler's books (its store row is handled by the caller)."""
        main = self.running.get(r.job.id)
        if r.primary is not None:          # a backup
            if r.primary.backup is r:
                r.primary.backup = None
        elif main is r:
            if r.backup is not None:       # the backup becomes the job's run
                b = r.backup
                b.primary = None
                self.running[r.job.id] = b
            else:
                self.running.pop(r.job.id)
        self.sched.finish(r.sched_id)

    def _count_failure(self, backend: str, outcome: str) -> None:
        if outcome in ("actor_died", "timed_out"):
            self.fleet.mark_unhealthy(backend)
        if outcome in ("actor_died", "timed_out", "backend_error", "error"):
            self.fleet.run_failed(backend)

    async def complete(self, r: Running, result: dict[str, Any]) -> None:
        arrived = time.time()
        twin = r.backup if r.primary is None else r.primary
        self._forget(r)
        if twin is not None and self._is_live(twin):   # the first result wins; stop the other run
            self.stop(twin)
            self._forget(twin)
        self.running.pop(r.job.id, None)
        self.fleet.run_succeeded(r.backend)
        self._preempting.pop(r.job.id, None)
        self._restarting.pop(r.job.id, None)
        self._stopping.discard((r.job.id, r.attempt))
        result = dict(result)
        result["queue_s"] = r.started_at - (r.created_at or r.started_at)
        result["launched_at"] = r.started_at
        result.setdefault("backend", r.backend)
        meta = result["metadata"] = dict(result.get("metadata") or {})
        # where the time went, per hop (the overhead benchmark reads it): wall-clock stamps of one
        # machine's clock, so hops across processes on one node compare
        meta["timeline"] = {"accepted_at": r.accepted_at or None, "committed_at": r.committed_at or None,
                              "launched_at": r.started_at, "run_started_at": meta.get("received_at"),
                              "run_finished_at": meta.get("finished_at"), "result_at_allocator": arrived}
        recorded = await self.db(self.store.complete, r.job.id, r.attempt, result)
        if twin is not None:
            await self.db(self.store.close_attempt, r.job.id, twin.attempt, "hedge_lost",
                          f"attempt {r.attempt} on {r.backend} finished first")
            self._remember_bound(twin, time.time() - twin.started_at)
        if recorded and r.attempt == 1:
            meta["timeline"]["completed_at"] = time.time()
            self._remember_final(r, result)
        if recorded:
            self.learn(r, result)
            self.observer.on_finished(r.job.priority.value, "completed", deadline_s=r.job.deadline_s,
                                      created_at=r.created_at)
        self._done(r.job.id)
        self.kick()

    def learn(self, r: Running, result: dict[str, Any]) -> None:
        """Online correction: tell the model how long the run really took."""
        m = self.fleet.members.get(r.backend)
        if m is None:
            return
        meter = getattr(self, "fidelity_meter", None)   # measured QPU fidelity, off this loop (#13)
        if meter is not None and m.spec.kind == "qpu":
            meter.submit(r, result, m)
        actual = result.get("qpu_s") if m.spec.kind == "qpu" else result.get("wall_s")
        if not actual:
            return
        self.observer.on_completed(r.backend, m.spec.method or m.spec.kind, r.predicted_s, float(actual))
        observe = getattr(self.predictor, "observe", None)
        if observe is not None:
            observe(r.backend, r.predicted_s, float(actual))
        for hook in getattr(self, "learn_hooks", ()):   # the retraining loop's drift and shadow (#13)
            hook(r.view, m.spec, r.predicted_s, float(actual))
        remember = getattr(self.predictor, "remember", None)
        if remember is not None and m.spec.kind == "simulator":
            remember(r.view, m.spec, float(actual), censored=False, predicted_s=r.predicted_s)
            if abs(math.log(max(float(actual), 1e-6) / max(r.predicted_s, 1e-6))) > _REPLAN_LOG_RATIO:
                self.replan_circuit(r.view.circuit_key, r.backend, _REPLAN_LOG_RATIO)

    def _remember_bound(self, r: Running, elapsed_s: float) -> None:
        """A run that lost its race took longer than the winner: remembered as a lower bound, so
        the next job of the circuit is planned with it (and not probed there again)."""
        remember = getattr(self.predictor, "remember", None)
        m = self.fleet.members.get(r.backend)
        if remember is not None and m is not None and m.spec.kind == "simulator" and elapsed_s > 0:
            remember(r.view, m.spec, elapsed_s, censored=True, predicted_s=r.predicted_s)

    def _remember_final(self, r: Running, result: dict[str, Any]) -> None:
        job, now = r.job, time.time()
        self.finished[job.id] = {
            "id": job.id, "tenant": job.tenant, "state": JobState.COMPLETED.value,
            "priority": job.priority.value, "intent": job.intent.value, "shots": job.shots,
            "deadline_s": job.deadline_s, "fidelity_min": job.fidelity_min, "num_qubits": job.num_qubits,
            "created_at": r.created_at, "updated_at": now, "backend": r.backend, "attempts": 1, "error": None,
            "flag": self.flags.get(job.id),
            "result": result,
            "attempt_history": [{"attempt": 1, "backend": r.backend, "outcome": "completed",
                                 "started_at": r.started_at, "finished_at": now, "error": None}],
        }
        while len(self.finished) > _FINISHED_KEEP:
            self.finished.popitem(last=False)

    async def failover(self, r: Running, outcome: str, error: str, *, block: bool = True) -> None:
        self._forget(r)
        if self._preempting.pop(r.job.id, None) is not None and outcome in ("actor_died", "error"):
            await self.requeue_preempted(r)
            return
        reason = self._restarting.pop(r.job.id, None)
        if reason is not None and outcome in ("actor_died", "error"):
            await self.requeue_restarted(r, reason)
            return
        log.warning("job %s attempt %d on %s: %s (%s)", r.job.id, r.attempt, r.backend, outcome, error)
        self._count_failure(r.backend, outcome)
        self.observer.on_attempt_failed(r.backend, outcome)
        self.observer.on_decision("failover")
        blocked = r.view.blocked | {r.backend} if block else r.view.blocked
        view = replace(r.view, blocked=blocked)
        if r.attempt >= self.settings.max_attempts:
            await self.db(self.store.end_attempt, r.job.id, r.attempt, outcome, error, then="fail")
            self.observer.on_finished(r.job.priority.value, "failed", deadline_s=r.job.deadline_s,
                                      created_at=r.created_at)
            self._done(r.job.id)
            return
        if not await self.db(self.store.end_attempt, r.job.id, r.attempt, outcome, error, then="failover"):
            return  # cancelled or already finished
        p = self.plan_for(view)
        if hopeless(p) and outcome == "actor_died" and r.backend not in r.view.blocked:
            # the only backend(s) it may use died: Ray restarts the actor (here or on another
            # node), so the job waits for it instead of failing; max_attempts bounds the retries
            view = r.view
            p = self.plan_for(view)
        if hopeless(p):
            await self.give_up(r.job.id, f"attempt {r.attempt} failed on {r.backend} ({outcome}) and no other "
                                         "backend can run it", p, job=r.job, created_at=r.created_at)
            return
        self.enqueue(r.job, view, r.created_at, p)
        self.kick()

    async def requeue_preempted(self, r: Running) -> None:
        """Back to the queue (same place in line), not failed over: the backend is fine."""
        if not await self.db(self.store.end_attempt, r.job.id, r.attempt, "preempted",
                             "stopped for an emergency job", then="requeue"):
            return
        self.enqueue(r.job, r.view, r.created_at, r.plan)
        self.kick()

    async def requeue_restarted(self, r: Running, reason: str) -> None:
        """Back to the queue (same place in line) without the backend that overran, planned again
        with what run memory now knows of the circuit (``restart``)."""
        if not await self.db(self.store.end_attempt, r.job.id, r.attempt, "restarted", reason, then="requeue"):
            return
        view = replace(r.view, blocked=r.view.blocked | {r.backend})
        p = self.plan_for(view)
        if hopeless(p):
            await self.give_up(r.job.id, f"restarted after overrunning on {r.backend}, and no other backend can "
                                         "run it", p, job=r.job, created_at=r.created_at)
            return
        self.enqueue(r.job, view, r.created_at, p)
        self.kick()

    async def give_up(self, job_id: str, error: str, p: Plan, *, job: PreparedJob | None = None,
                      created_at: float | None = None) -> None:
        await self.db(self.store.save_explanation, job_id, self.annotated(explain(p, None)))
        await self.db(self.store.fail, job_id, error)
        if job is not None:
            self.observer.on_finished(job.priority.value, "failed", deadline_s=job.deadline_s,
                                      created_at=created_at)
        self._done(job_id)

    def _done(self, job_id: str) -> None:
        """The job ended: wake its waiters; forget what only live jobs need."""
        self.choices.pop(job_id, None)
        self.flags.pop(job_id, None)
        self.restarted.discard(job_id)
        for fut in self.waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)

    def notify(self, job_id: str) -> None:
        self._done(job_id)

    # ==== stopping runs =========================================================================
    def stop(self, r: Running) -> None:
        """Stop a run where it runs: a pool kills the run's worker (its cores free at once); a QPU
        run is left to finish (it is not stopped, and its late result is ignored)."""
        if r.task is not None and not r.task.done() and r.task is not asyncio.current_task():
            r.task.cancel()
        m = self.fleet.members.get(r.backend)
        actor = self.fleet.actor_of(r.backend)
        if m is None or actor is None or m.spec.pool is None:
            return
        try:
            actor.stop.remote(r.job.id, r.attempt)
        except Exception:  # the pool is gone: its runs went with it
            pass

    def cancel_running(self, job_id: str) -> None:
        r = self.running.pop(job_id, None)
        if r is None:
            return
        for run in (r, r.backup):
            if run is not None:
                self.stop(run)
                self.sched.finish(run.sched_id)
        self._done(job_id)

    def _stop_in_pool(self, r: Running) -> bool:
        """Ask the run's pool to stop it on purpose (``_ended`` then sees it in ``_stopping``);
        False where there is no pool to ask (a QPU, a gone pool, injected fakes)."""
        m = self.fleet.members.get(r.backend)
        actor = self.fleet.actor_of(r.backend)
        if m is None or m.spec.pool is None or actor is None:
            return False
        key = (r.job.id, r.attempt)
        self._stopping.add(key)
        try:
            actor.stop.remote(r.job.id, r.attempt)
            return True
        except Exception:   # the pool went away: the caller ends the watch itself
            self._stopping.discard(key)
            return False

    def preempt(self, run: Run, for_job: str) -> None:
        """Stop a batch simulator run for an emergency job; the batch job goes back to the queue
        keeping its place (nothing is lost). Only the run is stopped, not its pool."""
        r = self.running.get(run.job_id)
        if r is None or run.job_id in self._preempting or r.backend != run.backend:
            return
        log.warning("preempting batch job %s on %s for emergency job %s", run.job_id, run.backend, for_job)
        self._preempting[run.job_id] = run.backend
        if self._stop_in_pool(r):
            return
        if r.task is not None:   # injected fakes: end the watch; the job is requeued
            r.task.cancel()
            self._preempting.pop(r.job.id, None)
            self._forget(r)
            asyncio.ensure_future(self.requeue_preempted(r))


    def restart(self, r: Running, reason: str) -> bool:
        """Stop an overrunning run that could get no backup and place its job again without that
        backend (``placement.hedging.decide_restarts``); once per job. Only the run is stopped."""
        if (self.running.get(r.job.id) is not r or r.backup is not None or r.backup_pending
                or r.job.id in self._preempting or r.job.id in self._restarting or r.job.id in self.restarted):
            return False
        log.warning("job %s: %s", r.job.id, reason)
        self.restarted.add(r.job.id)
        self.restarts += 1
        self._restarting[r.job.id] = reason
        if self._stop_in_pool(r):
            return True
        if r.task is not None:   # no pool to stop it in (injected fakes): end the watch, place it again
            r.task.cancel()
        self._restarting.pop(r.job.id, None)
        self._forget(r)
        asyncio.ensure_future(self.requeue_restarted(r, reason))
        return True


def _classify(exc: BaseException) -> tuple[str, str]:
    """(outcome, error) of an attempt that raised. Ray re-raises a remote exception as a class
    deriving from both RayTaskError and the cause, so the cause decides."""
    from ray_qalloc.backends.pool_actor import RunStopped

    cause = getattr(exc, "cause", None) or exc
    text = f"{type(cause).__name__}: {str(cause)[:500]}"
    if isinstance(exc, ACTOR_GONE):
        return "actor_died", f"{type(exc).__name__}: {str(exc)[:300]}"
    if isinstance(cause, RunStopped) or isinstance(exc, RunStopped):
        return "stopped", text
    if isinstance(cause, BackendError) or isinstance(exc, BackendError):
        return "backend_error", str(cause)[:500]
    return "error", text


def hopeless(p: Plan) -> bool:
    """No backend can run it and waiting would not help (every filter said 'unresolvable')."""
    return not p.estimates and all(s.code == "unresolvable" for s in p.filtered.values())


async def _aref(ref: Any) -> Any:
    return await ref
