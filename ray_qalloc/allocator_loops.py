"""The allocator's background loops: dispatch passes, health rounds, hedging, history export,
operations rounds (gauges, alerts, threat-action expiry, predictive scaling), learning (the
bandit's state, retraining) and the cost model's hot reload.

Why a mixin of its own: these are one concern — what the allocator does by itself, on a
timer or a kick — apart from what callers ask of it (``allocator.py``, the facade) and from
the job path (``dispatch.py``). They run on the allocator actor's one event loop and use its
parts (``self.d``, ``self.fleet``, ``self.store``, ``self.settings``, ...). Every loop outlives
its own failures: a round that raises is logged, and the next round tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine

import ray

from ray_qalloc.autoscale import Requester, waiting_for
from ray_qalloc.config import Settings

if TYPE_CHECKING:
    from ray_qalloc.backendlog import BackendLog
    from ray_qalloc.costmodel.bandit import BanditStore
    from ray_qalloc.costmodel.history import RunHistory
    from ray_qalloc.costmodel.registry import ArtifactWatcher
    from ray_qalloc.dashboard import Timeline
    from ray_qalloc.dispatch import Dispatcher
    from ray_qalloc.fidelity_meter import FidelityMeter
    from ray_qalloc.fleet import Fleet
    from ray_qalloc.membership import Membership
    from ray_qalloc.store import JobStore
    from ray_qalloc.tenants import TenantStore

log = logging.getLogger("ray_qalloc.allocator")


class AllocatorLoops:
    """Mixed into ``Allocator``, whose parts these methods use."""

    settings: Settings
    d: Dispatcher
    fleet: Fleet
    store: JobStore
    history: RunHistory
    fidelity_meter: FidelityMeter
    backend_log: BackendLog
    bandit_store: BanditStore
    membership: Membership
    timeline: Timeline
    calwatch: Any                 # calwatch.CalibrationWatch or calhub.HubWatch
    alerts: Any                   # alerts.service.AlertService, when alerts are enabled (live config swaps it)
    retrain: Any                  # costmodel.retrain.RetrainLoop, when retraining is enabled
    scaling: Any                  # predictive.PredictiveController, when scaling is enabled
    _injected: Any
    _kick: asyncio.Event
    _watcher: ArtifactWatcher
    _autoscale: Requester
    _tenants: TenantStore
    # ThreatOps' (allocator_threat.py): the threat rules' loop, and what an operations round asks of it
    _threat_loop: Callable[[], Coroutine[Any, Any, None]]
    _expire_threat_actions: Callable[[float], Coroutine[Any, Any, None]]
    _scaling_tick: Callable[[float], Coroutine[Any, Any, None]]

    def _start_loops(self) -> list[asyncio.Task]:
        """Start every loop on the running event loop (once the allocator has started)."""
        loop = asyncio.get_running_loop()
        return [loop.create_task(self._scheduler()), loop.create_task(self._health_loop()),
                loop.create_task(self._history_loop()), loop.create_task(self._hedge_loop()),
                loop.create_task(self.calwatch.run()), loop.create_task(self._ops_loop()),
                loop.create_task(self._threat_loop()), loop.create_task(self._learning_loop())]

    # ---- dispatch ------------------------------------------------------------------------------
    async def _scheduler(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self.d.apply(self.d.decide(time.time()))
            except Exception:  # never let the loop die; the next kick retries
                log.exception("dispatch pass failed")

    # ---- health --------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                if self._injected is None:
                    await self.fleet.tick()
                    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                    busy = {r.backend for r in self.d._all_runs()}
                    self.d.members_removed(self.fleet.prune_dead_pools(alive, busy, time.time()))
                else:
                    await asyncio.gather(*(self.fleet.probe(h) for h in self.fleet.hosts.values()),
                                         return_exceptions=True)
                self.membership.sweep()
                if self._injected is None and any(h.elastic for h in self.fleet.hosts.values()):
                    self._elastic_tick(ray.cluster_resources())
            except Exception:  # never let the health loop die
                log.exception("health tick failed")
            try:
                await self.d.db(self.backend_log.flush)
            except Exception:  # the change stream misses nothing: the rows stay noted until a flush works
                log.exception("backend log flush failed")
            self._poll_model()

    def _health_changed(self, backend: str, up: bool, at: float) -> None:
        host = self.fleet.hosts.get(backend)
        provider = host.provider if host is not None else None
        why = "" if up else (f"out of service at its provider: {provider.message}"
                             if provider is not None and not provider.operational else "not answering")
        self.backend_log.note(backend, "up" if up else "down", why, at)

    def _elastic_tick(self, cluster: dict[str, float]) -> None:
        """Keep the autoscaling request in step with what queued jobs wait for; start and stop
        elastic QPU backends."""
        waiting = [waiting_for(q.plan) for q in self.d.queued.values()]
        wanted = {b for w in waiting for b in w[:1]}
        busy = {r.backend for r in self.d.running.values()}
        self.fleet.elastic_tick(wanted, busy, cluster)
        try:
            self._autoscale.update(waiting, cluster)
        except Exception as exc:  # no autoscaler here, or the GCS is busy: try next tick
            log.debug("autoscaling request not sent: %s", exc)

    def _calibration_changed(self, names: list[str]) -> None:
        """New calibrations arrived: queued jobs are planned again against them (fidelity,
        coherence budget, freshness), each keeping its place in line."""
        log.info("calibration changed on %s: planning the queue again", ", ".join(names))
        self.d.replan_queued()

    # ---- operations: gauges, alerts, threat actions' expiry, predictive scaling -------------------
    async def _ops_loop(self) -> None:
        """Gauges of the allocator's state, and one alert evaluation, every ``alerts.interval_s``."""
        while True:
            await asyncio.sleep(self.settings.alerts.interval_s)
            try:
                await self.ops_tick()
            except Exception:  # never let the loop die; the next round decides again
                log.exception("operations round failed")

    async def ops_tick(self, now: float | None = None) -> dict[str, Any]:
        """One round: refresh state gauges; evaluate the alert rules on a snapshot (commit, then
        apply); returns what the evaluation sent."""
        from ray_qalloc import opsview

        from ray_qalloc import dashboard

        now = time.time() if now is None else now
        await self._expire_threat_actions(now)
        if self.scaling is not None:
            await self._scaling_tick(now)
        opsview.record_gauges(self, now)
        self.timeline.sample(now, dashboard.utilisation(self), dashboard.queue_by_class(self))
        if self.alerts is None:
            return {"events": 0}
        obs = self.d.observer.observations(
            queue_waits=opsview.queue_waits(self.d.queued.values(), now),
            breakers={n: m.breaker for n, m in self.fleet.members.items()},
            calibrated_at=opsview.calibrated_at(self.calwatch, self.fleet),
            quotas=await self.d.db(opsview.quotas, self._tenants, self.d), node_memory=opsview.node_memory(self.fleet),
            now=now)
        decision = await self.d.db(self.alerts.evaluate, obs)
        return {"events": len(decision.events), "errors": list(decision.errors)}

    # ---- hedging -------------------------------------------------------------------------------
    async def _hedge_loop(self) -> None:
        """Overrunning simulator runs: remember the overrun, start a backup where it pays."""
        from ray_qalloc import overruns

        interval = self.settings.hedge.interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await overruns.tick(self.d, self.settings, time.time())
            except Exception:
                log.exception("hedge tick failed")

    # ---- learning: the model's hot reload, the bandit's state, retraining ----------------------
    def _poll_model(self) -> None:
        """Pick up a newly published model artifact without a restart (new plans use it)."""
        try:
            fresh = self._watcher.poll()
        except Exception:  # a half-written registry must not stop the allocator
            log.exception("model registry poll failed")
            return
        if fresh is not None:
            log.warning("cost model switched to %s", self._watcher.current)
            from ray_qalloc.costmodel import policy as learning_policy

            self.d.predictor = learning_policy.wrap(fresh, self.d.predictor, learning=self.settings.learning,
                                                    explore_factor=self.settings.placement.explore_factor,
                                                    weights=self.settings.placement.table())
            from ray_qalloc.liveconfig import _explore

            _explore(self.d.predictor, self.settings.placement.explore_factor)

    def _urgent_waiting(self) -> bool:
        """Retraining runs at batch priority: not while emergency or high-priority jobs wait."""
        return any(q.job.priority.value in ("emergency", "high") for q in self.d.queued.values())

    async def _learning_loop(self) -> None:
        """Save the bandit's state every ``learning.save_s``; step the retraining loop every
        ``learning.retrain.check_s`` (both in the store thread: they touch the database)."""
        from ray_qalloc.costmodel.policy import bandit_of

        learning = self.settings.learning
        last_check = time.time()
        while True:
            await asyncio.sleep(learning.save_s)
            bandit = bandit_of(self.d.predictor)
            try:
                if bandit is not None:
                    await self.d.db(self.bandit_store.save, bandit.snapshot())
                if self.retrain is not None and (self.retrain.state != "idle"
                                                 or time.time() - last_check >= learning.retrain.check_s):
                    last_check = time.time()
                    await self.d.db(self.retrain.tick)
            except Exception:  # never let the loop die; the next round tries again
                log.exception("learning round failed")

    # ---- run history export ----------------------------------------------------------------------
    async def _history_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.history_flush_s)
            try:
                await self.d.db(self._flush_history)
            except Exception:  # the store keeps the rows; the next flush retries
                log.exception("history flush failed")

    def _flush_history(self) -> int:
        rows = self.store.unexported_runs()
        if not rows:
            return self.fidelity_meter.export(self.history)
        self.history.append(rows)
        self.store.mark_exported(r["id"] for r in rows)
        return len(rows) + self.fidelity_meter.export(self.history)


__all__ = ["AllocatorLoops"]
