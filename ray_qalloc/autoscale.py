"""Ask Ray's autoscaler for the nodes that queued jobs wait for, and let it give them back.

Why this exists: a backend runs on the nodes that offer its custom resource
``qalloc_backend_<name>`` (``cluster.yaml`` declares them per node type). The allocator keeps
jobs in its own queue, not as pending Ray tasks, so Ray sees no demand for a node type that
is scaled to zero: a job that only ``aer_statevector_gpu`` can run would wait forever while
the GPU worker type sits at ``min_workers: 0``. ``ray.autoscaler.sdk.request_resources`` is
Ray's way for an application to say "make room for these resource shapes"; the autoscaler
launches the node types whose ``resources:`` fit them.

A request is persistent: it stays until the next call replaces it, and the autoscaler never
scales below it. So the request must be cleared (``bundles=[]``) once nothing waits any more,
or the nodes it brought are kept forever; after that a node that holds no resources for
``idle_timeout_minutes`` is terminated. (A detached backend actor that holds its
``qalloc_backend_<name>`` slots keeps its node busy: an idle elastic backend's actor has to
be stopped for its node to be given back.)

Split: the pure functions (``waiting_for``, ``bundles_to_request``) decide and are unit
tested without Ray; ``request``, ``Requester`` and ``ensure`` talk to Ray. Nothing here
imports Ray at module level, so the allocator's tests and the placement code stay light.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from typing import Any, Callable, Collection, Iterable, Mapping, Protocol, Sequence

from ray_qalloc.backends.base import resource_name

log = logging.getLogger("ray_qalloc.autoscale")

Bundle = dict[str, float]

DEFAULT_MAX_PER_BACKEND = 1    # nodes' worth of slots asked for one backend
DEFAULT_MAX_BUNDLES = 8        # a bound on the whole request, whatever the queue holds


class _Status(Protocol):
    code: str


class PlanLike(Protocol):
    """What ``waiting_for`` reads of a ``ray_qalloc.placement.Plan``."""

    estimates: Mapping[str, Any]
    filtered: Mapping[str, _Status]


# ---- pure decisions --------------------------------------------------------------------------
def waiting_for(plan: PlanLike) -> list[str]:
    """The backends a queued job could run on, best first.

    Backends with an estimate come first, fastest predicted runtime first; then those a
    filter refused only *for now* (``unschedulable``: unhealthy, e.g. an actor whose node is
    not up yet), by name. Backends refused for good (``unresolvable``) are left out: a new
    node would not help.
    """
    est = sorted(plan.estimates.items(), key=lambda kv: (getattr(kv[1], "runtime_s", 0.0), kv[0]))
    later = sorted(b for b, s in plan.filtered.items() if s.code == "unschedulable")
    return [b for b, _ in est] + [b for b in later if b not in plan.estimates]


def bundles_to_request(waiting: Iterable[Sequence[str]], cluster: Mapping[str, float], *,
                       slots: Mapping[str, int] | None = None, held: Collection[str] = (),
                       max_per_backend: int = DEFAULT_MAX_PER_BACKEND,
                       max_bundles: int = DEFAULT_MAX_BUNDLES,
                       resource_of: Callable[[str], str] = resource_name) -> list[Bundle]:
    """The resource bundles to ask the autoscaler for, given what queued jobs wait for.

    ``waiting``: one entry per queued job, the backends it could run on, best first
    (``waiting_for(plan)``). ``cluster``: ``ray.cluster_resources()``. ``slots``: a backend's
    slots (default 1), the size of its bundle ``{"qalloc_backend_<name>": slots}``. ``held``:
    the backends of the previous request.

    A job asks for nothing when a backend it can use is offered by a node the cluster has
    anyway; otherwise it asks for its best backend. A backend that is offered only because
    it was requested (in ``held``) keeps being asked for while jobs still wait for it, so a
    node is not released from the request between arriving and being used. Each bundle shape
    (``resource_of(backend)``: the members of a pool share ``qalloc_pool_cpu``) gets at most
    ``max_per_backend`` bundles (one per waiting job), the whole request at most
    ``max_bundles`` (shapes with the most waiting jobs first). An empty list means "clear
    the request": nothing waits for a node, and idle nodes may be given back.
    """
    slots = slots or {}
    held = set(held)

    def size(b: str) -> float:
        return float(max(int(slots.get(b, 1)), 1))

    def offered(b: str) -> bool:
        return cluster.get(resource_of(b), 0.0) >= size(b)

    # Counted per bundle shape, not per backend name: every member of a pool (``cpu-elastic/mps``,
    # ``cpu-elastic/statevector``, ...) needs the same ``qalloc_pool_cpu`` node, and jobs that
    # wait for different methods of it must not ask for a node each.
    need: Counter[tuple[str, float]] = Counter()
    for backends in waiting:
        if not backends:
            continue  # nothing can run it; the allocator fails it, no node would help
        present = [b for b in backends if offered(b)]
        if present and not all(b in held for b in present):
            continue  # a node the cluster keeps anyway can run it: it waits for a slot, not a node
        best = present[0] if present else backends[0]
        need[(resource_of(best), size(best))] += 1
    order = sorted(need, key=lambda k: (-need[k], k))
    out: list[Bundle] = []
    for res, units in order:
        for _ in range(min(need[(res, units)], max(max_per_backend, 0))):
            if len(out) >= max(max_bundles, 0):
                return out
            out.append({res: units})
    return out


def backends_of(bundles: Iterable[Mapping[str, float]]) -> set[str]:
    """The backend names a request asks for (the ``held`` of the next decision)."""
    prefix = resource_name("")
    return {k.removeprefix(prefix) for bundle in bundles for k in bundle if k.startswith(prefix)}


# ---- talking to Ray ----------------------------------------------------------------------------
def request(bundles: Sequence[Mapping[str, float]]) -> None:
    """Replace this cluster's autoscaling request with ``bundles``; ``[]`` clears it.

    Needs a connected Ray (``ray.init``) on a cluster with an autoscaler (``ray up``, KubeRay,
    or Ray's fake multinode provider); on a cluster without one the request is stored and
    ignored, which is harmless.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[dict(b) for b in bundles])


