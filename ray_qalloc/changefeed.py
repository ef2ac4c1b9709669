"""One ordered feed of what changed — jobs, backends, alerts, configuration — read from the
durable tables each change is committed to, by position, so a reader resumes without a gap or
a duplicate.

Why read the tables and not an in-memory bus: the stream must survive the reader's
disconnect, an API replica's restart and an allocator's crash. Every change already lands in
an append-only table with an increasing id before it takes effect (job transitions, the alert
outbox, the admin audit trail) or right after (``backendlog``): a reader's position is one id
per source, and the feed is those tables read forward.

The cursor is that position, written ``j:<id>,b:<id>,a:<id>,c:<id>`` (jobs, backends, alerts,
configuration). Every change carries the cursor *after* it, which the SSE route sends as the
event's ``id``; a client that reconnects with it as ``Last-Event-ID`` continues with the next
change of every source. A source missing from a hand-written cursor is read from its start.

Visibility: a tenant sees its own jobs' changes and the backends'; alerts and configuration
changes are for admin tokens (which see every tenant's jobs).

Ordering: within a source, commit order (by id); across sources, by time as the heads of the
sources are merged. PostgreSQL can commit a lower id after a higher one (two writers), so
there rows younger than ``settle_s`` are held back one poll; SQLite has one writer at a time.
"""

from __future__ import annotations

import heapq
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.exceptions import InvalidRequest

SOURCES: tuple[str, ...] = ("j", "b", "a", "c")
KIND = {"j": "job", "b": "backend", "a": "alert", "c": "config"}
ADMIN_ONLY = frozenset({"a", "c"})
_SCAN = 5_000            # ids looked at per source per read past rows a tenant may not see
_CURSOR = re.compile(r"^[jbac]:\d{1,18}(,[jbac]:\d{1,18}){0,3}$")


@dataclass(frozen=True)
class Cursor:
    """Per source, the id of the last change read (0: nothing read yet)."""

    pos: tuple[int, int, int, int] = (0, 0, 0, 0)

    def get(self, src: str) -> int:
        return self.pos[SOURCES.index(src)]

    def moved(self, src: str, to: int) -> "Cursor":
        i = SOURCES.index(src)
        return Cursor(self.pos[:i] + (to,) + self.pos[i + 1:])

    def __str__(self) -> str:
        return ",".join(f"{s}:{p}" for s, p in zip(SOURCES, self.pos))

    @classmethod
    def parse(cls, text: str, field_name: str = "Last-Event-ID") -> "Cursor":
        text = text.strip()
        if not _CURSOR.match(text):
            raise InvalidRequest(f"{field_name} {text[:80]!r} is not a stream position.", field=field_name,
                                 fix="send back the id of the last event received (e.g. 'j:12,b:3,a:0,c:1'), "
                                     "or leave it out to start from now.")
        got: dict[str, int] = {}
        for part in text.split(","):
            src, _, num = part.partition(":")
            if src in got:
                raise InvalidRequest(f"{field_name} names source {src!r} twice.", field=field_name,
                                     fix="send back the id of the last event received, unchanged.")
            got[src] = int(num)
        return cls(tuple(got.get(s, 0) for s in SOURCES))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Change:
    kind: str                 # job | backend | alert | config
    at: float
    cursor: Cursor            # the position after this change
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": str(self.cursor), "kind": self.kind, "at": self.at, "data": self.data}


def _tables() -> dict[str, Any]:
    from ray_qalloc.alerts.outbox import events_table
    from ray_qalloc.adminstate import admin_audit
    from ray_qalloc.backendlog import backend_events
    from ray_qalloc.store import jobs_table, transitions_table

    return {"jobs": jobs_table, "j": transitions_table, "b": backend_events, "a": events_table, "c": admin_audit}


def ensure_tables(engine: Engine) -> None:
    """The feed's sources exist even where nothing wrote to them yet (alerts off, no admin change)."""
    from ray_qalloc.adminstate import metadata as admin_md
    from ray_qalloc.alerts.outbox import metadata as outbox_md
    from ray_qalloc.backendlog import metadata as backend_md
    from ray_qalloc.store import create_tables

    create_tables(engine, outbox_md, admin_md, backend_md)


