"""The measurement sweep: records, caps and censoring, resume, case sources. No Ray.

One worker process is shared by the whole module (its imports cost ~1-2 s per start), and
every test's circuits are small, so the module runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import time

import pytest

from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.costmodel.measure import (DEFAULT_BACKENDS, SweepCase, Worker, cases_from_path,
                                          default_sweep, measure, mqt_cases, random_cases, source_of_case_id)
from ray_qalloc.placement.model import Estimate

GHZ3 = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\n'
        'h q[0];\ncx q[0],q[1];\ncx q[1],q[2];\nmeasure q -> c;\n')
T2 = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\nt q[0];\ncx q[0],q[1];\nmeasure q -> c;\n'


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture
def history(tmp_path) -> RunHistory:
    return RunHistory(tmp_path / "history")


def _run(cases, backends, history, worker, **kw):
    kw.setdefault("progress", False)
    return measure(cases, backends, history, worker=worker, **kw)


def _pairs(history: RunHistory) -> dict[tuple[str, str], dict]:
    return {(r["case_id"], r["backend"]): r for r in history.read().to_pylist()}


def test_quick_sweep_records_rows_with_features(history, worker):
    cases = default_sweep(quick=True)[:4] + random_cases([4], [5], [1])
    report = _run(cases, DEFAULT_BACKENDS, history, worker)
    rows = history.read().to_pylist()
    assert len(rows) == len(report.rows) == report.completed + report.censored + report.errors
    assert report.completed >= 12 and report.errors == 0
    for r in rows:
        assert r["source"] == "sweep" and r["job_id"] == r["case_id"]
        assert r["f_num_qubits"] == r["num_qubits"] and r["f_size"] > 0
        if r["outcome"] == "completed":
            assert r["wall_s"] > 0 and r["execute_s"] > 0 and r["method"]
            assert r["peak_memory_bytes"] is not None and r["cap_s"] == 20.0
    assert len({r["attempt_id"] for r in rows}) == len(rows)


def test_stabilizer_not_attempted_on_non_clifford(history, worker):
    case = SweepCase("t:qft5", "qft", "alg", 5, 128, mqt_cases(["qft"], [5])[0].source)
    report = _run([case], ["aer_stabilizer", "aer_statevector"], history, worker)
    assert set(_pairs(history)) == {("t:qft5", "aer_statevector")}
    assert report.filtered == 1
    clifford = SweepCase("t:ghz3", "ghz", "qasm", 3, 128, GHZ3)
    _run([clifford], ["aer_stabilizer"], history, worker)
    assert _pairs(history)[("t:ghz3", "aer_stabilizer")]["outcome"] == "completed"


def test_memory_cap_censors_without_running(history, worker):
    case = mqt_cases(["ghz"], [24])[0]
    t0 = time.perf_counter()
    report = _run([case], ["aer_statevector"], history, worker, memory_cap_bytes=64 * 2**20)
    assert time.perf_counter() - t0 < 5
    row = _pairs(history)[(case.case_id, "aer_statevector")]
    assert row["outcome"] == "censored_memory" and row["censored"] and row["wall_s"] is None
    assert report.attempted == 0


def test_rss_sampler_kills_a_run_above_the_memory_cap():
    """The runtime guard behind the formula: RSS growth above the cap kills the worker."""
    from ray_qalloc.config import Limits
    from ray_qalloc.jobs import make_spec, prepare_job

    job = prepare_job(make_spec(circuit=mqt_cases(["ghz"], [24])[0].source.build(), shots=16), Limits())
    with Worker(memory_cap_bytes=32 * 2**20) as w:
        res = w.call(("run", "aer_statevector", job.payload, 16, 1), timeout_s=60)
        assert res.status == "memory" and res.peak_memory_bytes > 32 * 2**20
        assert w.pid is None


def test_time_cap_kills_and_the_next_case_completes(history, worker):
    slow = mqt_cases(["qft"], [22])[0]           # ~1.4 s as a statevector on 2 cores
    fast = SweepCase("t:ghz3:late", "ghz", "qasm", 23, 64, GHZ3)  # sorted after the slow one
    spawns = worker.spawns
    report = _run([slow, fast], ["aer_statevector"], history, worker, time_cap_s=0.3)
    rows = _pairs(history)
    killed = rows[(slow.case_id, "aer_statevector")]
    assert killed["outcome"] == "censored_time" and killed["censored"]
    assert killed["wall_s"] == 0.3 and killed["cap_s"] == 0.3
    assert rows[("t:ghz3:late", "aer_statevector")]["outcome"] == "completed"
    assert worker.spawns == spawns + 1 and report.attempted == 2


class _Pessimist:
    def predict(self, job, backends):
        return [Estimate(b.name, 1e6, 1.0, 0.0) for b in backends]


def test_predicted_runtime_censors_without_running(history, worker):
    t0 = time.perf_counter()
    report = _run(mqt_cases(["ghz"], [4]), ["aer_statevector", "aer_mps"], history, worker,
                  predictor=_Pessimist())
    assert time.perf_counter() - t0 < 5 and report.attempted == 0
    for row in _pairs(history).values():
        assert row["outcome"] == "censored_predicted" and row["predicted_s"] == 1e6
    report = _run(mqt_cases(["ghz"], [5]), ["aer_statevector"], history, worker,
                  predictor=_Pessimist(), predicted_factor=None)
    assert report.completed == 1


def test_monotone_censoring_skips_larger_sizes(history, worker):
    cases = mqt_cases(["qft"], [21, 22, 23])
    report = _run(cases, ["aer_statevector"], history, worker, time_cap_s=0.05, predicted_factor=None)
    rows = _pairs(history)
    assert rows[("mqt:qft:alg:21", "aer_statevector")]["outcome"] == "censored_time"
    for n in (22, 23):
        row = rows[(f"mqt:qft:alg:{n}", "aer_statevector")]
        assert row["outcome"] == "censored_monotone" and row["wall_s"] == 0.05
    assert report.attempted == 1
    # A resumed sweep carries the cap hit over from the history.
    more = mqt_cases(["qft"], [24])
    _run(more, ["aer_statevector"], history, worker, time_cap_s=0.05, predicted_factor=None)
    assert _pairs(history)[("mqt:qft:alg:24", "aer_statevector")]["outcome"] == "censored_monotone"


def test_resume_skips_done_pairs_and_runs_missing_ones(history, worker):
    cases = default_sweep(quick=True)[:3]
    first = _run(cases, ["aer_statevector"], history, worker)
    assert first.completed == 3
    n_rows = len(history)
    again = _run(cases, ["aer_statevector"], history, worker)
    assert again.skipped_existing == 3 and not again.rows and len(history) == n_rows
    partial = _run(cases, ["aer_statevector", "aer_density_matrix"], history, worker)
    assert partial.skipped_existing == 3 and partial.completed == 3
    assert {b for (_, b) in _pairs(history)} == {"aer_statevector", "aer_density_matrix"}
    fresh = _run(cases, ["aer_statevector"], history, worker, resume=False)
    assert fresh.completed == 3 and len(history) == 9


def test_cases_from_qasm_directory(tmp_path, history, worker):
    d = tmp_path / "qasm"
    d.mkdir()
    (d / "ghz3.qasm").write_text(GHZ3)
    (d / "t2.qasm").write_text(T2)
    (d / "notes.txt").write_text("not a circuit")
    cases = cases_from_path(d, shots=64)
    assert [c.case_id for c in cases] == ["file:ghz3.qasm", "file:t2.qasm"]
    assert [c.size for c in cases] == [3, 2] and cases[0].group is None
    _run(cases, ["aer_statevector", "aer_stabilizer"], history, worker)
    rows = _pairs(history)
    assert set(rows) == {("file:ghz3.qasm", "aer_statevector"), ("file:ghz3.qasm", "aer_stabilizer"),
                         ("file:t2.qasm", "aer_statevector")}
    assert all(r["outcome"] == "completed" and r["shots"] == 64 for r in rows.values())


def test_cases_from_jsonl_trace(tmp_path, history, worker):
    trace = tmp_path / "trace.jsonl"
    lines = [{"id": "j1", "arrival_s": 0.0, "qasm": GHZ3, "shots": 100},
             {"id": "j2", "arrival_s": 0.5, "qasm": T2},
             {"id": "bad", "arrival_s": 1.0, "qasm": "OPENQASM 2.0; qreg q[2]; nonsense q[0];"}]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    cases = cases_from_path(trace, shots=32)
    assert [(c.case_id, c.shots, c.size) for c in cases] == [("trace:j1", 100, 3), ("trace:j2", 32, 2),
                                                             ("trace:bad", 32, 0)]
    report = _run(cases, ["aer_statevector"], history, worker)
    assert report.completed == 2 and report.errors == 1
    bad = _pairs(history)[("trace:bad", "aer_statevector")]
    assert bad["outcome"] == "error" and "prepare" in bad["error"]


def test_default_sweep_is_sized_and_ids_are_unique():
    full, quick = default_sweep(), default_sweep(quick=True)
    assert len({c.case_id for c in full}) == len(full) > 90
    assert 8 <= len(quick) <= 12 and max(c.size for c in quick) <= 8
    assert max(c.size for c in full if c.family == "grover") <= 12
    assert {c.level for c in full} >= {"alg", "random", "synthetic"}
    # the crossover grid: brickwork of every depth at every width, quantum volume
    assert {(c.size, c.source.layers) for c in full if c.family == "brickwork"} == {
        (n, d) for n in (10, 14, 18, 22) for d in (2, 4, 8, 16)}
    assert any(c.family == "quantumvolume" for c in full)
    for c in full:   # every sweep case can be rebuilt from its id (refeaturize relies on it)
        assert source_of_case_id(c.case_id) == c.source


def test_short_runs_are_repeated_and_rows_record_load_and_schema(history, worker):
    from ray_qalloc.circuits import FEATURE_SCHEMA_VERSION

    _run(mqt_cases(["ghz"], [3]), ["aer_statevector"], history, worker, repeats=3, repeat_below_s=10.0)
    row = _pairs(history)[("mqt:ghz:alg:3", "aer_statevector")]
    assert row["repeats"] == 3 and row["load_avg"] is not None
    assert row["feature_schema_version"] == FEATURE_SCHEMA_VERSION


def test_refeaturize_rebuilds_sweep_rows_from_their_cases(tmp_path):
    """Stored features of an older schema are computed again from the case id; rows that
    cannot be rebuilt (a trace's job) are copied unchanged."""
    from ray_qalloc.circuits import FEATURE_SCHEMA_VERSION
    from ray_qalloc.config import Limits
    from ray_qalloc.costmodel.measure import BrickworkSource, refeaturize
    from ray_qalloc.jobs import make_spec, prepare_job

    src = RunHistory(tmp_path / "old")
    src.append([{"attempt_id": 1, "job_id": "brick:6:l2:s1", "case_id": "brick:6:l2:s1", "backend": "aer_mps",
                 "outcome": "completed", "wall_s": 0.01, "shots": 64, "features": {"size": 1.0},
                 "family": "brickwork"},
                {"attempt_id": 2, "job_id": "trace:7", "case_id": "trace:7", "backend": "aer_mps",
                 "outcome": "completed", "wall_s": 0.02, "shots": 64, "features": {"size": 2.0}}], source="sweep")
    counts = refeaturize(src.directory, tmp_path / "new")
    assert counts == {"rebuilt": 1, "unchanged": 1}
    rows = {r["case_id"]: r for r in RunHistory(tmp_path / "new").read().to_pylist()}
    want = prepare_job(make_spec(circuit=BrickworkSource(6, 2, 1).build(), shots=64), Limits()).features
    assert rows["brick:6:l2:s1"]["f_mps_gate_work_log2"] == pytest.approx(want["mps_gate_work_log2"])
    assert rows["brick:6:l2:s1"]["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    assert rows["brick:6:l2:s1"]["wall_s"] == 0.01 and rows["brick:6:l2:s1"]["source"] == "sweep"
    assert rows["trace:7"]["f_size"] == 2.0 and rows["trace:7"]["feature_schema_version"] is None


def test_emulated_qpu_records_modelled_qpu_time(history, worker):
    """QPUs are swept only when named; their qpu_s is the modelled device time."""
    report = _run(mqt_cases(["ghz"], [4], shots=256), ["qpu_torino"], history, worker)
    row = _pairs(history)[("mqt:ghz:alg:4", "qpu_torino")]
    assert report.completed == 1 and row["outcome"] == "completed"
    assert row["qpu_s"] > 0 and row["wall_s"] > 0 and row["predicted_s"] > 0
    assert "qpu_torino" not in DEFAULT_BACKENDS
