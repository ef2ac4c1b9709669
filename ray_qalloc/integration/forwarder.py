"""Job transitions and audit changes to SIEM sinks, at least once, from a durable position per sink.

Why a forwarder and not the alert outbox: the outbox writes one delivery row per sink for
every event, which is right for a few alerts an hour and wrong for every transition of every
job (it would put a write per sink on the job's hot path). Every job transition and every
audit change is already committed to an append-only table with an increasing id (the change
feed, ``ray_qalloc.changefeed``); a sink only needs to remember how far it has read. So each
sink has one row in ``qalloc_sink_positions``: its feed cursor, its backoff, counters.

One pass for one sink (``pump``): read the admin view of the feed after its cursor, keep the
kinds it subscribes to (``records``: ``jobs`` = feed kind ``job``, ``audit`` = ``config``;
alerts keep going through the outbox), render each in the sink's format, send them in
order, and after **each** delivered record write the cursor just past it. The cursor is
written only after the receiver accepted the record, so a crash (or a lost answer) between
the two repeats that one record and never skips one: at least once, and the duplicate is
exactly the last unacknowledged record. Per record rather than per batch: one small UPDATE
is cheap next to a network round trip, and it keeps the duplicates after a crash to one.
The update is conditional on the cursor it read, so a second forwarder on the same
database (two allocators for a moment) stops instead of moving the position backwards.

Dedupe key: the change's position in its own source, ``j:<transition id>`` or
``c:<audit id>`` (``records.ChangeRecord``) — the same on every retry, restart and
process — sent where each sink sends an alert's key (webhook ``Idempotency-Key``; HEC
``fields.idempotency_key``; syslog structured data ``key``, CEF ``externalId``, OCSF
``metadata.uid``).

Failures: a retryable one stops the sink for this pass and sets its backoff with the
outbox's ``RetryPolicy.delay`` (exponential, jitter, at least what ``Retry-After`` asked);
the record is tried again first, so order is kept. A refusal (``permanent``) — or a record
that cannot be rendered in the sink's format — dead-letters that record only: it is logged
and counted, the cursor moves past it, and the rest go on. Nothing is given up on by age
(``give_up_after_s`` is the outbox's): a sink that is down for a day lags by a day's records,
shown in ``qalloc sinks`` and the ``qalloc_sink_lag_records`` gauge, and catches up.

A sink seen for the first time starts at the feed's head — what happens from now on — not
at the beginning of history (which may be months of jobs). Its row stays when it is removed
from the configuration, so adding it back under the same name resumes where it stopped;
delete its row to start it from now again.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.alerts.outbox import RetryPolicy
from ray_qalloc.alerts.passes import PassThread
from ray_qalloc.alerts.sinks import FORWARDED_KINDS, DeliveryError, RecordSink
from ray_qalloc.changefeed import ChangeFeed, Cursor
from ray_qalloc.integration.records import CHANGE_SOURCES, ChangeRecord
from ray_qalloc.metrics import metrics

log = logging.getLogger(__name__)

metadata = sa.MetaData()

positions_table = sa.Table(
    "qalloc_sink_positions", metadata,
    sa.Column("sink", sa.String(64), primary_key=True),
    sa.Column("cursor", sa.String(128), nullable=False),          # changefeed.Cursor text
    sa.Column("attempts", sa.Integer, nullable=False, default=0),  # failures in a row of the head record
    sa.Column("next_attempt_at", sa.Float, nullable=False, default=0.0),
    sa.Column("last_error", sa.Text),
    sa.Column("last_error_at", sa.Float),
    sa.Column("last_delivered_at", sa.Float),
    sa.Column("delivered", sa.BigInteger, nullable=False, default=0),
    sa.Column("dead", sa.BigInteger, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
)

#: ``records`` entry → the change feed source read for it (for the lag count).
_SOURCE_OF = {rec: CHANGE_SOURCES[kind] for rec, kind in FORWARDED_KINDS.items()}
_RECORD_OF = {kind: rec for rec, kind in FORWARDED_KINDS.items()}   # feed kind → records entry


def ensure_table(engine: Engine) -> None:
    """Create the positions table; another process creating it at the same moment is fine."""
    from ray_qalloc.store import create_tables

    create_tables(engine, metadata)


@dataclass
class ForwardReport:
    """What one ``pump`` did, per sink (a sink still backing off is in ``waiting``)."""

    delivered: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    next_due_at: float | None = None

    def add(self, what: str, sink: str, n: int = 1) -> None:
        bucket = getattr(self, what)
        bucket[sink] = bucket.get(sink, 0) + n

    def due(self, at: float) -> None:
        self.next_due_at = at if self.next_due_at is None else min(self.next_due_at, at)

    def to_dict(self) -> dict[str, Any]:
        return {"delivered": dict(self.delivered), "failed": dict(self.failed), "dead": dict(self.dead),
                "waiting": list(self.waiting), "next_due_at": self.next_due_at}


class _Moved(Exception):
    """Another forwarder moved this sink's position: stop this pass, re-read next time."""


