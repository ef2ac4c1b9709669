"""The change stream: one feed of job, backend, alert and configuration changes, read from the
durable tables by position; a reader that stops anywhere and resumes from the last id it saw
gets every later change once — checked against a reference (one read of everything) on random
interleavings of writes and reads, and over HTTP as Server-Sent Events with a real disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import random
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ray_qalloc.adminstate import AdminState
from ray_qalloc.alerts.engine import AlertEvent
from ray_qalloc.alerts.outbox import Outbox
from ray_qalloc.alerts.rules import Severity
from ray_qalloc.backendlog import BackendLog
from ray_qalloc.changefeed import KIND, ChangeFeed, Cursor
from ray_qalloc.config import load_settings
from ray_qalloc.exceptions import InvalidRequest
from ray_qalloc.jobs import new_job_id
from ray_qalloc.store import JobStore, transitions_table
from tests.dbs import fresh_schema
from tests.helpers import prepared


class World:
    """The four sources on one store (SQLite unless a URL is given), and a way to make each
    kind of change."""

    def __init__(self, tmp_path: Any = None, url: str | None = None) -> None:
        self.store = JobStore(url or f"sqlite:///{tmp_path}/jobs.db")
        self.admin = AdminState(self.store.engine)
        self.backends = BackendLog(self.store.engine)
        self.outbox = Outbox(self.store.engine, ["log"])
        self.feed = ChangeFeed(self.store.engine)
        self.n = 0

    def job(self, tenant: str) -> str:
        job = prepared(id=new_job_id(), tenant=tenant)
        self.store.add_job(job)
        return job.id

    def dispatch(self, job_id: str) -> None:
        self.store.dispatch(job_id, "qpu_fez", predicted_s=1.0, queued_at=None)

    def backend(self, name: str, up: bool) -> None:
        self.backends.note(name, "up" if up else "down")
        self.backends.flush()

    def config(self, value: Any) -> None:
        self.admin.put("config", {"v": value}, actor="ops", action="config.set")

    def alert(self) -> None:
        self.n += 1
        self.outbox.enqueue([AlertEvent(key=f"k{self.n}", status="firing", rule="queue_wait", kind="queue_wait",
                                        severity=Severity("warning"), fingerprint=f"f{self.n}", labels={},
                                        summary="queue wait", at=float(self.n))])


def read_all(feed: ChangeFeed, after: Cursor, **who: Any) -> list[dict[str, Any]]:
    out, cursor = [], after
    while True:
        changes, cursor = feed.read(cursor, limit=1000, **who)
        if not changes:
            return out
        out += [c.to_dict() for c in changes]


def test_every_kind_of_change_is_in_the_feed_and_tenants_see_only_theirs(tmp_path):
    w = World(tmp_path)
    start = w.feed.head()
    a = w.job("alice")
    b = w.job("bob")
    w.dispatch(a)
    w.backend("qpu_fez", False)
    w.config(1)
    w.alert()
    admin = read_all(w.feed, start, tenant="ops", admin=True)
    assert [(c["kind"], c["data"].get("event") or c["data"].get("action") or c["data"].get("rule"))
            for c in admin] == [("job", "accept"), ("job", "accept"), ("job", "dispatch"),
                                ("backend", "down"), ("config", "config.set"), ("alert", "queue_wait")]
    assert admin[2]["data"]["job_id"] == a and admin[2]["data"]["to"] == "running"
    alice = read_all(w.feed, start, tenant="alice", admin=False)
    assert [c["kind"] for c in alice] == ["job", "job", "backend"]
    assert {c["data"]["job_id"] for c in alice if c["kind"] == "job"} == {a}
    assert b not in json.dumps(alice)
    # ids are positions: the last one read is where the next read starts
    assert read_all(w.feed, Cursor.parse(admin[-1]["id"]), tenant="ops", admin=True) == []


def test_a_cursor_round_trips_and_a_bad_one_is_refused_with_its_field():
    c = Cursor(((0, 12), (0, 3), (0, 0), (0, 7)))
    assert str(c) == "j:12,b:3,a:0,c:7"
    assert Cursor.parse(str(c)) == c
    assert Cursor.parse("j:5") == Cursor(((0, 5), (0, 0), (0, 0), (0, 0)))  # a source left out: from its start
    pg = Cursor(((7341, 12), (0, 3), (7300, 1), (0, 0)))           # PostgreSQL: (transaction, row)
    assert str(pg) == "j:7341.12,b:3,a:7300.1,c:0"
    assert Cursor.parse(str(pg)) == pg and pg.get("j") == 12 and pg.key("j") == (7341, 12)
    for bad in ("", "x:1", "j:-1", "j:1,j:2", "j:1;b:2", "j:" + "9" * 30, "j:1.2.3", "j:.5", "j:5."):
        with pytest.raises(InvalidRequest) as e:
            Cursor.parse(bad)
        assert e.value.field == "Last-Event-ID"


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["job_a", "job_b", "dispatch", "backend", "config", "alert", "read"]),
                              st.integers(1, 4)), min_size=5, max_size=40),
       admin=st.booleans(), seed=st.integers(0, 2**16))
def test_resuming_anywhere_gives_every_change_once(tmp_path_factory, ops, admin, seed):
    """A reader that reads a few changes at a time, forgets everything but the id of the last
    change it got, and resumes from it — interleaved with writers — ends with exactly the
    changes one read of everything gives, in the same order."""
    w = World(tmp_path_factory.mktemp("feed"))
    rng = random.Random(seed)
    start = w.feed.head()
    who = {"tenant": "alice", "admin": admin}
    got: list[dict[str, Any]] = []
    last = str(start)
    queued: list[str] = []
    for op, k in ops:
        if op == "job_a":
            queued.append(w.job("alice"))
        elif op == "job_b":
            w.job("bob")
        elif op == "dispatch" and queued:
            w.dispatch(queued.pop(0))
        elif op == "backend":
            w.backend(f"qpu_{k}", rng.random() < 0.5)
        elif op == "config":
            w.config(k)
        elif op == "alert":
            w.alert()
        elif op == "read":
            changes, _ = w.feed.read(Cursor.parse(last), limit=k, **who)
            got += [c.to_dict() for c in changes]
            if changes:
                last = str(changes[-1].cursor)
    got += read_all(w.feed, Cursor.parse(last), **who)
    reference = read_all(w.feed, start, **who)
    assert [c["id"] for c in got] == [c["id"] for c in reference]
    assert got == reference


class Held:
    """Job transitions written in transactions left open (PostgreSQL: a second writer whose
    row got its id before another writer's committed row), committed later in any order."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.open: list[tuple[Any, Any]] = []

    def hold(self, job_id: str) -> None:
        conn = self.w.store.engine.connect()
        tx = conn.begin()
        conn.execute(transitions_table.insert().values(job_id=job_id, name="note", from_state="queued",
                                                       to_state="queued", at=time.time(), stimulus="held"))
        self.open.append((conn, tx))

    def release(self, i: int) -> None:
        conn, tx = self.open.pop(i % len(self.open))
        tx.commit()
        conn.close()

    def release_all(self) -> None:
        while self.open:
            self.release(0)


def by_source(changes: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each source's changes in order, each with its own source's position (the other sources'
    parts of an id depend on how reads interleaved the sources)."""
    src_of = {kind: src for src, kind in KIND.items()}
    out: dict[str, list[str]] = {}
    for c in changes:
        own = dict(c, id=Cursor.parse(c["id"]).key(src_of[c["kind"]]))
        out.setdefault(c["kind"], []).append(json.dumps(own, sort_keys=True))
    return out


def test_postgresql_a_lower_id_committed_after_a_higher_one_is_not_skipped(pg_url):
    """The case a time-based hold-back missed: writer 1 takes id n and stays open (longer than
    the old one-second hold-back), writer 2 takes n+1 and commits, a reader reads, writer 1
    commits. The reader must get both rows, each once, in the feed's order."""
    w = World(url=pg_url)
    held = Held(w)
    start = w.feed.head()
    a = w.job("alice")
    held.hold(a)                            # id n, open
    try:
        w.dispatch(a)                       # id n+1, committed
        time.sleep(1.2)
        first, cursor = w.feed.read(start, tenant=None, admin=True, limit=1000)
        got = [c.to_dict() for c in first]
        assert all(c["data"]["why"] != "held" for c in got)
        assert not any(c["data"].get("event") == "dispatch" for c in got), "a row after the open one was passed"
    finally:
        held.release_all()
    got += read_all(w.feed, cursor, tenant=None, admin=True)
    whys = [c["data"]["why"] for c in got if c["kind"] == "job"]
    assert "held" in whys
    assert by_source(got) == by_source(read_all(w.feed, start, tenant=None, admin=True))
    assert w.feed.head().key("j") == max(Cursor.parse(c["id"]).key("j") for c in got)


@hsettings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["job", "hold", "release", "dispatch", "backend", "config", "read"]),
                              st.integers(1, 4)), min_size=5, max_size=30),
       tenant=st.sampled_from([None, "alice"]))
