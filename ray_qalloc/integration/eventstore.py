"""The durable store of normalized security events (and of the answers to idempotent batches).

Why a table of its own on the job store's database: an event is *accepted* only once it is
committed (the same promise a job gets), and rules that turn events into allocation actions
(later) read them next to the jobs they act on. Tables live in this module's own
``MetaData`` on the engine ``ray_qalloc.store.make_engine`` opens (WAL SQLite embedded, or
PostgreSQL by URL), created under a lock so that the API replicas, the syslog listener and
the CLI may open one store at the same moment.

Tables:

* ``security_events`` — one row per (tenant, id). ``id`` is the hash of the raw record
  (``events.event_id``), so the same record sent twice is stored once: ``add_many`` reports
  it as a *duplicate*, never as an error. Times are integer microseconds since the epoch
  (UTC): exact, so a keyset cursor never skips or repeats a row at a page boundary.
  ``event`` is the normalized event as JSON without ``raw``; ``raw`` is the record verbatim.
* ``security_event_requests`` — the answer given to a ``POST /v1/events`` that carried an
  ``Idempotency-Key``: its body's SHA-256, status and JSON answer, keyed (tenant, key). It is
  written in the same transaction as the batch's events, so a retry finds either both or
  neither.

Speed: ``add_many`` is one transaction with one ``executemany`` of plain tuples through the
driver (``INSERT ... ON CONFLICT (tenant, id) DO NOTHING``), as ``monitor/calseries.py``
does: SQLAlchemy's per-row parameter handling would cost more than parsing a CEF line.
Retention (``EventSettings.retention_s``) is by ``received_at``, not by the source's time:
a source that replays last year's log must not have its events deleted on arrival.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.config import EventSettings
from ray_qalloc.exceptions import InvalidEvent, StoreError
from ray_qalloc.integration.events import SecurityEvent
from ray_qalloc.store import make_engine

__all__ = ["EventStore", "EventPage", "StoredAnswer", "Cursor", "events_table", "requests_table", "metadata",
           "to_us", "severity_filter"]

metadata = sa.MetaData()


events_table = sa.Table(
    "security_events", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),           # events.event_id(raw): unique per tenant
    sa.Column("time", sa.BigInteger, nullable=False),           # µs since the epoch, UTC (source time)
    sa.Column("received_at", sa.BigInteger, nullable=False),    # µs since the epoch, UTC
    sa.Column("class_uid", sa.Integer, nullable=False),
    sa.Column("category_uid", sa.Integer, nullable=False),
    sa.Column("severity_id", sa.Integer, nullable=False),
    sa.Column("format", sa.String(8), nullable=False),
    sa.Column("message", sa.Text),
    sa.Column("event", sa.Text, nullable=False),                # JSON of the SecurityEvent without raw
    sa.Column("raw", sa.Text, nullable=False),
)
# The query's orders: a tenant's events by time (keyset on (time, id)), optionally of one
# category or class; retention deletes by received_at across tenants.
sa.Index("ix_security_events_tenant_time", events_table.c.tenant, events_table.c.time, events_table.c.id)
sa.Index("ix_security_events_tenant_category", events_table.c.tenant, events_table.c.category_uid,
         events_table.c.time)
sa.Index("ix_security_events_tenant_class", events_table.c.tenant, events_table.c.class_uid, events_table.c.time)
sa.Index("ix_security_events_received", events_table.c.received_at)

requests_table = sa.Table(
    "security_event_requests", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),               # JSON
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Index("ix_security_event_requests_created", requests_table.c.created_at)

_COLUMNS = ("tenant", "id", "time", "received_at", "class_uid", "category_uid", "severity_id", "format",
            "message", "event", "raw")
_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s", "numeric": ":{n}"}   # positional styles
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_INT64 = 2**63 - 1


def to_us(when: dt.datetime) -> int:
    """Microseconds since the epoch; a naive datetime is read as UTC (as the parsers give UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _insert_sql(paramstyle: str, quote: Callable[[str], str]) -> str:
    mark = _PLACEHOLDERS[paramstyle]
    marks = ", ".join(mark.format(n=n) for n in range(1, len(_COLUMNS) + 1))
    cols = ", ".join(quote(c) for c in _COLUMNS)
    return (f"INSERT INTO {events_table.name} ({cols}) VALUES ({marks}) "
            f"ON CONFLICT (tenant, id) DO NOTHING")


_SERIALIZER = SecurityEvent.__pydantic_serializer__
_NO_RAW = {"raw"}


def row_of(event: SecurityEvent) -> tuple[Any, ...]:
    """The row tuple of one event, in ``_COLUMNS`` order. The JSON comes from pydantic's Rust
    serializer called directly (~9 µs an event; ``model_dump_json`` adds ~2 µs of wrapping)."""
    return (event.tenant, event.id, to_us(event.time), to_us(event.received_at), event.class_uid,
            event.category_uid, int(event.severity_id), event.format, event.message,
            _SERIALIZER.to_json(event, exclude=_NO_RAW).decode(), event.raw)


def severity_filter(severity_min: int) -> sa.ColumnElement[bool] | None:
    """"At least ``severity_min``" on OCSF's scale: 1–6 are ordered (Informational → Fatal), so
    at least High (4) is 4, 5 or 6; 0 (Unknown) asks for everything; 99 (Other) is not on the
    scale and matches only itself."""
    col = events_table.c.severity_id
    if severity_min <= 0:
        return None
    if severity_min == 99:
        return col == 99
    return col.between(severity_min, 6)


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last item's (time µs, id). Rendered as ``"<time_us>_<id>"``."""

    time_us: int
    id: str

    def render(self) -> str:
        return f"{self.time_us}_{self.id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        head, _, ident = text.partition("_")
        try:
            time_us = int(head)
        except ValueError:
            time_us = None  # type: ignore[assignment]
        if time_us is None or not -_INT64 <= time_us <= _INT64 or not ident or len(ident) > 64 \
                or not ident.isalnum():
            raise InvalidEvent(f"cursor {text[:80]!r} is not one this API gave.", field="cursor",
                               fix="pass the next_cursor of the previous page unchanged, or leave it out.")
        return cls(time_us, ident)


@dataclass(frozen=True)
class EventPage:
    """One page of a tenant's events, newest first; ``next_cursor`` is None on the last page."""

    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True)
