"""Live configuration: settings changed on the running allocator, validated, audited, durable.

Why through the typed settings and not a side table of knobs: a value changed live must obey
exactly the rules it obeys at start-up (``Settings`` validates the whole tree, cross-field
checks included), and after a restart the allocator must run with what the operator last
set. So a change is a set of dotted keys applied to the current tree, and the *whole* tree is
validated again; nothing is applied unless all of it is valid (no half-applied change).

The order is the project's: **decide** (build and validate the new settings), **commit** (the
overrides, merged, into the admin state with an audit row: who, when, old → new), **apply**
(install them on the allocator's parts, then plan the queue again). After a restart the
stored overrides are applied over the start-up settings before the first job is planned.

Only keys the running allocator can honour are accepted (``LIVE_KEYS``); the others (where the
data lives, the Ray namespace, which executors exist) need a restart, and the refusal says so.
"""

from __future__ import annotations

import time

import copy
import json
from typing import Any, Iterable, Mapping, get_args

from pydantic import BaseModel, ValidationError

from ray_qalloc.config import Settings
from ray_qalloc.exceptions import ConfigError

STATE_KEY = "config"

LIVE_KEYS: dict[str, str] = {
    "placement": "class weights, fidelity factor, coherence budget, exploration: queued jobs are planned again",
    "scheduler": "reserved emergency slots, aging, QPU congestion thresholds, preemption: the next pass",
    "tenant_backends": "tenant backend permissions: queued jobs are planned again",
    "max_calibration_age_s": "QPU calibration freshness limit: queued jobs are planned again",
    "alerts": "alert rules, rate limits, sinks and retry: the next evaluation",
    "hedge": "hedging of overrunning runs: the next hedge check",
    "monitor.calibration_period_s": "how often QPU calibrations are read: from the next round",
    "monitor.max_stale_periods": "when a calibration counts as stale: the next evaluation",
    "max_attempts": "attempts per job: the next failure",
    "run_timeout_floor_s": "run timeouts: runs started from now",
    "run_timeout_factor": "run timeouts: runs started from now",
    "breaker_failures": "circuit breakers: the next failure",
    "breaker_cooldown_s": "circuit breakers: the next opening",
    "breaker_max_cooldown_s": "circuit breakers: the next opening",
    "health_timeout_s": "health probes: the next probe",
    "elastic_idle_s": "elastic backends: the next check",
    "call_timeout_s": "control calls: the next call",
    "pool": "pool membership (methods on the pools, QPUs): joiners serve at once, leavers retire once their runs end",
    "limits": "intake limits of the allocator's own submit path (the API's own are Serve's user_config)",
    "threat": "threat rules and job templates: the next events read",
}
SECRET_KEYS = ("secret", "token", "password", "api_key")


def is_live(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in LIVE_KEYS)


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    node: Any = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            if nxt is not None or not isinstance(node, dict):
                raise ConfigError(f"setting {key!r}: {'.'.join(parts[:i + 1])} is not a section.",
                                  field=key, fix="name a field inside a section, e.g. placement.coherence_budget.")
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def _get(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``X`` or ``X | None``), None for plain values and dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def known_key(key: str, model: type[BaseModel] = Settings) -> bool:
    """``key`` names a field of the settings model, or lies inside a free-form mapping field
    (a tenant in ``tenant_backends``, a sink in ``alerts.sinks``, a slot in ``scheduler``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        inner = _model_of(field.annotation)
        if inner is None:
            return True        # a value, or a dict whose keys are the operator's
        model = inner
    return True


def check_keys(keys: Iterable[str], known: Mapping[str, Any] | None = None) -> None:
    for key in keys:
        if not known_key(key):
            raise ConfigError(f"there is no setting {key!r}.", field=key,
                              fix=f"use one of: {', '.join(sorted(LIVE_KEYS))} (GET /v1/admin/config lists "
                                  "every setting).")
        if not is_live(key):
            raise ConfigError(f"setting {key!r} cannot change on a running allocator.", field=key,
                              fix="set it in the start-up configuration (QALLOC_* or settings) and restart; "
                                  f"live keys are: {', '.join(sorted(LIVE_KEYS))}.")


def apply_overrides(settings: Settings, overrides: Mapping[str, Any]) -> Settings:
    """``settings`` with the dotted ``overrides``; the whole tree validated as at start-up.

    Raises ``ConfigError`` naming the first invalid field and why."""
    check_keys(overrides)
    new = copy.deepcopy(settings.model_dump())
    for key, value in overrides.items():
        _set(new, key, value)
    try:
        return Settings.model_validate(new)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or next(iter(overrides), "")
        raise ConfigError(f"setting {where!r} is invalid: {err['msg']}.", field=where,
                          fix="give a value of the documented type and range (GET /v1/admin/config shows "
                              "the current values).") from None
    except ConfigError:
        raise
    except ValueError as exc:   # a cross-field check of the settings model
        raise ConfigError(f"the change is invalid: {exc}.", field=next(iter(overrides), None),
                          fix="correct the value; nothing was changed.") from None


def mask(value: Any) -> Any:
    """Secrets shown as ``***`` (webhook secrets, tokens) wherever they sit in the tree."""
    if isinstance(value, Mapping):
        return {k: ("***" if any(s in str(k).lower() for s in SECRET_KEYS) and v else mask(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def view(settings: Settings, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What ``GET /v1/admin/config`` answers: the effective settings, what was changed live,
    and which keys may change."""
    tree = json.loads(settings.model_dump_json())
    return {"settings": mask(tree), "overrides": mask(dict(overrides)), "live_keys": dict(LIVE_KEYS)}