def test_postgresql_resuming_with_writers_left_open_gives_every_change_once(pg_admin_url, ops, tenant):
    """Random writes, some left open and committed later in any order, and a reader that reads
    a few at a time and keeps only the last id: every change once, each source in the order
    one read of everything gives (across sources the merge is by time, which a late commit
    may change)."""
    with fresh_schema(pg_admin_url) as url:
        w = World(url=url)
        held = Held(w)
        who = {"tenant": tenant or "ops", "admin": tenant is None}
        start = w.feed.head()
        jobs: list[str] = []
        got: list[dict[str, Any]] = []
        last = str(start)
        try:
            for op, k in ops:
                if op == "job":
                    jobs.append(w.job("alice" if k % 2 else "bob"))
                elif op == "hold" and jobs:
                    held.hold(jobs[k % len(jobs)])
                elif op == "release" and held.open:
                    held.release(k)
                elif op == "dispatch" and jobs:
                    w.dispatch(jobs.pop(0))
                elif op == "backend":
                    w.backend(f"qpu_{k}", k % 2 == 0)
                elif op == "config":
                    w.config(k)
                elif op == "read":
                    changes, cursor = w.feed.read(Cursor.parse(last), limit=k, **who)
                    got += [c.to_dict() for c in changes]
                    last = str(cursor if not changes or len(changes) < k else changes[-1].cursor)
            held.release_all()
            got += read_all(w.feed, Cursor.parse(last), **who)
            reference = read_all(w.feed, start, **who)
            assert by_source(got) == by_source(reference)     # every change once, each source in order
        finally:
            held.release_all()
            w.store.close()


