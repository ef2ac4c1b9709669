"""What one API replica holds: its live limits (``ApiLimits``) and what it opens lazily in its
own process (``AppState``: the stores, the change feed, the allocator handle).

Why the replica holds no state of its own beyond these: any replica may answer any request, so
every fact lives in the job store (jobs, tenants, tokens, usage) or the allocator actor (the
queue); a replica only caches handles to them, and the limits Serve gives it.
"""

import asyncio
import time
from typing import Any

from pydantic import ValidationError

from ray_qalloc.config import ApiSettings, Settings
from ray_qalloc.exceptions import ConfigError, InvalidJobSpec, QAllocError
from ray_qalloc.tenants import TenantStore

API_LIVE_FIELDS = ("max_body_bytes", "max_batch_jobs", "max_result_wait_s", "max_page")
"""The API's settings that Serve's ``user_config`` changes on running replicas."""


class ApiLimits:
    """The API's own limits in force on this replica.

    Why Serve's ``user_config`` and not the allocator's live config: these limits belong to
    the replicas, which Serve owns; ``serve deploy`` with a changed ``user_config`` reaches
    every replica through ``reconfigure`` without a restart, the same way on one node or
    fifty. The new value is validated by the same typed model as at start-up; an invalid one
    is refused whole (Serve reports the deploy failed and the replicas keep the old limits)."""

    def __init__(self, api: ApiSettings) -> None:
        self.current = api
        self.changes = 0

    def reconfigure(self, config: dict[str, Any] | None) -> ApiSettings:
        given = dict((config or {}).get("api", config or {}))
        unknown = sorted(set(given) - set(API_LIVE_FIELDS))
        if unknown:
            raise ConfigError(f"user_config names API setting(s) Serve cannot change live: {', '.join(unknown)}.",
                              field=f"api.{unknown[0]}",
                              fix=f"use {', '.join(API_LIVE_FIELDS)}; the others are deployment options.")
        try:
            new = ApiSettings.model_validate({**self.current.model_dump(), **given})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"user_config api.{where}: {err['msg']}.", field=f"api.{where}",
                              fix="give a value the settings model accepts (see `qalloc config get api`).") from None
        self.current = new
        self.changes += 1
        return new

    @staticmethod
    def check(name: str, value: float, limit: float, setting: str) -> None:
        if value > limit:
            raise InvalidJobSpec(f"query parameter {name!r} is {value:g}, over this API's limit of {limit:g}.",
                                 field=name, fix=f"ask for at most {limit:g} (the API's `{setting}`).")


class AppState:
    """What a replica opens lazily in its own process: the stores and the allocator handle."""

    def __init__(self, settings: Settings, allocator: Any = None) -> None:
        self.settings = settings
        self.api = ApiLimits(settings.api)
        self._allocator = allocator
        self._store: Any = None
        self._tenants: TenantStore | None = None
        self._backends: tuple[float, list[dict[str, Any]]] | None = None
        self._feed: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from ray_qalloc.store import JobStore

            self._store = JobStore(self.settings.resolved_store_url)
        return self._store

    def changefeed(self) -> Any:
        """The change stream's reader, on the job store's database (opened on first use)."""
        if self._feed is None:
            from ray_qalloc.changefeed import ChangeFeed

            self._feed = ChangeFeed(self.store.engine)
        return self._feed

    @property
    def tenants(self) -> TenantStore:
        if self._tenants is None:
            self._tenants = TenantStore(self.settings.resolved_store_url)
        return self._tenants

    @property
    def allocator(self) -> Any:
        if self._allocator is None:
            import ray

            try:
                self._allocator = ray.get_actor(self.settings.allocator_name, namespace=self.settings.namespace)
            except ValueError:
                raise QAllocError("the allocator is not running.", fix="start it with `qalloc serve` "
                                  "or ray_qalloc.connect() on this cluster.", unavailable=True) from None
        return self._allocator

    async def call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """One allocator call, bounded in time; a dead or missing allocator answers 503."""
        try:
            return await asyncio.wait_for(getattr(self.allocator, method).remote(*args), timeout)
        except QAllocError as exc:
            if exc.details.get("unavailable"):
                raise
            raise _plain(exc) from None
        except asyncio.TimeoutError:
            raise QAllocError(f"the allocator did not answer {method} within {timeout:g} s.",
                              fix="retry shortly; see /readyz.", unavailable=True) from None
        except Exception as exc:  # RayActorError and friends: the actor is restarting
            self._allocator = None
            raise QAllocError(f"the allocator is unavailable ({type(exc).__name__}).",
                              fix="retry shortly; accepted jobs are kept in the store.", unavailable=True) from None

    async def backends(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        if self._backends is None or now - self._backends[0] > 10.0:
            self._backends = (now, await self.call("backends"))
        return self._backends[1]


def _plain(exc: QAllocError) -> QAllocError:
    """Ray re-raises an actor's error as a subclass of it and RayTaskError: rebuild the plain one."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("ray_qalloc"):
            return cls(exc.message, fix=exc.fix, field=exc.field, **exc.details)
    return exc


__all__ = ["API_LIVE_FIELDS", "ApiLimits", "AppState"]
