"""What every ray-qalloc Qiskit primitive takes and checks before its first ``run``.

Why one place: ``QAllocSampler`` and ``QAllocEstimator`` accept the same job options
(priority, intent, fidelity floor, deadline, allow-list, tenant, timeout, seed), refuse bad ones
by the same intake rules at construction, and connect to the same default client. Only their
per-run default (shots, precision) differs, so a primitive declares that one field and this
module does the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterable

from ray_qalloc.jobs import make_spec
from ray_qalloc.primitive_job import PrimitiveClient, check_seed, check_timeout


@dataclass(frozen=True)
class PrimitiveOptions:
    """Job options applied to every job of a ``run``; ``None`` leaves the field to the client's default.

    A subclass adds its per-run default as a field and names it in ``run_default``: it is not a
    job field (each job gets the resolved value of its own pub)."""

    priority: str | None = None
    intent: str | None = None
    fidelity_min: float | None = None
    deadline_s: float | None = None
    backends: tuple[str, ...] | None = None
    tenant: str | None = None
    timeout_s: float | None = None
    seed: int | None = None

    run_default: ClassVar[str] = ""

    def job_fields(self) -> dict[str, Any]:
        """The set options as submit keywords (unset ones left out, so any client accepts them)."""
        out = {k: v for k, v in asdict(self).items()
               if k not in (self.run_default, "timeout_s") and v is not None}
        if "backends" in out:
            out["backends"] = list(out["backends"])
        return out


def make_options(cls: type[PrimitiveOptions], *, priority: str | None, intent: str | None,
                 fidelity_min: float | None, deadline_s: float | None, backends: Iterable[str] | None,
                 tenant: str | None, timeout_s: float | None, seed: Any, **run_default: Any) -> PrimitiveOptions:
    """The options a primitive was constructed with, checked the way intake will check its jobs."""
    check_timeout(timeout_s)
    if isinstance(backends, str):  # a bare name would otherwise become a list of letters
        backends = [backends]
    return cls(priority=priority, intent=intent, fidelity_min=fidelity_min, deadline_s=deadline_s,
               backends=tuple(backends) if backends is not None else None, tenant=tenant,
               timeout_s=timeout_s, seed=check_seed(seed), **run_default)


class QAllocPrimitive:
    """The options, seed and client of a primitive; bad options are refused now, not at the first run."""

    _options: PrimitiveOptions
    _client: PrimitiveClient

    def _init_primitive(self, client: PrimitiveClient | None, options: PrimitiveOptions,
                        **spec_fields: Any) -> None:
        make_spec(circuit="", **spec_fields, **options.job_fields())   # same rules as intake
        if client is None:
            from ray_qalloc.session import connect

            client = connect()
        self._options = options
        self._client = client

    @property
    def seed(self) -> int | None:
        """The seed sent to simulator runs (as the reference primitives' ``seed``)."""
        return self._options.seed

    @property
    def client(self) -> PrimitiveClient:
        return self._client


__all__ = ["PrimitiveOptions", "QAllocPrimitive", "make_options"]
