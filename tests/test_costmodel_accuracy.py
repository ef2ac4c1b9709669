"""benchmarks.costmodel_accuracy's scoring: truth (CPU vs wall), held-out figures beside the goals,
rescoring an earlier run's predictions. No measuring: histories are written directly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks.costmodel_accuracy import GOALS, add_holdout_figures, goals_of, measured_times, rescored
from ray_qalloc.costmodel.history import RunHistory


def _history(tmp_path):
    """Two circuits of two families on two backends: cpu and wall disagree on purpose."""
    rows, i = [], 0
    for cid, fam in (("file:qft-alg-20.qasm", "qft"), ("file:ghz-alg-20.qasm", "ghz")):
        for backend, cpu, wall in (("aer_statevector", 1.0, 3.0), ("aer_mps", 0.1, 0.5)):
            i += 1
            rows.append({"attempt_id": i, "job_id": cid, "case_id": cid, "family": fam, "backend": backend,
                         "outcome": "completed", "wall_s": wall, "cpu_s": cpu, "load_avg": 4.0, "shots": 1024})
    rows.append({"attempt_id": 99, "job_id": "x", "case_id": "file:qft-alg-20.qasm", "backend": "aer_density_matrix",
                 "outcome": "censored_time", "wall_s": 10.0, "cap_s": 10.0, "cpu_s": 4.0, "shots": 1024})
    h = RunHistory(tmp_path / "h")
    h.append(rows, source="benchmark")
    return h


def test_truth_is_cpu_time_where_recorded_and_wall_on_request(tmp_path):
    table = _history(tmp_path).read()
    cpu, wall = measured_times(table), measured_times(table, "wall")
    assert cpu[("file:qft-alg-20.qasm", "aer_statevector")]["t"] == 1.0
    assert wall[("file:qft-alg-20.qasm", "aer_statevector")]["t"] == 3.0
    censored = cpu[("file:qft-alg-20.qasm", "aer_density_matrix")]
    assert censored["censored"] and censored["t"] == 4.0   # the CPU it had used when stopped


def test_held_out_figures_sit_beside_their_goals(tmp_path):
    table = _history(tmp_path).read()
    preds = {cid: {"family": fam, "qubits": 20, "predicted": {"aer_statevector": 1.1, "aer_mps": 0.3}}
             for cid, fam in (("file:qft-alg-20.qasm", "qft"), ("file:ghz-alg-20.qasm", "ghz"))}
    cases = [SimpleNamespace(case_id=cid, family=d["family"]) for cid, d in preds.items()]
    from benchmarks.costmodel_accuracy import summarize

    summary, _ = summarize(preds, measured_times(table), list(preds))
    result = {"summary": summary}
    add_holdout_figures(result, preds, table, cases, {"qft"}, "cpu")
    s = result["summary"]
    assert s["heldout_families"] == ["qft"] and s["load_avg_median"] == 4.0
    assert s["heldout_within_20pct"] == 0.5          # 1.1 vs 1.0 yes, 0.3 vs 0.1 no
    assert s["heldout_best_backend_top1"] == 1.0 and s["heldout_regret_median"] == 0.0
    assert set(s["goals"]) == set(GOALS) and s["goals"]["regret_median"]["met"] is True
    assert s["goals"]["within_20pct"] == {"value": 0.5, "goal": 0.9, "kind": "at least", "met": False}
    assert s["goals_met"] is False
    assert result["summary_heldout_wall"]["within_20pct"] == 0.0   # against wall: 1.1 vs 3.0, 0.3 vs 0.5


def test_goals_without_data_are_neither_met_nor_missed():
    assert all(g["met"] is None for g in goals_of({}).values())


def test_rescore_scores_an_earlier_runs_predictions(tmp_path):
    h = _history(tmp_path)
    old = {"predictor": "model:old", "circuits": "c", "rows": [
        {"case_id": "file:qft-alg-20.qasm", "family": "qft", "qubits": 20,
         "predicted": {"aer_statevector": 0.95, "aer_mps": 0.105}}]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    cases = [SimpleNamespace(case_id="file:qft-alg-20.qasm", family="qft"),
             SimpleNamespace(case_id="file:ghz-alg-20.qasm", family="ghz")]
    result = rescored(path, cases, h.directory, {"qft"}, "cpu")
    assert result["predictor"] == "rescored:model:old"
    assert result["summary"]["n_circuits"] == 1 and result["summary"]["within_20pct"] == pytest.approx(1.0)
