"""Pool membership changed on the running allocator (``qalloc config set pool ...``).

Why not a restart: adding a QPU to the service, or taking the density-matrix method off the
pools, is an operator's everyday change, and a restart would stop every run in flight. A
change here follows the project's order: *decide* (every name resolves to a backend the
registry can build, before anything is stored), *commit* (the live-config override, audited,
as every other key), *apply*:

* a method or backend that joins gets its members now (a QPU's actor is started where a node
  offers its resource, or waits for one); queued jobs are planned again and see it;
* one that leaves is **retired**: out of service at once (no new run starts there, queued jobs
  are planned again over what stays, as a drain does), and forgotten — out of the scheduler,
  its QPU actor stopped — once its last run has ended. A job that nothing else can run is
  failed with the reason at that replan, as for a node gone for good.

After a restart the stored override is applied the same way, so the allocator serves the
membership the operator last set, not the start-up file's.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from ray_qalloc.exceptions import ConfigError
from ray_qalloc.resources import split_pool

log = logging.getLogger("ray_qalloc.membership")


def validate_pool(pool: Iterable[str], running: Iterable[str] = ()) -> None:
    """Every entry names a method, a backend the registry can build, or one this allocator
    runs already (``running``); raises ``ConfigError`` naming the entry."""
    from ray_qalloc.backends.registry import make_backend

    entries = list(pool)
    if not entries:
        raise ConfigError("pool: the pool is empty.", field="pool",
                          fix="name at least one method or backend, e.g. [\"default\"] or [\"statevector\", \"qpu_fez\"].")
    _, names = split_pool(entries)
    known = set(running)
    for name in names:
        if name in known:
            continue
        try:
            make_backend(name)
        except Exception as exc:  # noqa: BLE001 - the registry's reason is the message
            raise ConfigError(f"pool: {name!r} is not a backend this allocator can start ({exc}).", field="pool",
                              fix="use `default`, a method (statevector, mps, stabilizer, density_matrix, "
                                  "extended_stabilizer) or a backend name from `qalloc backends`.") from None


def wanted(member: Any, methods: set[str], names: set[str]) -> bool:
    spec = member.spec
    if spec.pool is not None:
        return spec.method in methods
    return member.host in names


class Membership:
    """The allocator's pool membership: what joins now, what retires when its runs end."""

    def __init__(self, alloc: Any) -> None:
        self.alloc = alloc

    @property
    def retiring(self) -> set[str]:
        return self.alloc.d.retiring

    def apply(self, pool: list[str]) -> dict[str, list[str]]:
        """Put ``pool`` in force; returns the members added and the ones retiring."""
        alloc = self.alloc
        fleet, d = alloc.fleet, alloc.d
        methods, names = split_pool(pool)
        new_methods = [m for m in methods if m not in fleet.methods]
        new_names = [n for n in names if n not in fleet.backend_names and n not in fleet.hosts]
        fleet.methods, fleet.backend_names = methods, names
        added = fleet.add_methods(new_methods) if new_methods else []
        cluster: dict[str, float] = {}
        if new_names and alloc._injected is None:
            import ray

            cluster = ray.cluster_resources()
        hosts = [fleet.add_backend_host(n, cluster) for n in new_names] if alloc._injected is None else []
        for host in hosts:
            added += [fleet.members[n] for n in host.members]
        keep, leave = set(methods), set(names)
        retire = {n for n, m in fleet.members.items() if not wanted(m, keep, leave)}
        back = d.retiring - retire
        d.retiring = (d.retiring | retire) & set(fleet.members)
        for name in retire | back:
            m = fleet.members.get(name)
            if m is not None and name in d.sched.backends:
                d.sched.set_health(name, m.healthy and not d.out_of_service(name))
        if added:
            fleet._announce(added)
        for host in hosts:   # their first probe makes them healthy; until then jobs wait for them
            import asyncio

            asyncio.ensure_future(fleet.probe(host, first=True))
        self.sweep()
        if retire and d.queued:
            d.replan_queued()
        alloc._kick.set()
        if added or retire:
            log.info("pool membership: %d added, %d retiring", len(added), len(retire))
        return {"added": sorted(m.spec.name for m in added), "retiring": sorted(d.retiring)}

    def sweep(self) -> list[str]:
        """Forget retiring members whose runs have all ended (the health loop calls this)."""
        d, fleet = self.alloc.d, self.alloc.fleet
        if not d.retiring:
            return []
        busy = {r.backend for r in d._all_runs()}
        done = [n for n in d.retiring if n not in busy]
        if not done:
            return []
        for name in done:
            d.retiring.discard(name)
            fleet.forget_member(name)
        d.members_removed(done)
        return done
