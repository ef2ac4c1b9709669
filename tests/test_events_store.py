"""EventStore: duplicates, tenants, filters, keyset pages, retention, idempotent batches.

Every test that takes ``store`` runs twice: on SQLite and on a real PostgreSQL (tests/dbs.py).
"""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa

from ray_qalloc.config import EventSettings
from ray_qalloc.exceptions import InvalidEvent
from ray_qalloc.integration import parse_records
from ray_qalloc.integration.events import SecurityEvent
from ray_qalloc.integration.eventstore import Cursor, EventStore, create_schema, events_table

T0 = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture()
def store(db_url):
    s = EventStore(db_url, EventSettings(retention_s=3600.0))
    yield s
    s.close()


def cef(i: int, sev: int = 5, minute: int | None = None) -> str:
    when = T0 + dt.timedelta(minutes=i if minute is None else minute)
    return (f"CEF:0|Acme|IDS|1|{100 + i}|Event {i}|{sev}|rt={when.strftime('%b %d %Y %H:%M:%S')} "
            f"src=10.0.0.{i % 250}")


def events(lines: list[str], tenant: str = "a", received_at: dt.datetime | None = None) -> list[SecurityEvent]:
    out = parse_records("\n".join(lines), "application/cef", tenant=tenant, received_at=received_at)
    assert all(isinstance(e, SecurityEvent) for e in out), out
    return out  # type: ignore[return-value]


def test_duplicates_are_counted_not_stored_twice(store):
    batch = events([cef(i) for i in range(5)])
    assert store.add_many(batch) == (5, 0)
    again = events([cef(i) for i in range(3, 8)])
    assert store.add_many(again) == (3, 2)
    assert store.add_many(events([cef(20), cef(20)])) == (1, 1)   # twice in one batch
    assert store.count("a") == 9


def test_tenants_see_only_their_own_and_the_same_record_is_one_event_per_tenant(store):
    store.add_many(events([cef(1), cef(2)], tenant="a"))
    assert store.add_many(events([cef(1)], tenant="b")) == (1, 0)
    assert len(store.query("a").items) == 2
    assert [e["tenant"] for e in store.query("b").items] == ["b"]
    assert store.query("nobody").items == []


def test_query_filters_and_newest_first(store):
    store.add_many(events([cef(i, sev=i % 11) for i in range(11)]))
    page = store.query("a", limit=100)
    times = [e["time"] for e in page.items]
    assert times == sorted(times, reverse=True) and page.next_cursor is None
    high = store.query("a", severity_min=4)           # at least High: CEF 7..10 (High, Critical)
    assert {e["severity_id"] for e in high.items} == {4, 5} and len(high.items) == 4
    window = store.query("a", since=T0 + dt.timedelta(minutes=3), until=T0 + dt.timedelta(minutes=6))
    assert len(window.items) == 3                       # since inclusive, until exclusive
    assert store.query("a", category=0).items and not store.query("a", category=2).items
    assert store.query("a", class_uid=0).items and not store.query("a", class_uid=2004).items
    assert "raw" not in page.items[0] and store.query("a", limit=1, raw=True).items[0]["raw"].startswith("CEF:0")


def test_keyset_pages_never_skip_or_repeat_even_with_equal_times(store):
    # 25 events at 5 distinct times: ties broken by id
    store.add_many(events([cef(i, minute=i % 5) for i in range(25)]))
    seen, cursor = [], None
    while True:
        page = store.query("a", limit=4, cursor=cursor)
        seen += [e["id"] for e in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        store.add_many(events([cef(100 + len(seen), minute=60)]))   # newer arrivals do not disturb the walk
    assert len(seen) == 25 and len(set(seen)) == 25


def test_cursor_parse_refuses_what_it_did_not_give():
    assert Cursor.parse(Cursor(-5, "ab12").render()) == Cursor(-5, "ab12")
    for bad in ("", "12", "x_ab", "99999999999999999999_ab", "1_", "1_a-b"):
        with pytest.raises(InvalidEvent) as info:
            Cursor.parse(bad)
        assert info.value.field == "cursor"


def test_prune_by_received_at_not_by_source_time(store):
    store.add_many(events([cef(1)], received_at=T0))                      # received 2 h before "now"
    store.add_many(events([cef(2)], received_at=T0 + dt.timedelta(hours=2)))
    replayed = events([cef(3, minute=-400 * 24 * 60)], received_at=T0 + dt.timedelta(hours=2))
    assert replayed[0].time < T0 - dt.timedelta(days=399)                  # a year-old record, received now
    store.add_many(replayed)
    now = (T0 + dt.timedelta(hours=2, minutes=1)).timestamp()
    assert store.prune(now) == 1                                           # retention 1 h
    assert sorted(e["event_code"] for e in store.query("a").items) == ["102", "103"]
    assert store.prune(now) == 0


def test_add_batch_commits_events_and_answer_together_and_a_racing_key_gets_the_first_answer(store):
    batch = events([cef(i) for i in range(3)])

    def answer(stored: int, dups: int) -> tuple[int, dict]:
        return 200, {"accepted": stored, "duplicates": dups}

    first, fresh = store.add_batch(batch, tenant="a", key="k", body_sha256="h1", answer=answer)
    assert fresh and first.answer == {"accepted": 3, "duplicates": 0}
    again, fresh = store.add_batch(events([cef(9)]), tenant="a", key="k", body_sha256="h2", answer=answer)
    assert not fresh and again.body_sha256 == "h1" and again.answer == first.answer
    assert store.count("a") == 3                     # the second batch's event rolled back with it
    assert store.answer_for("a", "k") == first and store.answer_for("b", "k") is None

    results: list = []
    barrier = threading.Barrier(4)

    def racer(i: int) -> None:
        barrier.wait()
        results.append(store.add_batch(events([cef(50 + i)]), tenant="a", key="race", body_sha256=f"r{i}",
                                       answer=answer))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for _, fresh in results if fresh) == 1
    assert len({a.body_sha256 for a, _ in results}) == 1
    assert store.count("a") == 4


def test_many_rows_in_one_transaction(store):
    lines = [f"CEF:0|Acme|IDS|1|{i % 50}|Event number {i}|{i % 11}|src=10.{i % 250}.0.1 cnt={i}" for i in range(5_000)]
    assert store.add_many(events(lines)) == (5_000, 0)
    assert store.add_many(events(lines[:2_000] + [lines[0] + " x=1"])) == (1, 2_000)


def test_schema_creation_is_idempotent_and_race_safe(db_url):
    s = EventStore(db_url)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            create_schema(s.engine)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with s.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar() == 0
    s.close()
