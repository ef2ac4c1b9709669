"""Backend changes (up, down, out of service) kept durably, for the change stream.

Why a table of its own: a backend's health is live state the fleet recomputes from pings, so
nothing durable said when it changed. Integrated tools that hold the same state as the
allocator (``GET /v1/stream``) must be able to resume after a disconnect without a gap, which
needs every change they may have missed to be readable by position. Job transitions, alerts
and configuration changes already have durable, ordered tables; this is the fourth.

Writes are buffered (``note`` is a list append on the allocator's event loop) and flushed on
the store thread by the health loop: a crash loses at most the changes of one health period,
and the restarted allocator announces each backend's health again at its first probe.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

backend_events = sa.Table(
    "qalloc_backend_events", metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("backend", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),     # up | down
    sa.Column("detail", sa.Text, nullable=False, default=""),
)

RETENTION_S = 7 * 86_400.0
_PRUNE_EVERY_S = 3_600.0


class BackendLog:
    """Buffered, durable record of backend health changes."""

    def __init__(self, engine: Engine, retention_s: float = RETENTION_S) -> None:
        self.engine = engine
        self.retention_s = float(retention_s)
        from ray_qalloc.store import create_tables

        create_tables(engine, metadata)
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._pruned_at = 0.0

    def note(self, backend: str, kind: str, detail: str = "", at: float | None = None) -> None:
        with self._lock:
            self._pending.append({"at": time.time() if at is None else float(at), "backend": backend[:128],
                                  "kind": kind[:32], "detail": detail})

    def flush(self, now: float | None = None) -> int:
        """Write what was noted (on the store thread); prune past retention now and then."""
        with self._lock:
            rows, self._pending = self._pending, []
        now = time.time() if now is None else now
        prune = now - self._pruned_at >= _PRUNE_EVERY_S
        if not rows and not prune:
            return 0
        try:
            with self.engine.begin() as conn:
                if rows:
                    conn.execute(backend_events.insert(), rows)
                if prune:
                    conn.execute(backend_events.delete().where(backend_events.c.at < now - self.retention_s))
        except Exception:
            with self._lock:        # kept, in order, for the next flush
                self._pending[:0] = rows
            raise
        if prune:
            self._pruned_at = now
        return len(rows)
