"""The durable alert outbox and its dispatcher.

Why an outbox: an alert that was decided but not yet delivered must survive a crash of the
process that decided it, and a receiver that is down must get its events when it is back.
So an event is committed here, with one delivery row per sink, *before* any sink is tried;
the dispatcher then works through the pending rows and marks each delivered, per sink. A
crash between the two only delays delivery.

Delivery is at least once: a response lost after the receiver processed a request is
retried, and a crash after a send but before its row is marked repeats that send. Every
event therefore carries an idempotency key (``AlertEvent.key``, unique here too), and a
receiver that drops keys it has seen gets every event exactly once.

Per sink, rows go out in commit order, and the first failure stops that sink for the pass:
its head row's ``next_attempt_at`` (exponential backoff with jitter, at least what a
``Retry-After`` asked) is then the sink's backoff, so a receiver that is down is probed, not
flooded, and a resolve never overtakes its firing. A refusal (``permanent``) or an event
older than ``give_up_after_s`` is marked ``dead`` and no longer blocks the sink.

One dispatcher per outbox is expected (the allocator's); two would only cause duplicates,
which the keys absorb. Tables live in their own metadata, on the job store's database by
default (``ray_qalloc.store.make_engine``: WAL SQLite, or PostgreSQL).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from ray_qalloc.alerts.engine import AlertEvent
from ray_qalloc.alerts.passes import PassThread
from ray_qalloc.alerts.sinks import DeliveryError, Sink
from ray_qalloc.store import make_engine

log = logging.getLogger(__name__)

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

metadata = sa.MetaData()
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events_table = sa.Table(
    "alert_outbox", metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(64), nullable=False, unique=True),     # idempotency key
    sa.Column("fingerprint", sa.String(64), nullable=False, index=True),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),                    # JSON of AlertEvent.to_dict()
)

deliveries_table = sa.Table(
    "alert_deliveries", metadata,
    sa.Column("event_id", _BigId, sa.ForeignKey("alert_outbox.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("sink", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),                # pending | delivered | dead
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("delivered_at", sa.Float),
)
sa.Index("ix_alert_deliveries_sink_state", deliveries_table.c.sink, deliveries_table.c.state,
         deliveries_table.c.event_id)


class RetryPolicy(BaseModel):
    """How a failing sink is retried: ``base_s · multiplier^(attempts-1)``, capped at
    ``max_s``, shortened by up to ``jitter`` (a fraction) so that sinks do not retry in step."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    base_s: float = Field(1.0, gt=0, description="Wait after the first failure, seconds.")
    multiplier: float = Field(2.0, ge=1, description="Growth of the wait per further failure.")
    max_s: float = Field(300.0, gt=0, description="Longest wait between attempts (and cap on Retry-After).")
    jitter: float = Field(0.1, ge=0, lt=1, description="Fraction of the wait taken off at random.")
    give_up_after_s: float | None = Field(86_400.0, gt=0, description="An event still undelivered this long "
                                          "after it was committed is marked dead; never when unset.")
    batch: int = Field(100, ge=1, description="Rows read per sink per pass.")

    def delay(self, attempts: int, rand: float, retry_after_s: float | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failure (``rand`` in [0, 1))."""
        wait = min(self.max_s, self.base_s * self.multiplier ** max(attempts - 1, 0))
        wait *= 1.0 - self.jitter * rand
        if retry_after_s is not None:
            wait = max(wait, min(retry_after_s, self.max_s))
        return wait


@dataclass(frozen=True)
class PendingDelivery:
    event_id: int
    sink: str
    key: str
    payload: dict[str, Any]
    attempts: int
    next_attempt_at: float
    created_at: float


class Outbox:
    """Alert events and their per-sink delivery state, in SQL tables."""

    def __init__(self, engine: Engine | str, sinks: Sequence[str], *, clock: Callable[[], float] = time.time) -> None:
        if not sinks:
            raise ValueError("an outbox needs at least one sink name")
        self.engine = make_engine(engine) if isinstance(engine, str) else engine
        self._own_engine = isinstance(engine, str)
        self.sinks = tuple(dict.fromkeys(sinks))
        self._clock = clock
        metadata.create_all(self.engine)

    def close(self) -> None:
        if self._own_engine:
            self.engine.dispose()

    # ---- writing -------------------------------------------------------------------------
    def enqueue(self, events: Iterable[AlertEvent]) -> list[int]:
        """Commit events (and a pending delivery per sink) in one transaction; returns the ids of
        those that were new. An event whose key is already here is skipped: enqueueing is
        idempotent, so a caller that is unsure whether its commit landed may simply repeat it."""
        batch = list({e.key: e for e in events}.values())
        if not batch:
            return []
        for attempt in range(2):
            try:
                return self._insert(batch)
            except sa.exc.IntegrityError:  # another writer committed one of these keys in between
                if attempt:
                    raise
        return []

    def _insert(self, batch: list[AlertEvent]) -> list[int]:
        now = float(self._clock())
        ids: list[int] = []
        with self.engine.begin() as conn:
            have = set(conn.execute(sa.select(events_table.c.key).where(
                events_table.c.key.in_([e.key for e in batch]))).scalars())
            for ev in batch:
                if ev.key in have:
                    continue
                event_id = conn.execute(events_table.insert().values(
                    key=ev.key, fingerprint=ev.fingerprint, rule=ev.rule, status=ev.status, created_at=now,
                    payload=json.dumps(ev.to_dict(), allow_nan=False))).inserted_primary_key[0]
                conn.execute(deliveries_table.insert(), [
                    {"event_id": event_id, "sink": s, "state": PENDING, "attempts": 0, "next_attempt_at": now}
                    for s in self.sinks])
                ids.append(int(event_id))
        return ids

    def mark_delivered(self, event_id: int, sink: str) -> bool:
        """True when this call moved the row from pending to delivered."""
        return self._finish(event_id, sink, DELIVERED, None)

    def mark_dead(self, event_id: int, sink: str, error: str) -> bool:
        return self._finish(event_id, sink, DEAD, error)

    def _finish(self, event_id: int, sink: str, state: str, error: str | None) -> bool:
        d = deliveries_table
        with self.engine.begin() as conn:
            res = conn.execute(d.update().where(d.c.event_id == event_id, d.c.sink == sink, d.c.state == PENDING)
                               .values(state=state, delivered_at=float(self._clock()), last_error=error,
                                       attempts=d.c.attempts + 1))
        return res.rowcount == 1

    def mark_failed(self, event_id: int, sink: str, error: str, next_attempt_at: float) -> None:
        d = deliveries_table
        with self.engine.begin() as conn:
            conn.execute(d.update().where(d.c.event_id == event_id, d.c.sink == sink, d.c.state == PENDING)
                         .values(attempts=d.c.attempts + 1, last_error=error[:2000],
                                 next_attempt_at=next_attempt_at))

    # ---- reading -------------------------------------------------------------------------
    def pending(self, sink: str, limit: int = 100) -> list[PendingDelivery]:
        """The sink's pending deliveries in commit order (due or not: the head's time is the
        sink's backoff)."""
        e, d = events_table, deliveries_table
        q = (sa.select(d.c.event_id, d.c.attempts, d.c.next_attempt_at, e.c.key, e.c.payload, e.c.created_at)
             .join(e, e.c.id == d.c.event_id)
             .where(d.c.sink == sink, d.c.state == PENDING).order_by(d.c.event_id).limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [PendingDelivery(event_id=int(r.event_id), sink=sink, key=r.key, payload=json.loads(r.payload),
                                attempts=r.attempts, next_attempt_at=r.next_attempt_at, created_at=r.created_at)
                for r in rows]

    def deliveries(self, event_id: int) -> dict[str, dict[str, Any]]:
        """Per sink, the delivery row of one event (for inspection and tests)."""
        d = deliveries_table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(d).where(d.c.event_id == event_id)).all()
        return {r.sink: dict(r._mapping) for r in rows}

    def counts(self) -> dict[str, dict[str, int]]:
        """Per sink, how many deliveries are pending, delivered or dead (for metrics)."""
        d = deliveries_table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(d.c.sink, d.c.state, sa.func.count()).group_by(d.c.sink, d.c.state)).all()
        out: dict[str, dict[str, int]] = {s: {PENDING: 0, DELIVERED: 0, DEAD: 0} for s in self.sinks}
        for sink, state, n in rows:
            out.setdefault(sink, {PENDING: 0, DELIVERED: 0, DEAD: 0})[state] = n
        return out

    def events(self) -> list[AlertEvent]:
        """Every stored event, in commit order."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events_table.c.payload).order_by(events_table.c.id)).scalars().all()
        return [AlertEvent.from_dict(json.loads(p)) for p in rows]

    def recent(self, limit: int = 100) -> list[AlertEvent]:
        """The newest ``limit`` events, oldest first (the dashboard, ``qalloc alerts``)."""
        q = sa.select(events_table.c.payload).order_by(events_table.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(q).scalars().all()
        return [AlertEvent.from_dict(json.loads(p)) for p in reversed(rows)]

    def _latest_ids(self) -> sa.Subquery:
        e = events_table
        return (sa.select(sa.func.max(e.c.id).label("id")).where(e.c.status.in_(("firing", "resolved")))
                .group_by(e.c.fingerprint).subquery())

    def firing_events(self) -> list[AlertEvent]:
        """Per alert, its newest firing-or-resolved event when that is a firing one: what was
        last announced as firing, for ``AlertEngine.restore`` after a restart."""
        e = events_table
        latest = self._latest_ids()
        q = sa.select(e.c.payload).join(latest, latest.c.id == e.c.id).where(e.c.status == "firing").order_by(e.c.id)
        with self.engine.connect() as conn:
            return [AlertEvent.from_dict(json.loads(p)) for p in conn.execute(q).scalars()]

    def prune(self, before: float) -> int:
        """Delete events committed before ``before`` that no sink still waits for, keeping each
        alert's newest firing event (``firing_events`` needs it). Returns how many went."""
        e, d = events_table, deliveries_table
        latest = sa.select(self._latest_ids().c.id)
        waiting = sa.select(d.c.event_id).where(d.c.state == PENDING)
        doomed = sa.select(e.c.id).where(e.c.created_at < before, e.c.id.not_in(waiting),
                                         sa.or_(e.c.status != "firing", e.c.id.not_in(latest)))
        with self.engine.begin() as conn:
            ids = list(conn.execute(doomed).scalars())
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                conn.execute(d.delete().where(d.c.event_id.in_(chunk)))
                conn.execute(e.delete().where(e.c.id.in_(chunk)))
        return len(ids)


