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

Ordering: within a source, by id on SQLite (one writer at a time: ids are committed in
order); across sources, by time as the heads of the sources are merged.

PostgreSQL can commit a lower id after a higher one (two writers: the lower id's transaction
is still open when the higher one commits), so a reader that moved past the higher id would
never see the lower one. Holding back rows younger than a fixed time did not close that: a
transaction open longer than the wait (a lock, a slow disk) still made a gap, and two writers
whose clocks were read in the other order made one at once. There each source table gets a
``qalloc_xid`` column filled by the database (``pg_current_xact_id()``, the writing
transaction's id), rows are read in ``(qalloc_xid, id)`` order, and only rows of transactions
older than the oldest one still running (``pg_snapshot_xmin``) are read: no transaction can
add a row below that point any more, so a position there is final. Job transitions of one job
are separate transactions, each begun after the last committed, so they keep their order. A
position on PostgreSQL reads ``j:<xid>.<id>``; rows written before the column existed sort
first, by id, so an older ``j:<id>`` position still resumes where it was.
"""

from __future__ import annotations

import heapq
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.exceptions import InvalidRequest

SOURCES: tuple[str, ...] = ("j", "b", "a", "c")
KIND = {"j": "job", "b": "backend", "a": "alert", "c": "config"}
ADMIN_ONLY = frozenset({"a", "c"})
_SCAN = 5_000            # ids looked at per source per read past rows a tenant may not see
XID = "qalloc_xid"        # PostgreSQL: the id of the transaction that wrote the row
_POS = r"[jbac]:\d{1,18}(\.\d{1,18})?"
_CURSOR = re.compile(rf"^{_POS}(,{_POS}){{0,3}}$")

Key = tuple[int, int]     # (transaction id, row id); the transaction id is 0 on SQLite


@dataclass(frozen=True)
class Cursor:
    """Per source, the key of the last change read ((0, 0): nothing read yet)."""

    pos: tuple[Key, Key, Key, Key] = ((0, 0), (0, 0), (0, 0), (0, 0))

    def get(self, src: str) -> int:
        """The row id of the last change read from ``src`` (unique within the source)."""
        return self.pos[SOURCES.index(src)][1]

    def key(self, src: str) -> Key:
        return self.pos[SOURCES.index(src)]

    def moved(self, src: str, to: Key) -> "Cursor":
        i = SOURCES.index(src)
        return Cursor(self.pos[:i] + (to,) + self.pos[i + 1:])  # type: ignore[arg-type]

    def __str__(self) -> str:
        return ",".join(f"{s}:{i}" if x == 0 else f"{s}:{x}.{i}" for s, (x, i) in zip(SOURCES, self.pos))

    @classmethod
    def parse(cls, text: str, field_name: str = "Last-Event-ID") -> "Cursor":
        text = text.strip()
        if not _CURSOR.match(text):
            raise InvalidRequest(f"{field_name} {text[:80]!r} is not a stream position.", field=field_name,
                                 fix="send back the id of the last event received (e.g. 'j:12,b:3,a:0,c:1'), "
                                     "or leave it out to start from now.")
        got: dict[str, Key] = {}
        for part in text.split(","):
            src, _, num = part.partition(":")
            if src in got:
                raise InvalidRequest(f"{field_name} names source {src!r} twice.", field=field_name,
                                     fix="send back the id of the last event received, unchanged.")
            xid, _, rid = num.rpartition(".")
            got[src] = (int(xid or 0), int(rid))
        return cls(tuple(got.get(s, (0, 0)) for s in SOURCES))  # type: ignore[arg-type]


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
    """The feed's sources exist even where nothing wrote to them yet (alerts off, no admin change),
    and on PostgreSQL each carries the writing transaction's id."""
    from ray_qalloc.adminstate import metadata as admin_md
    from ray_qalloc.alerts.outbox import metadata as outbox_md
    from ray_qalloc.backendlog import metadata as backend_md
    from ray_qalloc.store import create_tables

    create_tables(engine, outbox_md, admin_md, backend_md,
                  migrate=_add_xid_columns if engine.dialect.name == "postgresql" else None)


def _add_xid_columns(conn: sa.Connection) -> None:
    """``qalloc_xid`` on each source table, filled by the database on every insert, and an index
    in read order. Looked up first: an ``ALTER TABLE`` takes the table's strongest lock even
    when there is nothing to add, and every API replica and forwarder opens a feed."""
    inspector = sa.inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    for src in SOURCES:
        name = _tables()[src].name
        if XID in {c["name"] for c in inspector.get_columns(name)}:
            continue
        conn.exec_driver_sql(f"ALTER TABLE {quote(name)} ADD COLUMN {XID} bigint "
                             "DEFAULT (pg_current_xact_id()::text)::bigint")
        conn.exec_driver_sql(f"CREATE INDEX {quote('ix_' + name + '_' + XID)} ON {quote(name)} ({XID}, id)")


class _Order:
    """How one read orders a source's rows and which it may pass: ``(qalloc_xid, id)`` below the
    oldest running transaction on PostgreSQL, ``id`` on SQLite (module docstring)."""

    def __init__(self, conn: sa.Connection) -> None:
        self.pg = conn.dialect.name == "postgresql"
        self.xmin = (int(conn.exec_driver_sql("SELECT (pg_snapshot_xmin(pg_current_snapshot())::text)::bigint")
                         .scalar_one()) if self.pg else 0)

    def cols(self, t: sa.Table) -> list[Any]:
        if not self.pg:
            return [t.c.id]
        return [sa.func.coalesce(sa.literal_column(f"{t.name}.{XID}", sa.BigInteger), 0), t.c.id]

    def where(self, t: sa.Table, after: Key) -> list[Any]:
        """Rows after ``after`` that no transaction still running can come before."""
        if not self.pg:
            return [t.c.id > after[1]]
        xid, rid = self.cols(t)
        return [sa.tuple_(xid, rid) > sa.tuple_(sa.literal(after[0]), sa.literal(after[1])), xid < self.xmin]

    def key(self, row: Any) -> Key:
        return (int(row.xid), int(row.id)) if self.pg else (0, int(row.id))

    def select(self, t: sa.Table, *extra: Any) -> Any:
        """``SELECT xid, id, *extra`` (the key first, labelled ``xid`` and ``id``)."""
        xid = self.cols(t)[0] if self.pg else sa.literal(0)
        return sa.select(xid.label("xid"), t.c.id.label("id"), *extra)

    def ordered(self, q: Any, t: sa.Table, *, desc: bool = False) -> Any:
        return q.order_by(*[c.desc() if desc else c for c in self.cols(t)])


def count_after(engine: Engine, cursor: Cursor, sources: Iterable[str]) -> int:
    """How many changes of ``sources`` are after ``cursor`` and final (a sink's lag)."""
    tables = _tables()
    total = 0
    with engine.connect() as conn:
        order = _Order(conn)
        for src in sources:
            t = tables[src]
            q = sa.select(sa.func.count()).select_from(t).where(*order.where(t, cursor.key(src)))
            total += int(conn.execute(q).scalar_one())
    return total


class ChangeFeed:
    """Reads changes after a cursor. Thread-safe (a read is a few SELECTs); blocking: call it
    off the event loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.t = _tables()
        ensure_tables(engine)

    def visible(self, admin: bool) -> tuple[str, ...]:
        return SOURCES if admin else tuple(s for s in SOURCES if s not in ADMIN_ONLY)

    def head(self) -> Cursor:
        """The position of the newest final change of every source: reading from it gives what
        comes next (on PostgreSQL also what transactions still running will add)."""
        cursor = Cursor()
        with self.engine.connect() as conn:
            order = _Order(conn)
            for s in SOURCES:
                t = self.t[s]
                q = order.ordered(order.select(t).where(*order.where(t, (0, 0))), t, desc=True).limit(1)
                row = conn.execute(q).first()
                if row is not None:
                    cursor = cursor.moved(s, order.key(row))
        return cursor

    def read(self, after: Cursor, *, tenant: str | None, admin: bool, limit: int = 500,
             sources: tuple[str, ...] | None = None) -> tuple[list[Change], Cursor]:
        """Up to ``limit`` changes after ``after`` that this caller may see, merged by time, and
        the position to read from next (past rows it may not see, too). ``sources``: only these
        (a reader that wants job changes only does not page through alerts)."""
        rows: dict[str, list[tuple[float, Key, dict[str, Any]]]] = {}
        skip_to: dict[str, Key] = {}
        with self.engine.connect() as conn:
            order = _Order(conn)
            for src in self.visible(admin):
                if sources is not None and src not in sources:
                    continue
                got, scanned = self._read(conn, order, src, after.key(src), tenant if not admin else None, limit)
                rows[src] = got
                if scanned is not None:
                    skip_to[src] = scanned
        heads = [(lst[0][0], SOURCES.index(src), src, 0) for src, lst in rows.items() if lst]
        heapq.heapify(heads)
        out: list[Change] = []
        cursor = after
        while heads and len(out) < limit:
            at, _, src, i = heapq.heappop(heads)
            _, key, data = rows[src][i]
            cursor = cursor.moved(src, key)
            out.append(Change(KIND[src], at, cursor, data))
            if i + 1 < len(rows[src]):
                heapq.heappush(heads, (rows[src][i + 1][0], SOURCES.index(src), src, i + 1))
        if len(out) < limit:    # every row read went out: skip past the invisible ones scanned
            for src, to in skip_to.items():
                if to > cursor.key(src):
                    cursor = cursor.moved(src, to)
        return out, cursor

    def _read(self, conn: sa.Connection, order: _Order, src: str, after: Key, tenant: str | None,
              limit: int) -> tuple[list[tuple[float, Key, dict[str, Any]]], Key | None]:
        t = self.t[src]
        if src == "j":
            return self._read_jobs(conn, order, t, after, tenant, limit)
        q = order.ordered(order.select(t, *[c for c in t.c if c.name != "id"]).where(*order.where(t, after)), t).limit(limit)
        out = []
        for r in conn.execute(q):
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
            out.append((at, order.key(r), data))
        return out, None

    def _read_jobs(self, conn: sa.Connection, order: _Order, t: sa.Table, after: Key, tenant: str | None,
                   limit: int) -> tuple[list[tuple[float, Key, dict[str, Any]]], Key | None]:
        """Job transitions, joined with their job for the tenant; a tenant's read looks at most
        ``_SCAN`` rows past ``after`` and says how far it looked, so a reader that sees few of
        the rows still moves on."""
        jobs = self.t["jobs"]
        where = order.where(t, after)
        scan_hi: Key | None = None
        if tenant is not None:
            window = order.ordered(order.select(t).where(*where), t).limit(_SCAN).subquery()
            last = conn.execute(sa.select(window.c.xid, window.c.id)
                                .order_by(window.c.xid.desc(), window.c.id.desc()).limit(1)).first()
            if last is None:
                return [], None
            scan_hi = order.key(last)
            xid, rid = order.cols(t) if order.pg else (sa.literal(0), t.c.id)
            where = where + [jobs.c.tenant == tenant,
                             sa.tuple_(xid, rid) <= sa.tuple_(sa.literal(scan_hi[0]), sa.literal(scan_hi[1]))
                             if order.pg else t.c.id <= scan_hi[1]]
        q = (order.select(t, t.c.at, t.c.job_id, t.c.name, t.c.from_state, t.c.to_state, t.c.stimulus,
                          jobs.c.tenant, jobs.c.priority)
             .select_from(t.join(jobs, jobs.c.id == t.c.job_id)).where(*where))
        got = [(float(r.at), order.key(r), {"job_id": r.job_id, "event": r.name, "from": r.from_state,
                                            "to": r.to_state, "why": r.stimulus or "", "tenant": r.tenant,
                                            "priority": r.priority})
               for r in conn.execute(order.ordered(q, t).limit(limit))]
        if scan_hi is not None and len(got) == limit:
            scan_hi = None     # the caller stops at the last row it takes, not past the scan
        return got, scan_hi


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
