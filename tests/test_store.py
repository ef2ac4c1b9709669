"""JobStore: transitions persisted, exactly-once completion, idempotency, attempts, export.

Every test that takes ``store`` or ``db_url`` runs twice: on SQLite and on a real PostgreSQL
(see tests/dbs.py). The racing tests matter most on PostgreSQL, which locks rows, not files.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import sqlalchemy as sa

from ray_qalloc.exceptions import InvalidJobSpec, JobNotFound, StoreError
from ray_qalloc.jobs import JobState
from ray_qalloc.store import JobStore, jobs_table
from tests.helpers import prepared


@pytest.fixture()
def store(db_url):
    s = JobStore(db_url)
    yield s
    s.close()


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released together; their results in order (an exception is a result)."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - returned so the test can show it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_add_and_get_roundtrip(store):
    job = prepared(backends=("aer_statevector",))
    job_id, created, _ = store.add_job(job)
    assert created and job_id == job.id
    rec = store.get(job_id, with_circuit=True)
    assert rec.state == JobState.QUEUED
    assert rec.payload == b"qpy-bytes"
    assert rec.ops == job.ops and rec.features == job.features
    assert rec.allowed_backends == ("aer_statevector",)
    assert rec.to_prepared() == job
    assert [t["name"] for t in store.transitions(job_id)] == ["accept"]


def test_sqlite_is_in_wal_mode(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_idempotency_key_returns_same_job(store):
    a = prepared(idempotency_key="k1")
    b = prepared(idempotency_key="k1")
    c = prepared(idempotency_key="k1", tenant="other")
    assert store.add_job(a) == (a.id, True, None)
    assert store.add_job(b) == (a.id, False, None)
    assert store.add_job(c) == (c.id, True, None)
    assert store.counts_by_state() == {"queued": 2}


def test_named_transitions_only_from_their_sources(store):
    job_id, _, _ = store.add_job(prepared())
    assert not store.transition(job_id, "complete")          # QUEUED cannot complete
    n = store.dispatch(job_id, "b1", predicted_s=1.0, queued_at=0.0)
    assert n == 1
    assert store.dispatch(job_id, "b2", predicted_s=1.0, queued_at=0.0) is None  # already RUNNING
    assert store.get(job_id).state == JobState.RUNNING


def test_completion_is_recorded_exactly_once_even_when_raced(store):
    job_id, _, _ = store.add_job(prepared())
    n = store.dispatch(job_id, "b1", predicted_s=1.0, queued_at=0.0)
    results = []
    barrier = threading.Barrier(8)

    def finish(i: int) -> None:
        barrier.wait()
        results.append(store.complete(job_id, n, {"counts": {"0": i}, "backend": "b1", "wall_s": 0.1}))

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    names = [t["name"] for t in store.transitions(job_id)]
    assert names.count("complete") == 1
    assert store.get(job_id).state == JobState.COMPLETED


def test_failover_keeps_history_and_late_result_is_ignored(store):
    job_id, _, _ = store.add_job(prepared())
    n1 = store.dispatch(job_id, "b1", predicted_s=1.0, queued_at=0.0)
    assert store.end_attempt(job_id, n1, "actor_died", "boom")
    assert store.get(job_id).state == JobState.QUEUED
    n2 = store.dispatch(job_id, "b2", predicted_s=1.0, queued_at=0.0)
    assert n2 == 2
    assert store.complete(job_id, n2, {"counts": {"1": 5}, "backend": "b2", "wall_s": 0.2})
    # the first attempt's result arrives late: not recorded
    assert not store.complete(job_id, n1, {"counts": {"0": 5}, "backend": "b1"})
    rec = store.get(job_id)
    assert rec.result["backend"] == "b2" and rec.attempts == 2
    outcomes = [(a["n"], a["backend"], a["outcome"]) for a in store.attempts(job_id)]
    assert outcomes == [(1, "b1", "actor_died"), (2, "b2", "completed")]


def test_cancel_and_fail(store):
    a, _, _ = store.add_job(prepared())
    b, _, _ = store.add_job(prepared())
    assert store.cancel(a) and not store.cancel(a)
    assert store.fail(b, "nothing can run it")
    assert store.get(b).error == "nothing can run it"
    assert {r.id for r in store.active()} == set()


def test_unknown_job_is_a_typed_error(store):
    with pytest.raises(JobNotFound, match="To fix"):
        store.get("nope")


def test_unexported_runs_feed_the_history(store, tmp_path):
    from ray_qalloc.costmodel.history import RunHistory

    job_id, _, _ = store.add_job(prepared())
    n = store.dispatch(job_id, "b1", predicted_s=0.5, queued_at=1.0)
    store.complete(job_id, n, {"counts": {"0": 1}, "backend": "b1", "wall_s": 0.25, "execute_s": 0.2})
    rows = store.unexported_runs()
    assert len(rows) == 1 and rows[0]["wall_s"] == 0.25
    hist = RunHistory(tmp_path / "history")
    hist.append(rows)
    hist.append(rows)  # a flush repeated after a crash: de-duplicated on read
    store.mark_exported(r["id"] for r in rows)
    assert store.unexported_runs() == []
    table = hist.read()
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["backend"] == "b1" and row["success"] and row["f_size"] == 3.0


def test_an_older_store_gets_new_columns(db_url):
    # the jobs table as an older version wrote it: no 'flag' or 'allowed_backends', one job in it
    old = sa.MetaData()
    sa.Table("jobs", old, *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                            for c in jobs_table.columns if c.name not in ("flag", "allowed_backends")])
    engine = sa.create_engine(db_url)
    old.create_all(engine)
    row = {"id": "old-job", "tenant": "t1", "idempotency_key": None, "state": "queued", "priority": "normal",
           "intent": "auto", "shots": 10, "deadline_s": None, "fidelity_min": None, "num_qubits": 1,
           "num_clbits": 1, "ops": "[]", "features": "{}", "source_format": "qasm2", "payload": b"x",
           "created_at": 1.0, "updated_at": 1.0, "backend": None, "attempts": 0, "result": None,
           "error": None, "explanation": None}
    with engine.begin() as conn:
        conn.execute(old.tables["jobs"].insert(), row)

    store = JobStore(db_url)
    cols = {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    assert {"flag", "allowed_backends"} <= cols
    rec = store.get(row["id"])  # the old job reads back, the new columns empty
    assert rec.state == JobState.QUEUED and rec.flag is None and rec.allowed_backends is None
    job_id, created, _ = store.add_job(prepared(backends=("b1",)))  # and new jobs use them
    store.flag(job_id, "late")
    assert created and store.get(job_id).allowed_backends == ("b1",) and store.get(job_id).flag == "late"
    JobStore(db_url).close()  # opening a current store again changes nothing and does not fail
    store.close()
    engine.dispose()


def test_flag_is_stored_and_shown(store):
    job_id, _, _ = store.add_job(prepared())
    store.flag(job_id, "predicted to finish 3 s after its deadline")
    assert store.get(job_id).public()["flag"].startswith("predicted")


def test_add_jobs_in_one_transaction_and_duplicates_answered_one_by_one(store):
    a, b = prepared(idempotency_key="x1"), prepared(idempotency_key="x2")
    assert store.add_jobs([a, b]) == [(a.id, True), (b.id, True)]
    c, d = prepared(idempotency_key="x1"), prepared(idempotency_key="x3")
    assert store.add_jobs([c, d]) == [(a.id, False), (d.id, True)]
    assert store.counts_by_state() == {"queued": 3}


def test_compact_features_behave_like_the_dict_and_store_as_json(store):
    import pickle

    from ray_qalloc.jobs import CompactFeatures, compact

    job = compact(prepared())
    assert isinstance(job.features, CompactFeatures)
    assert dict(job.features) == prepared().features and job.features.get("nope", 7) == 7
    assert pickle.loads(pickle.dumps(job.features)) == job.features
    job_id, _, _ = store.add_job(job)
    assert store.get(job_id).features == dict(job.features)


# ---- concurrency: the same answers on a database that locks rows ----------------------------------
def test_racing_idempotent_submissions_make_one_job(store):
    jobs = [prepared(idempotency_key="same") for _ in range(8)]
    fast = ("b1", 1.0, {"why": "free"})  # half take the accept+dispatch fast path
    results = race(*[lambda j=j, i=i: store.add_job(j, dispatch_to=fast if i % 2 else None)
                     for i, j in enumerate(jobs)])
    assert not [r for r in results if isinstance(r, Exception)], results
    ids = {r[0] for r in results}
    assert len(ids) == 1 and [r[1] for r in results].count(True) == 1
    (winner,) = ids
    assert sum(store.counts_by_state().values()) == 1
    assert [t["name"] for t in store.transitions(winner)][0] == "accept"
    assert len(store.attempts(winner)) == (1 if store.get(winner).state == JobState.RUNNING else 0)


def test_racing_bulk_submissions_sharing_keys_in_different_orders(store):
    keys = [f"k{i}" for i in range(400)]

    def batch(order: list[str]) -> list[tuple[str, bool]]:
        return store.add_jobs([prepared(idempotency_key=k) for k in order])

    results = race(lambda: batch(keys), lambda: batch(keys[::-1]), lambda: batch(keys[200:] + keys[:200]))
    assert not [r for r in results if isinstance(r, Exception)], results
    by_key = {}
    for order, res in zip([keys, keys[::-1], keys[200:] + keys[:200]], results):
        for k, (job_id, _created) in zip(order, res):
            by_key.setdefault(k, set()).add(job_id)
    assert all(len(v) == 1 for v in by_key.values())
    assert sum(store.counts_by_state().values()) == len(keys)
    created = sum(c for res in results for _, c in res)
    assert created == len(keys)


def test_completion_racing_a_failover_has_one_winner(store):
    for _ in range(15):
        job_id, _, _ = store.add_job(prepared())
        n = store.dispatch(job_id, "b1", predicted_s=1.0, queued_at=0.0)
        done, moved = race(lambda: store.complete(job_id, n, {"counts": {"0": 1}, "backend": "b1"}),
                           lambda: store.end_attempt(job_id, n, "timed_out", "too slow"))
        assert not isinstance(done, Exception) and not isinstance(moved, Exception), (done, moved)
        assert done != moved
        (attempt,) = store.attempts(job_id)
        if done:
            assert store.get(job_id).state == JobState.COMPLETED and attempt["outcome"] == "completed"
        else:
            assert store.get(job_id).state == JobState.QUEUED and attempt["outcome"] == "timed_out"


def test_cancel_racing_a_dispatch_always_cancels(store):
    for _ in range(15):
        job_id, _, _ = store.add_job(prepared())
        cancelled, _n = race(lambda: store.cancel(job_id),
                             lambda: store.dispatch(job_id, "b1", predicted_s=1.0, queued_at=0.0))
        assert cancelled is True  # cancel is allowed from QUEUED and from RUNNING: it never loses
        assert store.get(job_id).state == JobState.CANCELLED
        assert [t["name"] for t in store.transitions(job_id)][-1] == "cancel"


def test_stores_opened_at_once_on_an_empty_database(db_url):
    stores = race(*[lambda: JobStore(db_url) for _ in range(4)])
    assert all(isinstance(s, JobStore) for s in stores), stores
    job_id, _, _ = stores[0].add_job(prepared())
    assert stores[3].get(job_id).id == job_id
    for s in stores:
        s.close()


# ---- text every database accepts --------------------------------------------------------------
def test_nul_in_an_idempotency_key_is_refused_before_anything_is_written(store):
    with pytest.raises(InvalidJobSpec, match="NUL"):
        store.add_job(prepared(idempotency_key="a\x00b"))
    with pytest.raises(InvalidJobSpec):
        store.add_jobs([prepared(), prepared(idempotency_key="\x00")])
    assert store.counts_by_state() == {}


def test_error_text_with_nul_is_stored(store):
    job_id, _, _ = store.add_job(prepared())
    n = store.dispatch(job_id, "b1", predicted_s=1.0, queued_at=0.0)
    assert store.end_attempt(job_id, n, "backend_error", "bad\x00byte", then="fail")
    assert store.get(job_id).error == "bad\ufffdbyte"
    assert store.attempts(job_id)[0]["error"] == "bad\ufffdbyte"


# ---- PostgreSQL specifics -----------------------------------------------------------------------
def test_postgresql_engine_and_schema(pg_url):
    url = sa.engine.make_url(pg_url)  # a server whose sessions default to SERIALIZABLE
    url = url.update_query_dict({"options": url.query["options"] + " -cdefault_transaction_isolation=serializable"})
    plain = url.render_as_string(hide_password=False).replace("postgresql+psycopg://", "postgresql://")
    store = JobStore(plain)  # no driver named: psycopg 3
    assert store.engine.dialect.driver == "psycopg"
    assert store.engine.pool._pre_ping and store.engine.pool.size() == 8
    with store.engine.begin() as conn:
        assert conn.exec_driver_sql("SHOW application_name").scalar() == "ray-qalloc"
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
        kinds = dict(conn.exec_driver_sql(
            "SELECT table_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND column_name = 'id'").all())
    assert kinds == {"jobs": "character varying", "transitions": "bigint", "attempts": "bigint"}
    job_id, _, _ = store.add_job(prepared(payload=bytes(range(256))))
    assert store.get(job_id, with_circuit=True).payload == bytes(range(256))
    store.close()


def test_an_unreachable_server_is_a_store_error_without_the_password():
    with pytest.raises(StoreError, match="cannot open the job store") as info:
        JobStore("postgresql://qalloc:s3cret@127.0.0.1:1/jobs?connect_timeout=2")
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
