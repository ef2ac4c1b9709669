"""Model versions: promote a candidate, roll back, list — each audited, each announced.

Why moves, not pointers: the registry serves the newest compatible artifact by name
(``registry.latest_artifact``) and the allocator notices a change of the directory within
seconds (``ArtifactWatcher``). So promoting is one atomic ``rename`` of a candidate (trained
under the hidden ``.candidates/``) into the registry, and rolling back is one ``rename`` of the
version in service into the hidden ``.retired/``: the previous version is newest again, and
nothing is deleted (``restore`` brings a retired version back). Every such change is written
to the audited admin state (``model.active``: who, when, old → new) and raises an
informational alert through the alert outbox (a ``firing`` and its ``resolved`` at once: a
notice, not a condition that stays open).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from ray_qalloc.costmodel.registry import latest_artifact
from ray_qalloc.exceptions import QAllocError

CANDIDATES = ".candidates"
RETIRED = ".retired"
ACTIVE_KEY = "model.active"


class VersionError(QAllocError):
    """A version operation that cannot be done as asked."""


def versions(models_dir: Path | str) -> list[dict[str, Any]]:
    """Every artifact in service order (newest first), retired ones and candidates after."""
    from ray_qalloc.costmodel.model import read_meta

    root = Path(models_dir)
    active = latest_artifact(root)
    out = []
    for where, state in (("", "available"), (RETIRED, "retired"), (CANDIDATES, "candidate")):
        d = root / where if where else root
        if not d.is_dir():
            continue
        for name in sorted((e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")), reverse=True):
            try:
                meta = read_meta(d / name)
            except Exception:  # noqa: BLE001 - listed as unreadable, never loaded
                meta = {}
            metrics = meta.get("metrics") or {}
            out.append({"version": name, "state": "active" if active is not None and d / name == active else state,
                        "created_at": meta.get("created_at"), "n_rows": meta.get("n_rows"),
                        "cv_rmse_log": metrics.get("cv_rmse_log"), "promotion": meta.get("promotion")})
    return out


def promote(models_dir: Path | str, candidate: Path, *, actor: str, detail: str, admin: Any = None,
            outbox: Any = None, evidence: Mapping[str, Any] | None = None) -> Path:
    """Move ``candidate`` into service; audit and announce it. Returns its path in the registry."""
    root = Path(models_dir)
    old = latest_artifact(root)
    final = root / candidate.name
    if final.exists():
        raise VersionError(f"version {candidate.name} is already in the registry. To fix: retrain (a new version).")
    os.rename(candidate, final)
    _record(admin, outbox, "model.promote", actor, old, final, detail, evidence)
    return final


def rollback(models_dir: Path | str, to: str | None = None, *, actor: str, admin: Any = None,
             outbox: Any = None, detail: str = "") -> dict[str, Any]:
    """Retire the version in service (and, with ``to``, every newer one) so the previous one —
    or ``to`` — serves. Nothing is deleted."""
    root = Path(models_dir)
    current = latest_artifact(root)
    if current is None:
        raise VersionError(f"no model version in service under {root}. To fix: nothing to roll back; "
                           "the allocator already uses the packaged model or the prior.")
    names = sorted((e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), reverse=True)
    if to is not None and to not in names:
        raise VersionError(f"version {to!r} is not available under {root}. To fix: pick one of "
                           f"`qalloc model versions` (a retired one: `qalloc model restore VERSION`).")
    doomed = [current.name] if to is None else [n for n in names if n > to]
    if not doomed:
        raise VersionError(f"{to} is already the version in service.")
    (root / RETIRED).mkdir(exist_ok=True)
    for name in doomed:
        os.rename(root / name, root / RETIRED / name)
    new = latest_artifact(root)
    _record(admin, outbox, "model.rollback", actor, current, new, detail or f"retired {', '.join(doomed)}", None)
    return {"retired": doomed, "active": new.name if new is not None else None}


def restore(models_dir: Path | str, version: str, *, actor: str, admin: Any = None, outbox: Any = None) -> Path:
    """Bring a retired version back into the registry (it serves if it is the newest)."""
    root = Path(models_dir)
    src = root / RETIRED / version
    if not src.is_dir():
        raise VersionError(f"no retired version {version!r}. To fix: see `qalloc model versions`.")
    old = latest_artifact(root)
    os.rename(src, root / version)
    _record(admin, outbox, "model.restore", actor, old, latest_artifact(root), f"restored {version}", None)
    return root / version


def _record(admin: Any, outbox: Any, action: str, actor: str, old: Path | None, new: Path | None, detail: str,
            evidence: Mapping[str, Any] | None) -> None:
    value = {"version": new.name if new is not None else None, "previous": old.name if old is not None else None,
             "action": action, **({"evidence": dict(evidence)} if evidence else {})}
    if admin is not None:
        admin.put(ACTIVE_KEY, value, actor=actor, action=action, detail=detail)
    if outbox is not None:
        announce(outbox, action, value, detail)


def announce(outbox: Any, action: str, value: Mapping[str, Any], detail: str) -> list[int]:
    """An informational alert: a firing event and its resolution, committed together."""
    from ray_qalloc.alerts.engine import AlertEvent
    from ray_qalloc.alerts.rules import Severity

    now = time.time()
    fp = f"{action}:{value.get('version')}:{now:.6f}"
    summary = f"cost model {action.split('.')[-1]}: {value.get('previous')} -> {value.get('version')}"
    labels = {"action": action, "version": str(value.get("version"))}
    common = dict(rule="model_version", kind="model", severity=Severity.INFO, fingerprint=fp, labels=labels,
                  summary=summary, at=now, details={"detail": detail, **{k: v for k, v in value.items()}})
    events = [AlertEvent(key=f"{fp}:firing", status="firing", fired_at=now, **common),
              AlertEvent(key=f"{fp}:resolved", status="resolved", **common)]
    return outbox.enqueue(events)


__all__ = ["ACTIVE_KEY", "CANDIDATES", "RETIRED", "VersionError", "announce", "promote", "restore", "rollback",
           "versions"]
