"""What operators changed on a running allocator, durable and audited.

Why a table of its own beside the jobs: live configuration and maintenance (cordons, drains,
windows) must survive a restart like jobs do, and every change must say who made it, when,
and what it was before. One transaction writes the new value and its audit row, so there is
never a change without its record, nor a record of a change that did not happen; the caller
applies the change only after this commit (decide, commit, apply).
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

admin_state = sa.Table(
    "qalloc_admin_state", metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),          # JSON
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("updated_by", sa.String(128), nullable=False),
)

admin_audit = sa.Table(
    "qalloc_admin_audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("key", sa.String(128), nullable=False, index=True),
    sa.Column("old", sa.Text),                            # JSON, NULL when the key was new
    sa.Column("new", sa.Text),                            # JSON, NULL when the key was removed
    sa.Column("detail", sa.Text, nullable=False, default=""),
)


class AdminState:
    """Key → JSON value, with an append-only audit trail (who, when, action, old → new)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine, checkfirst=True)

    def get(self, key: str, default: Any = None) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(admin_state.c.value).where(admin_state.c.key == key)).first()
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any, *, actor: str, action: str, detail: str = "",
            now: float | None = None) -> Any:
        """Store ``value`` under ``key`` and audit the change; returns the old value (or None)."""
        now = time.time() if now is None else now
        new = json.dumps(value, sort_keys=True)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(admin_state.c.value).where(admin_state.c.key == key)
                               .with_for_update()).first()
            old = row[0] if row is not None else None
            if row is None:
                conn.execute(admin_state.insert().values(key=key, value=new, updated_at=now, updated_by=actor))
            else:
                conn.execute(admin_state.update().where(admin_state.c.key == key)
                             .values(value=new, updated_at=now, updated_by=actor))
            conn.execute(admin_audit.insert().values(at=now, actor=actor, action=action, key=key,
                                                     old=old, new=new, detail=detail))
        return None if old is None else json.loads(old)

    def audit(self, *, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        q = sa.select(admin_audit).order_by(admin_audit.c.id.desc()).limit(limit)
        if key is not None:
            q = q.where(admin_audit.c.key == key)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [{"id": r["id"], "at": r["at"], "actor": r["actor"], "action": r["action"], "key": r["key"],
                 "old": None if r["old"] is None else json.loads(r["old"]),
                 "new": None if r["new"] is None else json.loads(r["new"]), "detail": r["detail"]}
                for r in rows]