class ChangeFeed:
    """Reads changes after a cursor. Thread-safe (a read is a few SELECTs); blocking: call it
    off the event loop."""

    def __init__(self, engine: Engine, *, settle_s: float | None = None) -> None:
        self.engine = engine
        self.settle_s = (0.0 if engine.dialect.name == "sqlite" else 1.0) if settle_s is None else settle_s
        self.t = _tables()
        ensure_tables(engine)

    def visible(self, admin: bool) -> tuple[str, ...]:
        return SOURCES if admin else tuple(s for s in SOURCES if s not in ADMIN_ONLY)

    def head(self) -> Cursor:
        """The position of the newest change of every source: reading from it gives what comes next."""
        with self.engine.connect() as conn:
            pos = tuple(int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(self.t[s].c.id), 0))).scalar_one())
                        for s in SOURCES)
        return Cursor(pos)  # type: ignore[arg-type]

    def read(self, after: Cursor, *, tenant: str | None, admin: bool, limit: int = 500,
             now: float | None = None, sources: tuple[str, ...] | None = None) -> tuple[list[Change], Cursor]:
        """Up to ``limit`` changes after ``after`` that this caller may see, merged by time, and
        the position to read from next (past rows it may not see, too). ``sources``: only these
        (a reader that wants job changes only does not page through alerts)."""
        now = time.time() if now is None else now
        settle = now - self.settle_s if self.settle_s > 0 else None
        rows: dict[str, list[tuple[float, int, dict[str, Any]]]] = {}
        skip_to: dict[str, int] = {}
        with self.engine.connect() as conn:
            for src in self.visible(admin):
                if sources is not None and src not in sources:
                    continue
                got, scanned = self._read(conn, src, after.get(src), tenant if not admin else None, limit, settle)
                rows[src] = got
                if scanned is not None:
                    skip_to[src] = scanned
        heads = [(lst[0][0], SOURCES.index(src), src, 0) for src, lst in rows.items() if lst]
        heapq.heapify(heads)
        out: list[Change] = []
        cursor = after
        while heads and len(out) < limit:
            at, _, src, i = heapq.heappop(heads)
            _, rid, data = rows[src][i]
            cursor = cursor.moved(src, rid)
            out.append(Change(KIND[src], at, cursor, data))
            if i + 1 < len(rows[src]):
                heapq.heappush(heads, (rows[src][i + 1][0], SOURCES.index(src), src, i + 1))
        if len(out) < limit:    # every row read went out: skip past the invisible ones scanned
            for src, to in skip_to.items():
                if to > cursor.get(src):
                    cursor = cursor.moved(src, to)
        return out, cursor

    def _read(self, conn: sa.Connection, src: str, after: int, tenant: str | None, limit: int,
              settle: float | None) -> tuple[list[tuple[float, int, dict[str, Any]]], int | None]:
        t = self.t[src]
        if src == "j":
            jobs = self.t["jobs"]
            q = (sa.select(t.c.id, t.c.at, t.c.job_id, t.c.name, t.c.from_state, t.c.to_state, t.c.stimulus,
                           jobs.c.tenant, jobs.c.priority)
                 .join(jobs, jobs.c.id == t.c.job_id).where(t.c.id > after))
            scan_hi = None
            if tenant is not None:      # bounded scan past other tenants' rows
                scan_hi = after + _SCAN
                q = q.where(jobs.c.tenant == tenant, t.c.id <= scan_hi)
            if settle is not None:
                q = q.where(t.c.at <= settle)
            got = [(float(r.at), int(r.id), {"job_id": r.job_id, "event": r.name, "from": r.from_state,
                                             "to": r.to_state, "why": r.stimulus or "", "tenant": r.tenant,
                                             "priority": r.priority})
                   for r in conn.execute(q.order_by(t.c.id).limit(limit))]
            if scan_hi is not None and len(got) < limit:
                top = conn.execute(sa.select(sa.func.max(t.c.id)).where(t.c.id <= scan_hi)).scalar_one()
                if settle is not None:   # never skip past a row that may not have settled
                    young = conn.execute(sa.select(sa.func.min(t.c.id)).where(t.c.id > after,
                                                                              t.c.at > settle)).scalar_one()
                    if young is not None:
                        top = min(int(top or 0), int(young) - 1)
                return got, int(top) if top is not None else None
            return got, None
        at_col = t.c.created_at if src == "a" else t.c.at
        q = sa.select(t).where(t.c.id > after)
        if settle is not None:
            q = q.where(at_col <= settle)
        out = []
        for r in conn.execute(q.order_by(t.c.id).limit(limit)):
            m = r._mapping
            if src == "b":
                data = {"backend": m["backend"], "event": m["kind"], "detail": m["detail"]}
                at = float(m["at"])
            elif src == "a":
                data = json.loads(m["payload"])
                at = float(m["created_at"])
            else:
                data = {"actor": m["actor"], "action": m["action"], "key": m["key"],
                        "old": _json(m["old"]), "new": _json(m["new"]), "detail": m["detail"]}
                at = float(m["at"])
            out.append((at, int(m["id"]), data))
        return out, None


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