class Forwarder:
    """Sends the change feed's job transitions and audit changes to each subscribed sink.

    ``records`` maps a sink name to what it subscribes to (``{"jobs", "audit"}``, ``alerts``
    ignored); a sink subscribed to neither is not touched. ``pump(now)`` is one pass;
    ``start`` runs passes on a daemon thread."""

    def __init__(self, engine: Engine, sinks: Mapping[str, RecordSink], records: Mapping[str, set[str]],
                 retry: RetryPolicy | None = None, *, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, max_per_pass: int = 10_000) -> None:
        self.engine = engine
        self.retry = retry or RetryPolicy()
        self.subscriptions: dict[str, frozenset[str]] = {}
        for name, wanted in records.items():
            kinds = frozenset(r for r in wanted if r in FORWARDED_KINDS)
            if not kinds:
                continue
            if name not in sinks:
                raise ValueError(f"sink {name!r} subscribes to {sorted(kinds)} but was not given to the forwarder. "
                                 "To fix: pass it in sinks, or leave it out of records.")
            self.subscriptions[name] = kinds
        self.sinks = {n: sinks[n] for n in self.subscriptions}
        self._clock = clock
        self._rand = rand
        self.max_per_pass = max_per_pass
        self.feed = ChangeFeed(engine)
        ensure_table(engine)
        self._start_new_sinks()
        self._loop = PassThread("qalloc-sink-forward", lambda: self.pump_report().next_due_at, clock,
                                "forwarding pass")

    # ---- positions ---------------------------------------------------------------------------
    def _start_new_sinks(self) -> None:
        """A sink without a row starts at the feed's head (now), not at the start of history."""
        p = positions_table
        with self.engine.connect() as conn:
            have = set(conn.execute(sa.select(p.c.sink).where(p.c.sink.in_(list(self.subscriptions)))).scalars())
        new = [n for n in self.subscriptions if n not in have]
        if not new:
            return
        head = str(self.feed.head())
        now = float(self._clock())
        for name in new:
            try:
                with self.engine.begin() as conn:
                    conn.execute(p.insert().values(sink=name, cursor=head, attempts=0, next_attempt_at=0.0,
                                                   delivered=0, dead=0, created_at=now))
                log.info("sink %s forwards %s from the feed's head %s", name, sorted(self.subscriptions[name]), head)
            except sa.exc.IntegrityError:     # another process added it first: keep its row
                pass

    def _row(self, name: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(positions_table).where(positions_table.c.sink == name)).first()

    def _save(self, name: str, old: Cursor, **values: Any) -> None:
        """Update the sink's row if its cursor is still ``old`` (else another forwarder moved it)."""
        p = positions_table
        with self.engine.begin() as conn:
            res = conn.execute(p.update().where(p.c.sink == name, p.c.cursor == str(old)).values(**values))
        if res.rowcount != 1:
            raise _Moved(name)

    # ---- one pass ----------------------------------------------------------------------------
    def pump(self, now: float | None = None) -> dict[str, Any]:
        """One pass for every sink whose backoff has passed; returns ``ForwardReport.to_dict()``."""
        report = self.pump_report(now)
        return report.to_dict()

    def pump_report(self, now: float | None = None) -> ForwardReport:
        report = ForwardReport()
        for name in self.subscriptions:
            if self._loop.stopping.is_set():
                break
            try:
                self._pass(name, now, report)
            except _Moved:
                log.warning("sink %s: another forwarder moved its position; this one stops for the pass", name)
            except sa.exc.SQLAlchemyError:
                log.exception("sink %s: forwarding pass failed on the database; tried again next pass", name)
            try:
                metrics.sink_lag(name, self.lag(name))
            except sa.exc.SQLAlchemyError:
                pass
        return report

    def _pass(self, name: str, now: float | None, report: ForwardReport) -> None:
        row = self._row(name)
        if row is None:        # deleted by hand while running: start it from now again
            self._start_new_sinks()
            return
        t = float(self._clock()) if now is None else float(now)
        if row.next_attempt_at > t:
            report.waiting.append(name)
            report.due(row.next_attempt_at)
            return
        sink, kinds = self.sinks[name], self.subscriptions[name]
        cursor = saved = Cursor.parse(row.cursor, "qalloc_sink_positions.cursor")
        attempts = int(row.attempts)
        seen = 0             # changes looked at this pass: a long backlog is worked off over several
        sources = tuple(_SOURCE_OF[r] for r in kinds if r in _SOURCE_OF)
        while seen < self.max_per_pass and not self._loop.stopping.is_set():
            changes, _ = self.feed.read(cursor, tenant=None, admin=True, limit=self.retry.batch, sources=sources)
            for change in changes:
                seen += 1
                rec = _RECORD_OF.get(change.kind)
                if rec not in kinds:
                    cursor = change.cursor          # not for this sink: stepped over, saved with the next
                    continue
                record = _record(change)
                try:
                    sink.send_record(record)
                except DeliveryError as exc:
                    if exc.permanent:
                        cursor = saved = self._dead(name, saved, change.cursor, record, rec, str(exc), t, report)
                        attempts = 0
                        continue
                    self._failed(name, saved, cursor, attempts, record, rec, exc, t, report)
                    return
                except ValueError as exc:     # the change cannot be rendered in this format: it never will be
                    cursor = saved = self._dead(name, saved, change.cursor, record, rec, f"not rendered: {exc}", t,
                                                report)
                    attempts = 0
                    continue
                except Exception as exc:  # noqa: BLE001 - a sink's bug is retried like an outage, and logged
                    log.exception("sink %s raised on record %s", name, record.key)
                    self._failed(name, saved, cursor, attempts, record, rec,
                                 DeliveryError(f"{exc.__class__.__name__}: {exc}"), t, report)
                    return
                done = float(self._clock()) if now is None else t
                self._save(name, saved, cursor=str(change.cursor), attempts=0, next_attempt_at=0.0,
                           last_delivered_at=done, delivered=positions_table.c.delivered + 1)
                cursor = saved = change.cursor
                attempts = 0
                report.add("delivered", name)
                metrics.sink_records(name, rec, "delivered")
            if len(changes) < self.retry.batch:   # caught up
                break
        if cursor != saved:                  # only stepped-over changes since the last save
            self._save(name, saved, cursor=str(cursor))

    def _dead(self, name: str, saved: Cursor, to: Cursor, record: ChangeRecord, rec: str, error: str, now: float,
              report: ForwardReport) -> Cursor:
        log.error("sink %s refused %s record %s for good; skipped (dead-lettered): %s", name, rec, record.key, error,
                  extra={"sink": name, "record": record.to_dict()})
        self._save(name, saved, cursor=str(to), attempts=0, next_attempt_at=0.0, last_error=error[:2000],
                   last_error_at=now, dead=positions_table.c.dead + 1)
        report.add("dead", name)
        metrics.sink_records(name, rec, "dead")
        return to

    def _failed(self, name: str, saved: Cursor, cursor: Cursor, attempts: int, record: ChangeRecord, rec: str,
                exc: DeliveryError, now: float, report: ForwardReport) -> None:
        """Back off: the record is tried again first when ``next_attempt_at`` has passed."""
        due = now + self.retry.delay(attempts + 1, self._rand(), exc.retry_after_s)
        log.warning("sink %s: record %s not delivered (attempt %d), next try in %.1f s: %s", name, record.key,
                    attempts + 1, due - now, exc)
        self._save(name, saved, cursor=str(cursor), attempts=attempts + 1, next_attempt_at=due,
                   last_error=str(exc)[:2000], last_error_at=now)
        report.add("failed", name)
        report.due(due)
        metrics.sink_records(name, rec, "failed")

    # ---- inspection --------------------------------------------------------------------------
    def lag(self, name: str, cursor: Cursor | None = None) -> int:
        """Records ``name`` subscribes to that are after its position (one indexed count per source)."""
        if cursor is None:
            row = self._row(name)
            if row is None:
                return 0
            cursor = Cursor.parse(row.cursor, "qalloc_sink_positions.cursor")
        return count_after(self.engine, cursor, self.subscriptions.get(name, frozenset()))

    def status(self) -> list[dict[str, Any]]:
        """Per subscribed sink: position, lag, attempts, next attempt, last error, delivered, dead."""
        return sink_status(self.engine, {n: set(k) for n, k in self.subscriptions.items()})

    # ---- background -----------------------------------------------------------------------------
    def start(self, interval_s: float = 1.0) -> None:
        """Forward in a daemon thread: a pass at least every ``interval_s`` (new changes are
        found by reading, so this is also the forwarding delay), or when a backoff ends."""
        if self.subscriptions:
            self._loop.start(interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._loop.stop(timeout_s)


def _record(change: Any) -> ChangeRecord:
    src = CHANGE_SOURCES[change.kind]
    return ChangeRecord(kind=change.kind, key=f"{src}:{change.cursor.get(src)}", at=change.at, data=change.data)


def count_after(engine: Engine, cursor: Cursor, records: set[str] | frozenset[str]) -> int:
    """How many changes of the sources behind ``records`` (jobs, audit) are after ``cursor``."""
    from ray_qalloc.changefeed import count_after as changes_after

    return changes_after(engine, cursor, sorted({_SOURCE_OF[r] for r in records if r in _SOURCE_OF}))


def sink_status(engine: Engine, records: Mapping[str, set[str]]) -> list[dict[str, Any]]:
    """Per sink in ``records`` (name → its subscriptions), its row in ``qalloc_sink_positions``
    and its lag; a sink with no row yet shows ``position`` None. Reads only the database, so
    ``qalloc sinks`` needs no Ray."""
    ensure_table(engine)
    from ray_qalloc.changefeed import ensure_tables

    ensure_tables(engine)
    p = positions_table
    with engine.connect() as conn:
        rows = {r.sink: r for r in conn.execute(sa.select(p).where(p.c.sink.in_(list(records))))}
    out = []
    for name in records:
        kinds = sorted(r for r in records[name] if r in FORWARDED_KINDS)
        r = rows.get(name)
        if r is None:
            out.append({"sink": name, "records": kinds, "position": None, "lag": None, "attempts": 0,
                        "next_attempt_at": None, "last_error": None, "last_error_at": None,
                        "last_delivered_at": None, "delivered": 0, "dead": 0})
            continue
        cursor = Cursor.parse(r.cursor, "qalloc_sink_positions.cursor")
        out.append({"sink": name, "records": kinds, "position": r.cursor,
                    "lag": count_after(engine, cursor, set(kinds)), "attempts": int(r.attempts),
                    "next_attempt_at": r.next_attempt_at or None, "last_error": r.last_error,
                    "last_error_at": r.last_error_at, "last_delivered_at": r.last_delivered_at,
                    "delivered": int(r.delivered), "dead": int(r.dead)})
    return out


__all__ = ["ForwardReport", "Forwarder", "count_after", "ensure_table", "positions_table", "sink_status"]
