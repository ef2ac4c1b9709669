"""Threat rules: normalized security events in, allocation actions out.

Why the allocator reads the event store instead of the API pushing events to it: an event is
committed before the API answers "accepted"; the rules then read what is committed, so an
event that arrived while the allocator restarted is still judged, and any number of API
replicas (and the syslog listener) feed the same rules without knowing about them.

Reading: every ``threat.poll_s`` the engine reads events received after its position, and again
the last ``settle_s`` before it (a replica that committed late is not missed); an event already
judged in this process is skipped, so each is judged once here. The position is kept in its own
table: after a restart the engine reads back ``settle_s`` plus the longest rate window, which
rebuilds the rate counts; a rule that fires again for an event it already acted on asks for an
action whose id is already in force, which changes nothing (``threatdesk.py`` is idempotent by
id). Each action's id is ``rule:<name>:<subject>``: one action per rule and tenant (or target)
at a time, renewed only after it expired.

Matching is plain: every condition given must hold (severity at least, category, class,
tenant that sent it, format, observables, text in the message); ``rate`` adds "at least N such
events within W seconds from one sending tenant".
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.config import ThreatRule, ThreatSettings

metadata = sa.MetaData()
positions = sa.Table(
    "qalloc_rule_positions", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("received_at_us", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
_NAME = "threat-rules"
_MAX_READ = 5_000
_MAX_PAGES = 20        # per read: a burst bigger than this is read on at the next poll
_SEEN_KEEP = 200_000


@dataclass(frozen=True)
class Fire:
    """A rule fired on an event: what the allocator turns into an action or a template submit."""

    rule: ThreatRule
    event_tenant: str
    event_id: str
    message: str
    received_at: float

    @property
    def subject(self) -> str:
        a = self.rule.action
        if a.kind == "reserve":
            return a.target or ""
        return self.event_tenant if a.tenant == "$event.tenant" else a.tenant

    def action(self) -> dict[str, Any] | None:
        """The timed action to take (None for a template submit)."""
        a = self.rule.action
        if a.kind == "submit":
            return None
        raw: dict[str, Any] = {"id": f"rule:{self.rule.name}:{self.subject}"[:128], "kind": a.kind,
                               "by": f"rule:{self.rule.name}", "rule": self.rule.name, "event_id": self.event_id[:128],
                               "reason": f"{self.rule.name}: {self.message}"[:500]}
        if a.kind in ("boost", "pause"):
            raw["tenant"] = self.subject
        if a.kind == "boost":
            raw["to"] = a.to
        if a.kind == "reserve":
            raw.update(target=a.target, slots=a.slots)
        if a.for_s is not None:
            raw["for_s"] = a.for_s
        return raw


def matches(rule: ThreatRule, row: Any, event: dict[str, Any] | None) -> bool:
    m = rule.match
    if m.severity_min and not (m.severity_min <= row.severity_id <= 6):
        return False
    if m.categories and row.category_uid not in m.categories:
        return False
    if m.classes and row.class_uid not in m.classes:
        return False
    if m.tenants and row.tenant not in m.tenants:
        return False
    if m.formats and row.format not in m.formats:
        return False
    if m.message_contains and m.message_contains.lower() not in (row.message or "").lower():
        return False
    if m.observables:
        seen = {(o.get("kind"), str(o.get("value"))) for o in (event or {}).get("observables", [])}
        if not any((kind, v) in seen for kind, values in m.observables.items() for v in values):
            return False
    return True


class RuleEngine:
    """Reads stored events forward and says which rules fired (blocking: run it on the store thread)."""

    def __init__(self, engine: Engine) -> None:
        from ray_qalloc.integration.eventstore import metadata as events_md, events_table
        from ray_qalloc.store import create_tables

        self.engine = engine
        create_tables(engine, events_md, metadata)
        self.events = events_table
        self.position: int | None = None       # received_at (µs) of the newest event judged
        self._seen: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._hits: dict[tuple[str, str], collections.deque[float]] = {}
        self._loaded = False
        self._swept = 0.0
        self.judged = 0
        self.fired = 0

    def _load(self, settings: ThreatSettings, now: float) -> int:
        """Where to read from at start: the stored position less the longest look-back (rate
        counts are rebuilt from what is read again), or now for a new store."""
        with self.engine.connect() as conn:
            stored = conn.execute(sa.select(positions.c.received_at_us).where(positions.c.name == _NAME)).scalar()
        self._loaded = True
        if stored is None:
            self.position = int(now * 1e6)
            return self.position
        self.position = int(stored)
        windows = [r.rate.window_s for r in settings.rules if r.rate is not None]
        return self.position - int((max(windows, default=0.0) + settings.settle_s) * 1e6)

    def read(self, settings: ThreatSettings, now: float | None = None) -> list[Fire]:
        """Judge the events received since the last read (and, once per ``settle_s``, those of
        the last two settle periods again, for writers that committed late)."""
        now = time.time() if now is None else now
        rules = [r for r in settings.rules if r.enabled]
        if not self._loaded:
            since = self._load(settings, now)
            self._swept = now
        elif now - self._swept >= settings.settle_s:
            assert self.position is not None
            since = self.position - int(2 * settings.settle_s * 1e6)
            self._swept = now
        else:
            since = self.position or 0
        fires: list[Fire] = []
        newest = self.position or 0
        key: tuple[int, str, str] = (since, "", "")
        for _ in range(_MAX_PAGES):
            rows = self._page(key)
            for row in rows:
                key = (int(row.received_at), row.tenant, row.id)
                if (row.tenant, row.id) in self._seen:
                    continue
                self._seen[(row.tenant, row.id)] = row.received_at
                newest = max(newest, int(row.received_at))
                self.judged += 1
                fires += self._judge(rules, row)
            if len(rows) < _MAX_READ:
                break
        self.fired += len(fires)
        while len(self._seen) > _SEEN_KEEP:
            self._seen.popitem(last=False)
        if newest != self.position:
            self.position = newest
            self._save(now)
        return fires

    def _page(self, after: tuple[int, str, str]) -> list[Any]:
        t = self.events.c
        at, tenant, ident = after
        q = (sa.select(t.tenant, t.id, t.received_at, t.class_uid, t.category_uid, t.severity_id, t.format,
                       t.message, t.event)
             .where(sa.or_(t.received_at > at, sa.and_(t.received_at == at, sa.tuple_(t.tenant, t.id) > (tenant, ident))))
             .order_by(t.received_at, t.tenant, t.id).limit(_MAX_READ))
        with self.engine.connect() as conn:
            return conn.execute(q).all()

    def _judge(self, rules: list[ThreatRule], row: Any) -> list[Fire]:
        out: list[Fire] = []
        event: dict[str, Any] | None = None
        at = row.received_at / 1e6
        for rule in rules:
            if rule.match.observables and event is None:
                event = json.loads(row.event)
            if not matches(rule, row, event):
                continue
            if rule.rate is not None:
                dq = self._hits.setdefault((rule.name, row.tenant), collections.deque())
                dq.append(at)
                while dq and dq[0] <= at - rule.rate.window_s:
                    dq.popleft()
                if len(dq) < rule.rate.count:
                    continue
            out.append(Fire(rule, row.tenant, row.id, row.message or "", at))
        return out

    def _save(self, now: float) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(positions.update().where(positions.c.name == _NAME)
                                .values(received_at_us=self.position, updated_at=now)).rowcount
            if not done:
                conn.execute(positions.insert().values(name=_NAME, received_at_us=self.position, updated_at=now))