@dataclass
class DispatchReport:
    """What one pass did, per sink."""

    delivered: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    next_due_at: float | None = None    # earliest time a pending row becomes due, if any

    def total(self, what: str) -> int:
        return sum(getattr(self, what).values())


class Dispatcher:
    """Delivers the outbox's pending rows to each sink; ``deliver_due`` is one pass, ``start``
    runs passes in a thread (woken early by ``wake`` after an enqueue)."""

    def __init__(self, outbox: Outbox, sinks: Mapping[str, Sink], *, retry: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random) -> None:
        missing = [s for s in outbox.sinks if s not in sinks]
        if missing:
            raise ValueError(f"the outbox has deliveries for sinks {missing} that were not given to the dispatcher")
        self.outbox = outbox
        self.sinks = dict(sinks)
        self.retry = retry or RetryPolicy()
        self._clock = clock
        self._rand = rand
        self._loop = PassThread("qalloc-alert-dispatch", lambda: self.deliver_due().next_due_at, clock,
                                "alert dispatch pass")

    def deliver_due(self) -> DispatchReport:
        report = DispatchReport()
        for name in self.outbox.sinks:
            self._pass(name, self.sinks[name], report)
        return report

    def _pass(self, name: str, sink: Sink, report: DispatchReport) -> None:
        while True:
            rows = self.outbox.pending(name, self.retry.batch)
            if not rows:
                return
            for row in rows:
                now = float(self._clock())
                if self._expired(row, now):
                    self.outbox.mark_dead(row.event_id, name, f"gave up after {row.attempts} attempts "
                                          f"and {now - row.created_at:.0f} s")
                    report.dead[name] = report.dead.get(name, 0) + 1
                    continue
                if row.next_attempt_at > now:   # the sink is backing off
                    self._due(report, row.next_attempt_at)
                    return
                try:
                    sink.send(row.payload)
                except DeliveryError as exc:
                    if self._failed(name, row, exc, report):
                        return
                    continue
                except Exception as exc:  # noqa: BLE001 - a sink's bug is retried like an outage, and logged
                    log.exception("alert sink %s raised", name)
                    if self._failed(name, row, DeliveryError(f"{exc.__class__.__name__}: {exc}"), report):
                        return
                    continue
                self.outbox.mark_delivered(row.event_id, name)
                report.delivered[name] = report.delivered.get(name, 0) + 1
            if len(rows) < self.retry.batch:
                return

    def _expired(self, row: PendingDelivery, now: float) -> bool:
        limit = self.retry.give_up_after_s
        return limit is not None and now - row.created_at > limit

    def _failed(self, name: str, row: PendingDelivery, exc: DeliveryError, report: DispatchReport) -> bool:
        """Record a failure; True when the sink must stop for this pass."""
        if exc.permanent:
            self.outbox.mark_dead(row.event_id, name, str(exc))
            report.dead[name] = report.dead.get(name, 0) + 1
            return False
        due = float(self._clock()) + self.retry.delay(row.attempts + 1, self._rand(), exc.retry_after_s)
        self.outbox.mark_failed(row.event_id, name, str(exc), due)
        report.failed[name] = report.failed.get(name, 0) + 1
        self._due(report, due)
        return True

    @staticmethod
    def _due(report: DispatchReport, at: float) -> None:
        report.next_due_at = at if report.next_due_at is None else min(report.next_due_at, at)

    # ---- background -----------------------------------------------------------------------
    def wake(self) -> None:
        """Run a pass now (call after ``Outbox.enqueue``)."""
        self._loop.wake()

    def start(self, interval_s: float = 1.0) -> None:
        """Deliver in a daemon thread: a pass on every wake, when a backoff ends, and at least
        every ``interval_s`` (to pick up rows other processes committed)."""
        self._loop.start(interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._loop.stop(timeout_s)
