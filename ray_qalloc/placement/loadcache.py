"""Cached per-backend load: refreshed for one node when a run starts or ends there, never per
decision; and the views of it that callers read (``live``, ``predicted_wait``).

Why apart: this cache is what keeps a pass independent of the queue's length and of the
number of nodes; it has one formula (``load.backend_load``) and one refresh path, which the
invariant check recomputes from scratch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from ray_qalloc.placement.load import BackendSlotState, LiveView, Run, backend_load, emergency_threads
from ray_qalloc.placement.model import LiveState


class _Cores(dict[str, float]):
    """node -> cores. A plain dict to its readers (callers write it directly), but a changed
    count refreshes that node's cached load at once, so a write cannot leave the cache stale."""

    def __init__(self, data: Mapping[str, float], on_change: Callable[[str, float | None], None]) -> None:
        super().__init__(data)
        self._on_change = on_change

    def __setitem__(self, node: str, cpus: float) -> None:
        old = self.get(node)
        super().__setitem__(node, cpus)
        if old != cpus:
            self._on_change(node, old)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for node, cpus in dict(*args, **kwargs).items():
            self[node] = cpus


def _first_core_run(rows: tuple[tuple[str, BackendSlotState, int, int], ...]) -> Run | None:
    """``first_core_run`` over a node's cached rows (the same loop and tie-break)."""
    best: Run | None = None
    for _, b, threads, _ in rows:
        if threads > 0:
            for r in b.runs.values():
                if best is None or r.ends < best.ends or (r.ends == best.ends and r.started < best.started):
                    best = r
    return best


