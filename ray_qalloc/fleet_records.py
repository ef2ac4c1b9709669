"""The fleet's records: a *host* (one executor actor) and its *members* (placement candidates),
and what the fleet tells its listener.

Why a module of its own: discovery (``fleet_discovery.py``: which hosts exist) and health
(``fleet_health.py``: whether they answer) both read and write these records, the fleet's
views hand them to placement, and the dispatcher listens; none of them owns the shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ray_qalloc.backends.base import BackendSpec, ProviderStatus
from ray_qalloc.monitor.node import NodeStats
from ray_qalloc.placement import BackendView
from ray_qalloc.placement.model import QubitProfile

ELASTIC_POOL = "cpu-elastic"   # stands for the pool of a node the autoscaler may bring


@dataclass
class Member:
    """One placement candidate: a QPU, or a (method, threads) variant of a pool."""

    spec: BackendSpec
    host: str
    healthy: bool = False
    calibration: dict[str, float] | None = None
    calibration_taken_at: float | None = None
    qubits: QubitProfile | None = None   # the same calibration per qubit (calwatch.py)
    memory_free_bytes: int | None = None  # a pool's node: memory free now, as it measured (None: unknown)
    failures: int = 0                 # circuit breaker: consecutive failed runs
    open_until: float = 0.0
    cooldown_s: float = 0.0

    def set_calibration(self, cal: Any) -> bool:
        """Take a new ``Calibration`` (None: the backend has none); True when it is newer."""
        taken_at = getattr(cal, "taken_at", None)
        if cal is not None and self.calibration is not None and taken_at == self.calibration_taken_at:
            return False
        self.calibration = cal.summary() if cal is not None else None
        self.calibration_taken_at = taken_at
        self.qubits = QubitProfile.of(cal) if cal is not None else None
        return True

    def set_calibration_parts(self, taken_at: float | None, summary: dict[str, float] | None,
                              profile: QubitProfile | None) -> bool:
        """Take a calibration already reduced to what placement reads (the hub did the work)."""
        if summary is not None and self.calibration is not None and taken_at == self.calibration_taken_at:
            return False
        self.calibration, self.calibration_taken_at, self.qubits = summary, taken_at, profile
        return True

    @property
    def breaker_open(self) -> bool:
        return self.open_until > 0.0

    @property
    def breaker(self) -> str:
        return "open" if self.breaker_open else "half-open" if self.cooldown_s else "closed"

    @property
    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``run`` on this member's host (a pool needs the variant)."""
        if self.spec.pool is None:
            return {}
        return {"method": self.spec.method, "threads": self.spec.threads, "name": self.spec.name}

    def view(self) -> BackendView:
        age = None if self.calibration_taken_at is None else max(time.time() - self.calibration_taken_at, 0.0)
        return BackendView(self.spec, self.healthy, self.calibration, age, self.qubits, self.memory_free_bytes)


@dataclass
class Host:
    """One executor actor: a node's pool, or a QPU's backend actor."""

    name: str
    kind: str                          # "pool" | "backend"
    actor: Any
    node_id: str | None = None
    members: list[str] = field(default_factory=list)
    healthy: bool = False
    missed: int = 0
    elastic: bool = False              # started only while a node offers its resource
    last_used: float = 0.0
    cores: float = 0.0
    memory_bytes: int = 0
    running: int = 0                   # runs in flight, as the pool's last ping counted them
    spec: BackendSpec | None = None    # a backend host's spec (pools make theirs from the node)
    dead_since: float | None = None    # when its node was first seen dead
    node_stats: NodeStats | None = None  # what the pool's node measured at its last ping
    planned_free_bytes: int | None = None  # the free memory queued plans were last made with
    pid: int | None = None             # the executor's process, as its last ping gave it (a restart changes it)
    provider: ProviderStatus | None = None  # a QPU provider's last word on the device (in service, queue)


class FleetListener(Protocol):
    def member_health(self, name: str, healthy: bool) -> None: ...

    def members_added(self, members: list[Member]) -> None: ...

    def host_unreachable(self, host: Host, why: str) -> None: ...


__all__ = ["ELASTIC_POOL", "FleetListener", "Host", "Member"]
