"""JobStore: transitions persisted, exactly-once completion, idempotency, attempts, export."""

from __future__ import annotations

import threading

import pytest

from ray_qalloc.exceptions import JobNotFound
from ray_qalloc.jobs import JobState
from ray_qalloc.store import JobStore
from tests.helpers import prepared


@pytest.fixture()
def store(tmp_path):
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


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


def test_sqlite_is_in_wal_mode(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


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


def test_an_older_store_gets_new_columns(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:   # the jobs table as an older version wrote it: no 'flag' column
        conn.exec_driver_sql("CREATE TABLE jobs (id VARCHAR(64) PRIMARY KEY, tenant VARCHAR(64) NOT NULL)")
    JobStore(url)
    cols = {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    assert "flag" in cols and "allowed_backends" in cols


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