class LoadCache:
    """The load half of ``Scheduler`` (a mixin: the state lives on the scheduler)."""

    def busy_threads(self, node: str) -> float:
        """Threads our runs use on ``node`` now (what its measured CPU should mostly be)."""
        return max(self._node_busy.get(node, 0.0), 0.0)

    def _cores_changed(self, node: str, old: float | None) -> None:
        if old is not None and self.node_cpus[node] < old and self._node_busy.get(node, 0.0) > 0:
            self._forced.add(node)
        self._refresh_node(node)

    def set_reserved(self, reserved: Mapping[str, int]) -> None:
        """Slots (of a backend) or cores (of a pool) kept for emergency jobs, now: every node's
        load is recomputed, since what a non-emergency job may start on moved."""
        clean = {k: int(v) for k, v in reserved.items() if int(v) > 0}
        if dict(self.config.reserved) != clean:
            self.config = dataclasses.replace(self.config, reserved=clean)
        # always: a caller that replaced ``config`` whole (live configuration) left the cache behind
        for node in list(self._nodes):
            self._refresh_node(node)

    def _refresh_node(self, node: str, changed: str | None = None, busy_before: float | None = None) -> None:
        """Recompute free_at / can_start of the backends of one node.

        With ``changed`` (a run started or ended there) only that backend and those whose
        core budget is or was short are recomputed: the others' state did not move. A pool
        with reserved cores is recomputed whole (its hold moves with its emergency runs).
        A backend with a free slot and none reserved (every pool variant) is computed inline,
        as ``backend_load`` would (the invariant check compares it with that formula): it runs
        twice per dispatch, for every backend of the node."""
        backends = self.backends
        names = self._nodes.get(node, ())
        rows = self._node_rows.get(node)
        if rows is None:
            rows = self._node_rows[node] = self._rows_of(node)
        cores = self.node_cpus.get(node, 1.0)
        busy = self._node_busy.get(node, 0.0)
        reserved = self.config.reserved
        node_hold = reserved.get(node, 0) if reserved else 0
        pool_hold = node_hold
        if pool_hold:
            pool_hold = max(pool_hold - emergency_threads(backends[n] for n in names), 0)
        partial = changed is not None and not node_hold
        before = busy_before or 0.0
        free_cores, free_before = cores - busy, cores - before
        groups = self._holds.groups
        startable = self._startable
        inf = math.inf
        first: Run | None = None
        first_known = False
        moved = False     # a slot freed here: jobs that declined its node may decide otherwise
        for name, b, threads, slots in rows:
            if (partial and name != changed
                    and (threads <= 0 or (free_cores >= threads and free_before >= threads))):
                continue
            short_e = threads > 0 and free_cores < threads
            short = threads > 0 and free_cores - pool_hold < threads
            if short and not first_known:
                first, first_known = _first_core_run(rows), True
            was_can, was_at, was_can_e, was_at_e = b.can_start, b.free_at, b.can_start_emergency, b.free_at_emergency
            never = threads > 0 and cores - node_hold < threads
            hold = reserved.get(name, 0) if reserved else 0
            if not hold and slots > len(b.runs):
                # backend_load with a free slot and nothing reserved: only the node's cores count
                at = inf if never and short else 0.0
                started = at_e = started_e = 0.0
                if first is not None:
                    if short and first.ends > at:
                        at, started = first.ends, first.started
                    if short_e and first.ends > at_e:
                        at_e, started_e = first.ends, first.started
                can_e = b.healthy and not short_e
                can = can_e and not short
                b.free_at, b.free_run_started, b.can_start = at, started, can
                b.free_at_emergency, b.free_run_started_emergency, b.can_start_emergency = at_e, started_e, can_e
            else:
                (b.free_at, b.free_run_started, b.can_start,
                 b.free_at_emergency, b.free_run_started_emergency, b.can_start_emergency) = backend_load(
                    b.spec, b.healthy, b.runs.values(), hold, short, short_e, first, never=never)
                can, can_e = b.can_start, b.can_start_emergency
            if name in groups:
                if ((not can and (was_can or b.free_at > was_at))
                        or (not can_e and (was_can_e or b.free_at_emergency > was_at_e))):
                    # its waiters chose it at a shorter wait: those past their threshold decide again
                    self._unhold(self._holds.outgrown(name, b.free_at if not can else inf,
                                                      b.free_at_emergency if not can_e else inf))
                if ((can and not was_can) or (can_e and not was_can_e)) and name in groups:
                    # its waiters are in its index, read by this pass in their places: their work
                    # must not count ahead of jobs before them in line
                    self._unhold(self._holds.release(name))
            if (can and not was_can) or (can_e and not was_can_e):
                moved = True
            if can_e:
                startable[name] = None
            else:
                startable.pop(name, None)
        if moved or not partial:
            declined = self._declined
            for name in names:
                if declined:
                    declined.pop(name, None)
                if not partial and name in groups:
                    self._unhold(self._holds.release(name))

    def _rows_of(self, node: str) -> tuple[tuple[str, BackendSlotState, int, int], ...]:
        """(name, state, threads, slots) of a node's backends, in ``_nodes`` order: what a
        refresh reads of each, cached per node (``_node_rows``) and dropped whenever a backend
        joins, leaves or moves (``Scheduler.add_backend``, ``remove_backend``, ``set_node``)."""
        backends = self.backends
        return tuple((n, backends[n], backends[n].spec.threads, backends[n].spec.slots)
                     for n in self._nodes.get(node, ()))

    def live(self, now: float, *, emergency: bool = False) -> dict[str, LiveState]:
        """Predicted wait and can-start per backend, as seen by a job of that class."""
        view = LiveView(self, now, emergency)
        return {name: view[name] for name in self.backends}

    def predicted_wait(self, name: str, now: float) -> float:
        """Queue-wait prediction for a new job on ``name``: remaining work running there plus
        the work queued that prefers it, spread over its slots."""
        b = self.backends[name]
        if not b.healthy:
            return math.inf
        running_left = sum(r.remaining(now) for r in b.runs.values())
        return (running_left + b.queued_work_s) / max(b.spec.slots, 1) + b.external_wait_s