def test_the_backend_log_keeps_what_a_failed_flush_could_not_write(tmp_path):
    w = World(tmp_path)
    w.backends.note("qpu_a", "down")
    real = w.backends.engine
    w.backends.engine = None            # any use fails
    with pytest.raises(Exception):
        w.backends.flush()
    w.backends.engine = real
    w.backends.note("qpu_a", "up")
    assert w.backends.flush() == 2
    events = [c["data"]["event"] for c in read_all(w.feed, Cursor(), tenant="x", admin=False)]
    assert events == ["down", "up"]


# ---- over HTTP ----------------------------------------------------------------------------

def _sse(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":") and ":" in line:
                k, _, v = line.partition(":")
                fields[k] = v[1:] if v.startswith(" ") else v
        if "data" in fields:
            out.append(fields)
    return out


async def _take(c: httpx.AsyncClient, n: int, headers: dict[str, str], params: dict[str, str] | None = None,
                timeout: float = 10.0) -> list[dict[str, str]]:
    """Open the stream, read ``n`` events, then drop the connection (a reader that goes away)."""
    got: list[dict[str, str]] = []
    buf = ""

    async def read() -> None:
        nonlocal buf
        async with c.stream("GET", "/v1/stream", headers=headers, params=params) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for chunk in r.aiter_text():
                buf += chunk
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    got.extend(_sse(block + "\n\n"))
                    if len(got) >= n:
                        return

    await asyncio.wait_for(read(), timeout)
    return got[:n]


@contextlib.asynccontextmanager
async def _serving(app: Any) -> Any:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        server.force_exit = True      # open streams end with the server
        await asyncio.wait_for(task, 10)
        sock.close()


def test_a_reader_that_disconnects_resumes_without_a_gap_or_a_duplicate(tmp_path):
    from ray_qalloc.api import create_app
    from ray_qalloc.tenants import TenantStore

    settings = load_settings(data_dir=tmp_path)
    w = World.__new__(World)
    w.store = JobStore(settings.resolved_store_url)
    w.admin, w.backends = AdminState(w.store.engine), BackendLog(w.store.engine)
    w.outbox, w.n = Outbox(w.store.engine, ["log"]), 0
    w.feed = ChangeFeed(w.store.engine)
    tokens = TenantStore(settings.resolved_store_url)
    alice = {"Authorization": f"Bearer {tokens.create_token('alice')}"}
    ops = {"Authorization": f"Bearer {tokens.create_token('ops', admin=True)}"}
    for _ in range(3):
        w.job("alice")
    w.job("bob")

    async def main() -> tuple[list[dict[str, str]], ...]:
        # a real server: httpx's ASGI transport gathers a whole response before returning it,
        # which an endless stream never finishes
        async with _serving(create_app(settings)) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
            first = await _take(c, 2, alice, {"from": "start"})
            # changes while the reader is away
            w.backend("qpu_fez", False)
            w.job("alice")
            w.config(5)
            rest = await _take(c, 3, {**alice, "Last-Event-ID": first[-1]["id"]})
            # from now on only new changes; an admin sees configuration changes too
            everything = await _take(c, 7, ops, {"from": "start"})
            paged = (await c.get("/v1/changes", params={"after": "start", "limit": 50}, headers=alice)).json()
            bad = await c.get("/v1/stream", headers={**alice, "Last-Event-ID": "nonsense"})
            return first, rest, everything, paged, bad

    first, rest, everything, paged, bad = asyncio.run(main())
    seen = first + rest
    assert [e["event"] for e in seen] == ["job", "job", "job", "backend", "job"]
    assert len({e["id"] for e in seen}) == 5
    datas = [json.loads(e["data"]) for e in seen]
    assert all(d["data"].get("tenant", "alice") == "alice" for d in datas)
    assert [c["id"] for c in paged["changes"]] == [e["id"] for e in seen]
    assert [e["event"] for e in everything] == ["job"] * 4 + ["backend", "job", "config"]   # bob's job too
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"