def changed_sections(old: Settings, new: Settings) -> set[str]:
    """Top-level sections whose value differs (what ``apply`` must reinstall)."""
    a, b = old.model_dump(), new.model_dump()
    return {k for k in b if a.get(k) != b.get(k)}


class LiveConfig:
    """The allocator's live settings: start-up settings plus the stored overrides."""

    def __init__(self, alloc: Any, base: Settings) -> None:
        self.alloc = alloc
        self.base = base
        self.overrides: dict[str, Any] = {}
        self.changes = 0

    async def load(self) -> None:
        """Apply what operators set before the restart (a value no longer valid is reported
        and skipped: the allocator starts rather than refusing to)."""
        stored = await self.alloc.d.db(self.alloc.admin.get, STATE_KEY, {})
        if not stored:
            return
        try:
            new = apply_overrides(self.base, stored)
        except ConfigError as exc:
            import logging

            logging.getLogger("ray_qalloc.liveconfig").error("stored configuration not applied: %s", exc)
            return
        self.overrides = dict(stored)
        install(self.alloc, self.alloc.settings, new)

    async def set(self, changes: Mapping[str, Any], *, actor: str, unset: Iterable[str] = ()) -> dict[str, Any]:
        """Decide (validate all), commit (audited), apply. Returns old → new per key."""
        if not changes and not unset:
            raise ConfigError("no setting given.", fix="give at least one KEY VALUE (or a key to reset).")
        check_keys(list(changes) + list(unset))
        merged = {k: v for k, v in self.overrides.items() if k not in set(unset)
                  and not any(k.startswith(u + ".") for u in unset)}
        for key, value in changes.items():   # a section replaced drops the finer overrides inside it
            merged = {k: v for k, v in merged.items() if not k.startswith(key + ".")}
            merged[key] = value
        json.dumps(merged)                   # only JSON values are stored (and the API sends only those)
        new = apply_overrides(self.base, merged)
        if new.pool != self.alloc.settings.pool:
            from ray_qalloc.membership import validate_pool

            validate_pool(new.pool, running=self.alloc.fleet.hosts)
        old_tree, new_tree = self.alloc.settings.model_dump(mode="json"), new.model_dump(mode="json")
        diff = {}
        for key in list(changes) + list(unset):
            try:
                before = _get(old_tree, key)
            except KeyError:
                before = None
            try:
                after = _get(new_tree, key)
            except KeyError:
                after = None
            diff[key] = {"old": mask({"v": before})["v"], "new": mask({"v": after})["v"]}
        detail = ", ".join(sorted(diff))
        await self.alloc.d.db(self.alloc.admin.put, STATE_KEY, merged, actor=actor, action="config.set",
                              detail=detail)
        self.overrides = merged
        install(self.alloc, self.alloc.settings, new)
        self.changes += 1
        return {"changed": diff, "applies": {k: _what(k) for k in diff}}

    def view(self) -> dict[str, Any]:
        return view(self.alloc.settings, self.overrides)


def _what(key: str) -> str:
    for k, why in LIVE_KEYS.items():
        if key == k or key.startswith(k + "."):
            return why
    return ""


def install(alloc: Any, old: Settings, new: Settings) -> None:
    """Put ``new`` in force on every part that holds settings, then plan the queue again."""
    from ray_qalloc.placement.filters import make_filters

    sections = changed_sections(old, new)
    alloc.settings = new
    alloc.d.settings = new
    alloc.fleet.settings = new
    d = alloc.d
    d.filters = make_filters(new.tenant_backends, new.max_calibration_age_s, health=False,
                             coherence_budget=new.placement.coherence_budget)
    d.weights = new.placement.table()
    if "scheduler" in sections:
        cfg = new.scheduler_config()
        cfg.check_invariants = alloc.sched.config.check_invariants
        alloc.sched.config = cfg
        threat = getattr(alloc, "threat", None)
        if threat is not None:      # timed reservations add to the configured ones
            threat.apply(time.time())
    monitor = alloc.calwatch.monitor
    monitor.period_s = new.monitor.calibration_period_s
    monitor.max_stale_periods = new.monitor.max_stale_periods
    _explore(d.predictor, new.placement.explore_factor)
    if "alerts" in sections:
        _install_alerts(alloc, old, new)
    if "pool" in sections and hasattr(alloc, "membership"):
        alloc.membership.apply(list(new.pool))
    d.replan_queued()


def _explore(predictor: Any, factor: float) -> None:
    """Set the learned model's exploration factor, under its wrappers (run memory, the bandit).

    Why not ``hasattr``: the wrappers forward attribute *reads* to what they wrap, so
    ``hasattr(wrapper, "explore_factor")`` is true and the assignment landed on the wrapper,
    where nothing reads it; only an object that holds the attribute itself is the model."""
    p = predictor
    for _ in range(8):       # through the wrappers to the learned model
        if p is None:
            return
        if "explore_factor" in getattr(p, "__dict__", {}):
            p.explore_factor = min(max(float(factor), 1.0), 10.0)
            return
        p = getattr(p, "__dict__", {}).get("base")


def _install_alerts(alloc: Any, old: Settings, new: Settings) -> None:
    a, b = old.alerts, new.alerts
    svc = alloc.alerts
    if not b.enabled:
        if svc is not None:
            svc.close()
        alloc.alerts = None
        return
    if svc is None or a.sinks != b.sinks or a.retry != b.retry or a.retention_s != b.retention_s:
        from ray_qalloc.alerts.service import AlertService

        if svc is not None:
            svc.close()
        alloc.alerts = AlertService(b, alloc.store.engine)
        return
    if a.rules != b.rules or a.rate_limit != b.rate_limit:
        svc.replace_rules(b.alert_rules())
    svc.settings = b