class Requester:
    """Keeps the autoscaling request in step with the allocator's queue.

    Call ``update`` on every health tick with the queued jobs' ``waiting_for`` lists: it
    decides with ``bundles_to_request`` and tells Ray only when the request changes (one GCS
    write then, none otherwise).
    """

    def __init__(self, *, slots: Mapping[str, int] | None = None,
                 max_per_backend: int = DEFAULT_MAX_PER_BACKEND, max_bundles: int = DEFAULT_MAX_BUNDLES,
                 send: Callable[[Sequence[Mapping[str, float]]], None] = request,
                 resource_of: Callable[[str], str] = resource_name) -> None:
        """``resource_of``: the Ray resource a node must offer to run a backend (a pool's members
        all need ``qalloc_pool_cpu``)."""
        self.slots = dict(slots or {})
        self.resource_of = resource_of
        self._held: set[str] = set()
        self.max_per_backend = max_per_backend
        self.max_bundles = max_bundles
        self._send = send
        self.current: list[Bundle] | None = None   # None: nothing sent yet

    def update(self, waiting: Iterable[Sequence[str]],
               cluster: Mapping[str, float] | None = None) -> list[Bundle]:
        if cluster is None:
            import ray

            cluster = ray.cluster_resources()
        waiting = [list(w) for w in waiting]
        bundles = bundles_to_request(waiting, cluster, slots=self.slots, held=self._held,
                                     max_per_backend=self.max_per_backend, max_bundles=self.max_bundles,
                                     resource_of=self.resource_of)
        asked = {k for b in bundles for k in b}
        self._held = {name for w in waiting for name in w if self.resource_of(name) in asked}
        if bundles != self.current:
            if bundles or self.current:   # the first empty decision needs no call
                log.info("autoscaling request: %s", bundles or "cleared")
                self._send(bundles)
            self.current = bundles
        return bundles

    def clear(self) -> None:
        """Drop the request (allocator shutting down): the autoscaler may give nodes back."""
        if self.current:
            self._send([])
        self.current = []


def ensure(resources: Mapping[str, float], *, timeout_s: float = 900.0, poll_s: float = 2.0) -> bool:
    """Ask for ``resources`` and wait until the cluster offers them; then clear the request.

    Why: the head of a ``ray up`` cluster comes up before its workers, and the allocator
    places each backend where the cluster offers its resource *when it starts*. The head's
    start command runs this before ``serve deploy`` so the pool starts on its worker nodes.
    Returns False on timeout (the request is cleared either way).
    """
    import ray

    def missing() -> dict[str, float]:
        have = ray.cluster_resources()
        return {k: v for k, v in resources.items() if have.get(k, 0.0) < v}

    deadline = time.monotonic() + timeout_s
    try:
        if not missing():
            return True
        request([{k: float(v)} for k, v in resources.items()])
        while time.monotonic() < deadline:
            if not missing():
                return True
            time.sleep(poll_s)
        log.warning("still missing after %.0f s: %s", timeout_s, missing())
        return False
    finally:
        request([])


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_qalloc.autoscale wait [RESOURCE[=N] ...] [--timeout S]``

    With no resources named, waits for those of the configured pool (``QALLOC_POOL``,
    default pool), as ``ray_qalloc.resources.node_resources`` computes them.
    """
    p = argparse.ArgumentParser(prog="python -m ray_qalloc.autoscale")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="request resources and wait until the cluster offers them")
    w.add_argument("resources", nargs="*", help="custom resources, NAME or NAME=UNITS")
    w.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")
    w.add_argument("--address", default="auto", help="Ray address (default auto)")
    args = p.parse_args(argv)

    import ray

    if args.resources:
        wanted = {}
        for item in args.resources:
            name, _, units = item.partition("=")
            wanted[name] = float(units or 1)
    else:
        from ray_qalloc.config import load_settings
        from ray_qalloc.resources import node_resources

        wanted = node_resources(load_settings())
    ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        ok = ensure(wanted, timeout_s=args.timeout)
    finally:
        ray.shutdown()
    print(("ready: " if ok else "timed out waiting for: ") + ", ".join(sorted(wanted)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