class StoredAnswer:
    """The answer once given to a batch with an Idempotency-Key."""

    body_sha256: str
    status: int
    answer: dict[str, Any]


def body_digest(body: bytes, content_type: str | None) -> str:
    """What "the same request" means for an Idempotency-Key: the same bytes in the same format."""
    h = hashlib.sha256()
    h.update((content_type or "").split(";", 1)[0].strip().lower().encode())
    h.update(b"\0")
    h.update(body)
    return h.hexdigest()


class EventStore:
    """Normalized security events behind SQLAlchemy Core (see the module docstring)."""

    def __init__(self, engine: Engine | str, settings: EventSettings | None = None, *,
                 prune_every_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self._owns_engine = isinstance(engine, str)
        self.engine = make_engine(engine) if isinstance(engine, str) else engine
        self.settings = settings or EventSettings()
        self._clock = clock
        self._prune_every_s = prune_every_s
        self._last_prune = clock()
        try:
            create_schema(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot create the security event tables: {exc.__class__.__name__}: {exc}",
                             fix="check the database URL and that the store is writable.") from None
        dialect = self.engine.dialect
        self._fast_sql = (_insert_sql(dialect.paramstyle, dialect.identifier_preparer.quote)
                          if dialect.paramstyle in _PLACEHOLDERS and dialect.name in ("sqlite", "postgresql")
                          else None)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    # ---- writing -----------------------------------------------------------------------------
    def add_many(self, events: Sequence[SecurityEvent]) -> tuple[int, int]:
        """Commit ``events`` in one transaction; returns ``(stored, duplicates)``. A duplicate is
        an event whose (tenant, id) is stored already, or repeats an earlier one of the batch."""
        if not events:
            return 0, 0
        rows = [row_of(e) for e in events]
        with self.engine.begin() as conn:
            stored = self._insert(conn, rows)
        self.maybe_prune()
        return stored, len(rows) - stored

    def add_batch(self, events: Sequence[SecurityEvent], *, tenant: str, key: str, body_sha256: str,
                  answer: Callable[[int, int], tuple[int, dict[str, Any]]]) -> tuple[StoredAnswer, bool]:
        """``add_many`` for a request with an Idempotency-Key: the events and the answer
        (``answer(stored, duplicates) -> (status, body)``) commit together. Returns the answer and
        True; or, when the key is stored already (an earlier request, or one racing this one),
        nothing is written and the stored answer comes back with False: the caller compares its
        ``body_sha256``."""
        rows = [row_of(e) for e in events]
        try:
            with self.engine.begin() as conn:
                stored = self._insert(conn, rows) if rows else 0
                status, body = answer(stored, len(rows) - stored)
                conn.execute(requests_table.insert(), {
                    "tenant": tenant, "key": key, "body_sha256": body_sha256, "status": status,
                    "answer": json.dumps(body, separators=(",", ":")), "created_at": self._clock()})
        except sa.exc.IntegrityError:   # the key's row: the other request's events stay, ours roll back
            prior = self.answer_for(tenant, key)
            if prior is None:
                raise
            return prior, False
        self.maybe_prune()
        return StoredAnswer(body_sha256, status, body), True

    def answer_for(self, tenant: str, key: str) -> StoredAnswer | None:
        """The stored answer of an earlier batch with this Idempotency-Key, if there is one."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(requests_table.c.body_sha256, requests_table.c.status,
                                         requests_table.c.answer)
                               .where(requests_table.c.tenant == tenant, requests_table.c.key == key)).first()
        return None if row is None else StoredAnswer(row.body_sha256, row.status, json.loads(row.answer))

    def _insert(self, conn: sa.Connection, rows: list[tuple[Any, ...]]) -> int:
        if self._fast_sql is not None:
            result = conn.exec_driver_sql(self._fast_sql, rows)
            return int(result.rowcount)
        # other databases: a portable path, one statement per row (a duplicate raises there)
        stored = 0
        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(events_table.insert(), dict(zip(_COLUMNS, row)))
                stored += 1
            except sa.exc.IntegrityError:
                pass
        return stored

    # ---- retention ---------------------------------------------------------------------------
    def maybe_prune(self, now: float | None = None) -> int:
        """``prune`` at most every ``prune_every_s``: writers call it, so nobody has to schedule it."""
        now = self._clock() if now is None else now
        if now - self._last_prune < self._prune_every_s:
            return 0
        return self.prune(now)

    def prune(self, now: float | None = None) -> int:
        """Delete events received more than ``retention_s`` before ``now`` (and idempotency
        answers as old); returns the events deleted."""
        now = self._clock() if now is None else now
        self._last_prune = now
        cutoff = now - self.settings.retention_s
        with self.engine.begin() as conn:
            gone = conn.execute(events_table.delete().where(
                events_table.c.received_at < int(cutoff * 1_000_000))).rowcount or 0
            conn.execute(requests_table.delete().where(requests_table.c.created_at < cutoff))
        return int(gone)

    # ---- reading -----------------------------------------------------------------------------
    def query(self, tenant: str, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
              severity_min: int | None = None, category: int | None = None, class_uid: int | None = None,
              limit: int = 100, cursor: str | Cursor | None = None, raw: bool = False) -> EventPage:
        """A tenant's events, newest first (by source time, then id), ``since`` ≤ time < ``until``;
        ``severity_min`` as in ``severity_filter``. Keyset pagination: pass ``next_cursor`` back."""
        t = events_table.c
        cols = [t.time, t.id, t.event] + ([t.raw] if raw else [])
        stmt = sa.select(*cols).where(t.tenant == tenant)
        if since is not None:
            stmt = stmt.where(t.time >= to_us(since))
        if until is not None:
            stmt = stmt.where(t.time < to_us(until))
        if severity_min is not None and (cond := severity_filter(severity_min)) is not None:
            stmt = stmt.where(cond)
        if category is not None:
            stmt = stmt.where(t.category_uid == category)
        if class_uid is not None:
            stmt = stmt.where(t.class_uid == class_uid)
        if cursor is not None:
            c = Cursor.parse(cursor) if isinstance(cursor, str) else cursor
            stmt = stmt.where(sa.or_(t.time < c.time_us, sa.and_(t.time == c.time_us, t.id < c.id)))
        stmt = stmt.order_by(t.time.desc(), t.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        items: list[dict[str, Any]] = []
        for row in rows[:limit]:
            item = json.loads(row.event)
            if raw:
                item["raw"] = row.raw
            items.append(item)
        more = len(rows) > limit
        last = rows[limit - 1] if more else None
        return EventPage(items, Cursor(last.time, last.id).render() if last is not None else None)

    def count(self, tenant: str | None = None) -> int:
        stmt = sa.select(sa.func.count()).select_from(events_table)
        if tenant is not None:
            stmt = stmt.where(events_table.c.tenant == tenant)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())


def count_events(events: Sequence[SecurityEvent], dups: int, source: str,
                 rejected_formats: Sequence[str | None] = ()) -> None:
    """Events in (the API's batches and the syslog listener alike), by format and outcome.
    Duplicates are known per batch, not per event: in a batch of one format (the usual case)
    exactly; in a mixed one they are charged to its formats in batch order."""
    from ray_qalloc.metrics import metrics

    per_format: dict[str, int] = {}
    for e in events:
        per_format[e.format] = per_format.get(e.format, 0) + 1
    left = dups
    for fmt, n in per_format.items():
        d = min(n, left)
        left -= d
        metrics.events_in(source, fmt, "stored", n - d)
        metrics.events_in(source, fmt, "duplicate", d)
    for fmt in rejected_formats:
        metrics.events_in(source, fmt, "rejected", 1)


def create_schema(engine: Engine) -> None:
    """The tables, under the store's schema lock (``store.create_tables``)."""
    from ray_qalloc.store import create_tables

    create_tables(engine, metadata)
