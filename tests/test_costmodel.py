"""The learned cost model on real (small) Aer measurements: training, artifacts, registry,
online correction, exploration, censoring, and one quick Ray Tune run.

Why real runs: the model's job is to rank simulation methods; synthetic timings would only
test that XGBoost fits what we invented. Circuits stay ≤ 14 qubits so the data set builds in
a few seconds.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from itertools import count

import numpy as np
import pyarrow as pa
import pytest
from qiskit import QuantumCircuit

from ray_qalloc.backends.base import BackendSpec, Price
from ray_qalloc.backends.registry import make_backend
from ray_qalloc.config import Limits
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.costmodel.model import (MODEL_FEATURES, CostModel, LearnedPredictor, backend_vector,
                                        circuit_vector, feature_matrix, fit_cost_model, runtime_data)
from ray_qalloc.costmodel.prior import HeuristicPrior
from ray_qalloc.costmodel.registry import ArtifactWatcher, latest_artifact, load_predictor, save_artifact
from ray_qalloc.jobs import make_spec, prepare_job
from ray_qalloc.placement.model import BackendView, JobView

AER = ("aer_statevector", "aer_mps", "aer_stabilizer", "aer_density_matrix")
SHOTS = 512
_ids = count(1)


# -- circuits ---------------------------------------------------------------------------------

def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure_all()
    return qc


def clifford(n: int, layers: int = 4, seed: int = 0) -> QuantumCircuit:
    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n)
    for _ in range(layers):
        for q in range(n):
            getattr(qc, ("h", "s", "x")[int(rng.integers(3))])(q)
        for q in range(int(rng.integers(2)), n - 1, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def rotations(n: int, layers: int = 4, seed: int = 0) -> QuantumCircuit:
    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n)
    for _ in range(layers):
        for q in range(n):
            qc.ry(float(rng.uniform(0, 3)), q)
        for q in range(0, n - 1, 2):
            qc.cx(q, q + 1)
        for q in range(1, n - 1, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def qftlike(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    for i in range(n):
        qc.h(i)
        for j in range(i + 1, n):
            qc.cp(math.pi / 2 ** (j - i), j, i)
    qc.measure_all()
    return qc


FAMILIES = {"ghz": ghz, "clifford": clifford, "rotations": rotations, "qftlike": qftlike}
CLIFFORD_FAMILIES = {"ghz", "clifford"}


def features_of(qc: QuantumCircuit, shots: int = SHOTS) -> dict[str, float]:
    return prepare_job(make_spec(circuit=qc, shots=shots), Limits()).features


def record(backend: str, method: str, family: str, n: int, feats: dict[str, float], **kw) -> dict:
    return {"id": next(_ids), "job_id": f"{family}-{n}-{backend}", "backend": backend, "method": method,
            "shots": SHOTS, "num_qubits": n, "features": feats, "family": family,
            "case_id": f"{family}-{n}", "outcome": "completed", **kw}


def measure(backend, qc: QuantumCircuit, repeats: int = 2) -> float:
    return statistics.median(backend.run(qc, SHOTS, seed=1).wall_s for _ in range(repeats))


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """A RunHistory of real Aer runs (+ a few censored and failed rows), and the medians."""
    backends = {name: make_backend(name) for name in AER}
    for b in backends.values():  # first run pays one-off initialisation
        b.run(ghz(2), 16)
    records, medians = [], {}
    for family, build in FAMILIES.items():
        for n in (4, 6, 8, 10, 12, 14):
            qc = build(n)
            feats = features_of(qc)
            for name, b in backends.items():
                method = b.spec().method
                if method == "stabilizer" and family not in CLIFFORD_FAMILIES:
                    continue
                if method == "density_matrix" and n > 8:
                    continue
                wall = measure(b, qc)
                medians[(family, n, name)] = wall
                records.append(record(name, method, family, n, feats, wall_s=wall, cap_s=30.0,
                                      peak_memory_bytes=2e8 + 16.0 * 2 ** n))
    # Runs stopped at their cap: deep rotation circuits on MPS "ran for more than 20 s".
    censored = []
    for n in (12, 14):
        for layers in (16, 24):
            feats = features_of(rotations(n, layers, seed=7))
            censored.append(record("aer_mps", "matrix_product_state", "deep_rotations", n, feats,
                                   outcome="censored_time", censored=True, wall_s=20.0, cap_s=20.0))
    failed = [record("aer_stabilizer", "stabilizer", "rotations", 8, features_of(rotations(8)),
                     outcome="failed", error="not Clifford")]
    directory = tmp_path_factory.mktemp("history")
    history = RunHistory(directory)
    history.append(records, source="sweep")
    history.append(censored + failed, source="sweep")
    return {"dir": directory, "table": history.read(), "medians": medians, "n_censored": len(censored)}


@pytest.fixture(scope="module")
def model(measured) -> CostModel:
    return fit_cost_model(measured["table"], num_rounds=150)


def sim_views() -> list[BackendView]:
    return [BackendView(make_backend(name).spec()) for name in AER]


QPU_CAL = {"t1_median_us": 180.0, "t2_median_us": 120.0, "readout_error_median": 0.015,
           "gate_1q_error_median": 2.5e-4, "gate_2q_error_median": 6e-3}


def qpu_views() -> list[BackendView]:
    return [BackendView(BackendSpec(name=f"qpu_{d}", kind="qpu", family="fake_qpu", num_qubits=127,
                                    device=f"fake_{d}", noisy=True, price=Price(per_second=1.6)),
                        calibration=QPU_CAL) for d in ("torino", "sherbrooke", "fez")]


def job_of(qc: QuantumCircuit, **kw) -> JobView:
    pj = prepare_job(make_spec(circuit=qc, shots=SHOTS), Limits())
    return JobView(id=pj.id, num_qubits=pj.num_qubits, ops=pj.ops, features=pj.features, shots=SHOTS, **kw)


def by_name(estimates) -> dict:
    return {e.backend: e for e in estimates}


# -- features and data --------------------------------------------------------------------------

def test_feature_matrix_has_model_columns_and_missing_calibration(measured):
    X = feature_matrix(measured["table"])
    assert X.dtype == np.float32 and X.shape == (measured["table"].num_rows, len(MODEL_FEATURES))
    cal = [i for i, n in enumerate(MODEL_FEATURES) if n.startswith("b_cal_")]
    assert np.isnan(X[:, cal]).all()  # simulators: calibration is missing, not zero


def test_censored_rows_enter_training_and_failures_are_counted(measured):
    data = runtime_data(measured["table"])
    assert int(data.censored.sum()) == measured["n_censored"]
    assert np.all(data.lower[data.censored] == 20.0)
    assert data.dropped["failed"] == 1


def test_rows_of_an_older_feature_schema_are_left_out_with_a_fix(measured, tmp_path, caplog):
    """A run whose features predate schema 2 lacks the entanglement features: training leaves it
    out (mixing would teach the trees that "missing" means "cheap") and says how to fix it."""
    from ray_qalloc.circuits import ENTANGLEMENT_FEATURES, FEATURE_SCHEMA_VERSION
    from ray_qalloc.costmodel.model import current_feature_rows

    old = {k: v for k, v in features_of(ghz(6)).items() if k not in ENTANGLEMENT_FEATURES}
    history = RunHistory(tmp_path / "old")
    history.append([record("aer_statevector", "statevector", "ghz", 6, old, wall_s=0.01),
                    record("aer_statevector", "statevector", "ghz", 6, features_of(ghz(6)), wall_s=0.01,
                           feature_schema_version=FEATURE_SCHEMA_VERSION - 1)], source="live")
    table = pa.concat_tables([measured["table"], history.read()], promote_options="default")
    assert current_feature_rows(history.read()).tolist() == [False, False]
    with caplog.at_level("WARNING"):
        data = runtime_data(table)
    assert data.dropped["old_features"] == 2
    assert data.n_rows == runtime_data(measured["table"]).n_rows
    assert "To fix" in caplog.text and "refeaturize" in caplog.text


def test_censored_rows_raise_predictions_above_what_fast_runs_suggest(measured, model):
    table = measured["table"]
    keep = pa.compute.invert(pa.compute.starts_with(table.column("outcome"), "censored"))
    without = fit_cost_model(table.filter(keep), num_rounds=150)
    assert model.meta["n_censored"] == measured["n_censored"] and without.meta["n_censored"] == 0
    job = job_of(rotations(14, 20, seed=3))
    mps = [v for v in sim_views() if v.name == "aer_mps"]
    with_c = LearnedPredictor(model, exploration_rate=0).predict(job, mps)[0].runtime_s
    without_c = LearnedPredictor(without, exploration_rate=0).predict(job, mps)[0].runtime_s
    assert with_c > 3 * without_c
    assert with_c > 5.0  # the model learned "deep rotations on MPS run long"


# -- ranking --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,n,fast,slow", [
    ("rotations", 14, "aer_statevector", "aer_mps"),
    ("qftlike", 8, "aer_statevector", "aer_density_matrix"),
    ("ghz", 14, "aer_stabilizer", "aer_density_matrix"),
])
def test_model_ranks_methods_as_the_measurements_do(measured, model, family, n, fast, slow):
    medians = measured["medians"]
    if (family, n, slow) in medians:
        assert medians[(family, n, fast)] < medians[(family, n, slow)]  # what the data shows
    job = job_of(FAMILIES[family](n))
    est = by_name(LearnedPredictor(model, exploration_rate=0).predict(job, sim_views()))
    assert est[fast].runtime_s < est[slow].runtime_s
    assert est[fast].source.startswith("model:")


def test_wide_ghz_stabilizer_vs_statevector_follows_data(measured, model):
    """The brief's example; at 14 qubits the two are close, so check agreement with the data."""
    medians = measured["medians"]
    sv, st = medians[("ghz", 14, "aer_statevector")], medians[("ghz", 14, "aer_stabilizer")]
    est = by_name(LearnedPredictor(model, exploration_rate=0).predict(job_of(ghz(14)), sim_views()))
    if max(sv, st) / min(sv, st) > 1.5:
        assert (est["aer_stabilizer"].runtime_s < est["aer_statevector"].runtime_s) == (st < sv)
    # Outside the data, the prior anchor keeps the scaling law: GHZ-30 is a stabilizer job.
    est30 = by_name(LearnedPredictor(model, exploration_rate=0).predict(job_of(ghz(30)), sim_views()))
    assert est30["aer_stabilizer"].runtime_s * 100 < est30["aer_statevector"].runtime_s


def test_model_beats_or_matches_prior_on_the_data(measured, model):
    data = runtime_data(measured["table"])
    done = ~data.censored
    truth = np.log(data.lower[done])
    model_err = np.sqrt(np.mean((model.predict_log_runtime(data.X[done]) - truth) ** 2))
    prior_err = np.sqrt(np.mean((data.anchor[done] - truth) ** 2))
    assert model_err < prior_err


def test_anchor_is_the_prior_it_was_frozen_from():
    """If this fails, the prior was retuned: keep the anchor (artifacts depend on it) or bump
    ANCHOR_VERSION and retrain; do not silently edit one to match the other."""
    from ray_qalloc.costmodel.model import anchor_log_runtime, backend_vector, circuit_vector
    from ray_qalloc.costmodel.prior import simulator_runtime

    for qc in (ghz(12), qftlike(9), rotations(14)):
        job = job_of(qc)
        for view in sim_views():
            x = np.concatenate([circuit_vector(job.features), backend_vector(view.spec, None)])[None, :]
            assert math.exp(anchor_log_runtime(x)[0]) == pytest.approx(
                simulator_runtime(view.spec.method, job, view.spec.threads), rel=1e-5)


def test_an_artifact_is_predicted_with_the_anchor_it_was_trained_on(model, tmp_path):
    """Retuning the prior (a new anchor version) must not shift an old artifact's numbers: a
    v1 artifact adds its trees to the v1 anchor; a version this code does not know is refused."""
    from ray_qalloc.costmodel.model import ANCHOR_VERSION, IncompatibleArtifact, anchor_log_runtime

    job = job_of(rotations(14, 20, seed=3))
    x = np.concatenate([circuit_vector(job.features), backend_vector(sim_views()[1].spec, None)])[None, :]
    assert sim_views()[1].name == "aer_mps"
    v1, now = anchor_log_runtime(x, 1)[0], anchor_log_runtime(x)[0]
    assert abs(v1 - now) > 0.1  # MPS is where the versions differ
    path = save_artifact(tmp_path, model)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["anchor_version"] == ANCHOR_VERSION
    meta["anchor_version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    old = CostModel.load(path)
    trees = model.predict_log_runtime(x)[0] - now
    assert old.predict_log_runtime(x)[0] == pytest.approx(v1 + trees)
    assert CostModel.load(save_artifact(tmp_path / "again", old)).anchor_version == 1  # kept on save
    meta["anchor_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleArtifact, match="anchor_version"):
        CostModel.load(path)


def test_qpus_fall_back_to_analytic_estimates(model):
    job = job_of(ghz(5))
    views = qpu_views()
    learned = LearnedPredictor(model, exploration_rate=0).predict(job, views)
    prior = HeuristicPrior().predict(job, views)
    for a, b in zip(learned, prior):
        assert a.runtime_s == pytest.approx(b.runtime_s) and a.fidelity == pytest.approx(b.fidelity)
        assert a.source == "prior"
    assert model.fidelity is None  # no measured fidelity column in this history


def test_measured_fidelity_corrects_the_calibration_estimate(measured, tmp_path):
    """When the history gains a measured ``fidelity`` column, QPU estimates learn from it."""
    from ray_qalloc.costmodel.prior import qpu_fidelity

    qpu = qpu_views()[0]
    recs, fids = [], []
    for family, build in FAMILIES.items():
        for n in (3, 4, 5, 6, 7, 8):
            feats = features_of(build(n))
            view = JobView(id="x", num_qubits=n, ops=frozenset(), features=feats, shots=SHOTS)
            fids.append(0.5 * qpu_fidelity(view, QPU_CAL))  # the device does half as well as estimated
            recs.append(record(qpu.name, None, family, n, feats, wall_s=3.0, qpu_s=2.0))
    RunHistory(tmp_path).append(recs)
    qpu_rows = RunHistory(tmp_path).read()
    qpu_rows = qpu_rows.append_column("fidelity", pa.array(fids, type=pa.float64()))
    table = pa.concat_tables([measured["table"], qpu_rows], promote_options="default")
    fitted = fit_cost_model(table, num_rounds=50, specs={qpu.name: qpu.spec},
                            calibrations={qpu.name: QPU_CAL})
    assert fitted.fidelity is not None
    job = job_of(rotations(6))
    est = LearnedPredictor(fitted, exploration_rate=0).predict(job, [qpu])[0]
    prior = HeuristicPrior().predict(job, [qpu])[0]
    assert est.fidelity == pytest.approx(0.5 * prior.fidelity, rel=0.15)
    assert est.runtime_s == pytest.approx(prior.runtime_s) and est.source.endswith(":fidelity")


def test_memory_never_below_state_size(model):
    est = by_name(LearnedPredictor(model, exploration_rate=0).predict(job_of(ghz(20)), sim_views()))
    assert est["aer_statevector"].memory_bytes >= 16 * 2 ** 20
    assert est["aer_density_matrix"].memory_bytes >= 16 * 4 ** 20
    assert model.memory is not None


# -- artifacts and registry -------------------------------------------------------------------

def test_artifact_round_trip_gives_identical_predictions(model, tmp_path):
    path = save_artifact(tmp_path, model, metrics={"note": 1.0}, data_hash="abc")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["model_features"] == list(MODEL_FEATURES) and meta["data_hash"] == "abc"
    assert {"runtime.ubj", "memory.ubj"} <= {p.name for p in path.iterdir()}
    assert not any(p.suffix in (".pkl", ".pickle") for p in path.iterdir())
    loaded = CostModel.load(path)
    job, views = job_of(qftlike(10)), sim_views()
    a = LearnedPredictor(model, exploration_rate=0).predict(job, views)
    b = LearnedPredictor(loaded, exploration_rate=0).predict(job, views)
    assert [e.runtime_s for e in a] == [e.runtime_s for e in b]
    assert [e.memory_bytes for e in a] == [e.memory_bytes for e in b]
    assert b[0].source == f"model:{path.name}"


def test_registry_picks_newest_compatible_and_skips_incompatible(model, tmp_path, caplog):
    older = save_artifact(tmp_path, model)
    newer = save_artifact(tmp_path, model)
    assert newer.name > older.name
    assert latest_artifact(tmp_path) == newer
    broken = tmp_path / "99999999T000000000000Z-bad"
    shutil.copytree(newer, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["feature_schema_version"] = -1
    (broken / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "99999999T999999999999Z-empty").mkdir()
    with caplog.at_level("WARNING"):
        assert latest_artifact(tmp_path) == newer
    assert "feature_schema_version" in caplog.text and "To fix" in caplog.text
    predictor = load_predictor(tmp_path)
    assert isinstance(predictor, LearnedPredictor) and predictor.source == f"model:{newer.name}"


def test_load_predictor_falls_back_to_prior(tmp_path, monkeypatch):
    import ray_qalloc.costmodel.registry as registry

    monkeypatch.setattr(registry, "PACKAGED_DIR", tmp_path / "no-packaged-artifacts")
    assert isinstance(load_predictor(tmp_path / "empty"), HeuristicPrior)
    assert isinstance(load_predictor(None), HeuristicPrior)


def test_watcher_notices_a_new_artifact(model, tmp_path):
    watcher = ArtifactWatcher(tmp_path / "reg")
    assert watcher.poll() is None  # no registry yet
    first = save_artifact(tmp_path / "reg", model)
    p1 = watcher.poll()
    assert isinstance(p1, LearnedPredictor) and p1.source == f"model:{first.name}"
    assert watcher.poll() is None  # nothing changed: no reload
    second = save_artifact(tmp_path / "reg", model)
    p2 = watcher.poll()
    assert p2 is not None and p2.source == f"model:{second.name}"


# -- online correction and exploration ----------------------------------------------------------

def test_online_correction_moves_predictions_toward_observations(model):
    pred = LearnedPredictor(model, exploration_rate=0)
    job, views = job_of(rotations(10)), sim_views()
    sv = [v for v in views if v.name == "aer_statevector"]
    before = pred.predict(job, sv)[0].runtime_s
    actual = before * 5
    for _ in range(30):
        est = pred.predict(job, sv)[0].runtime_s
        pred.observe("aer_statevector", est, actual)
    after = pred.predict(job, sv)[0].runtime_s
    assert after == pytest.approx(actual, rel=0.05)
    assert pred.predict(job, [v for v in views if v.name == "aer_mps"])[0].runtime_s > 0  # others untouched
    assert pred.correction("aer_mps") == 1.0
    for _ in range(100):  # absurd observations are bounded (log clip ±3)
        pred.observe("aer_mps", 1.0, 1e9)
    assert pred.correction("aer_mps") == pytest.approx(math.exp(3.0))


def test_estimates_carry_a_per_method_spread_from_the_artifact_or_defaults(model, measured):
    from ray_qalloc.costmodel.model import runtime_metrics
    from ray_qalloc.costmodel.prior import METHOD_LOG_SD, QPU_LOG_SD

    job, views = job_of(rotations(10)), sim_views() + qpu_views()
    # the training metrics now hold per-method residuals; a model without them uses defaults
    data = runtime_data(measured["table"])
    metrics = runtime_metrics(model.predict_log_runtime(data.X), data)
    assert {f"rmse_log_{m}" for m in ("statevector", "matrix_product_state")} <= set(metrics)
    plain = by_name(LearnedPredictor(model, exploration_rate=0).predict(job, views))
    assert plain["aer_statevector"].log_sd == METHOD_LOG_SD["statevector"]
    assert plain["aer_mps"].log_sd == METHOD_LOG_SD["matrix_product_state"]
    assert plain["qpu_torino"].log_sd == QPU_LOG_SD
    meta = {**model.meta, "metrics": {**model.meta.get("metrics", {}), "cv_rmse_log_matrix_product_state": 2.2,
                                      "cv_rmse_log_statevector": float("nan")}}
    cv = CostModel(model.runtime, model.memory, model.fidelity, meta)
    got = by_name(LearnedPredictor(cv, exploration_rate=0).predict(job, views))
    assert got["aer_mps"].log_sd == 2.2
    assert got["aer_statevector"].log_sd == METHOD_LOG_SD["statevector"]   # NaN in the artifact: ignored


def test_spread_grows_for_a_backend_whose_predictions_are_far_off_and_is_bounded(model):
    from ray_qalloc.costmodel.model import LearnedPredictor as LP

    pred = LP(model, exploration_rate=0, ewma_alpha=0.2)
    job, views = job_of(rotations(10)), sim_views()
    sv = [v for v in views if v.name == "aer_statevector"]
    base = pred.predict(job, sv)[0].log_sd
    for _ in range(20):   # spot on: the spread never talks itself below the method's
        e = pred.predict(job, sv)[0]
        pred.observe("aer_statevector", e.runtime_s, e.runtime_s)
    assert pred.predict(job, sv)[0].log_sd == base
    rng = np.random.default_rng(0)
    for _ in range(40):   # off by ×e^±2 at random: the bias cannot learn it, the spread does
        e = pred.predict(job, sv)[0]
        pred.observe("aer_statevector", e.runtime_s, e.runtime_s * math.exp(2.0 * rng.choice([-1, 1])))
    grown = pred.predict(job, sv)[0].log_sd
    assert 1.2 < grown <= 3.0
    for _ in range(100):  # absurd observations: bounded by the same ±3 clip as the bias
        pred.observe("aer_mps", 1.0, 1e9)
    assert pred.spread("aer_mps") == pytest.approx(3.0)


def test_memory_predictor_forwards_observe_with_the_models_own_prediction(model):
    from ray_qalloc.costmodel.memory import MemoryPredictor

    base = LearnedPredictor(model, exploration_rate=0)
    mp = MemoryPredictor(base)
    job, views = job_of(rotations(10), circuit_key="rot10"), sim_views()
    sv = [v for v in views if v.name == "aer_statevector"]
    honest = base.predict(job, sv)[0].runtime_s
    mp.remember(job, sv[0].spec, honest * 4, predicted_s=honest)
    shown = mp.predict(job, sv)[0]
    assert shown.source == "memory:exact" and shown.runtime_s == pytest.approx(honest * 4)
    mp.observe("aer_statevector", shown.runtime_s, honest * 4)     # what the allocator passes
    assert base.correction("aer_statevector") == pytest.approx(math.exp(base.alpha * math.log(4.0)))
    assert mp.source == base.source and mp.correction("aer_mps") == 1.0 and mp.explorations == 0


def test_memory_takes_ratios_against_the_honest_prediction_not_an_explored_one(model):
    from ray_qalloc.costmodel.memory import MemoryPredictor

    mp = MemoryPredictor(LearnedPredictor(model, exploration_rate=0.2, explore_factor=4.0, seed=3))
    first, twin = job_of(ghz(10), circuit_key="a"), job_of(ghz(10), circuit_key="b")   # same features
    views = sim_views()
    honest = by_name(LearnedPredictor(model, exploration_rate=0).predict(first, views))
    e = next(e for _ in range(1000) for e in mp.predict(first, views) if e.source.endswith(":explore"))
    view = next(v for v in views if v.name == e.backend)
    actual = honest[e.backend].runtime_s * 2.0
    mp.remember(first, view.spec, actual, predicted_s=e.runtime_s)     # it ran on the shrunk estimate
    hit = next(x for x in mp.predict(twin, [view]))
    assert hit.source == "memory:neighbour"
    assert hit.runtime_s == pytest.approx(actual, rel=1e-6)           # ratio 2, not 8


def test_exploration_is_bounded_and_never_for_emergency_or_deadline(model):
    job, views = job_of(ghz(10)), sim_views()
    honest = by_name(LearnedPredictor(model, exploration_rate=0).predict(job, views))
    pred = LearnedPredictor(model, exploration_rate=0.2, explore_factor=4.0, seed=1)
    explored = 0
    for _ in range(500):
        for e in pred.predict(job, views):
            if e.source.endswith(":explore"):
                explored += 1
                assert e.runtime_s == pytest.approx(honest[e.backend].runtime_s / 4.0)
                assert honest[e.backend].runtime_s <= 4.0 * min(h.runtime_s for h in honest.values())
    assert 0 < explored <= 0.3 * 500
    for kw in ({"priority": "emergency"}, {"deadline_s": 10.0}):
        urgent = job_of(ghz(10), **kw)
        for _ in range(300):
            assert not any(e.source.endswith(":explore") for e in pred.predict(urgent, views))
    # observe() undoes the shrink, so exploring does not bias the correction
    e = next(e for _ in range(1000) for e in pred.predict(job, views) if e.source.endswith(":explore"))
    pred.observe(e.backend, e.runtime_s, honest[e.backend].runtime_s)
    assert pred.correction(e.backend) == pytest.approx(1.0, abs=1e-6)
    assert LearnedPredictor(model, exploration_rate=5.0).exploration_rate == 0.2


def test_predict_latency_one_job_seven_backends(model):
    pred = LearnedPredictor(model)
    job, views = job_of(qftlike(12)), sim_views() + qpu_views()
    assert len(views) == 7
    for _ in range(50):
        pred.predict(job, views)
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        pred.predict(job, views)
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    print(f"\npredict 1 job x 7 backends: {per_call_us:.0f} us")
    assert per_call_us < 5000  # generous for CI noise; measured ~0.3 ms here


# -- Ray Tune ------------------------------------------------------------------------------------

def test_tune_quick_writes_a_loadable_artifact(measured, tmp_path):
    import ray

    from ray_qalloc.costmodel.tuning import train

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="qr", dir="/tmp"))
        started = True
    try:
        t0 = time.perf_counter()
        path = train(measured["dir"], tmp_path / "registry", num_samples=3, max_rounds=30, quick=True)
        elapsed = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    print(f"\ntune quick: {elapsed:.1f} s")
    meta = json.loads((path / "meta.json").read_text())
    assert {"cv_rmse_log", "cv_within_20pct", "cv_spearman"} <= set(meta["metrics"])
    assert meta["n_censored"] == 4 and meta["data_hash"]
    assert latest_artifact(tmp_path / "registry") == path
    assert isinstance(load_predictor(tmp_path / "registry"), LearnedPredictor)


def test_allocator_picks_up_a_new_artifact_without_restart(tmp_path, model):
    """The allocator starts on the prior; a model published later is used for new jobs."""

    from ray_qalloc.costmodel.registry import save_artifact
    from tests.test_allocator_unit import FakeBackend, make, run_async
    from tests.helpers import prepared

    feats = features_of(ghz(6))

    async def main():
        alloc = make(tmp_path, [FakeBackend("aer_statevector", delay=0.01), FakeBackend("aer_stabilizer", delay=0.01)],
                     specs=[make_backend("aer_statevector").spec(), make_backend("aer_stabilizer").spec()],
                     hedge={"probe_idle": False})     # one measured variant, the other the model's
        first = await alloc.submit(prepared(num_qubits=6, features=feats))
        await alloc.wait(first["id"], timeout=10)
        before = await alloc.explain(first["id"])
        save_artifact(tmp_path / "models", model, metrics={}, data_hash="test")
        alloc._poll_model()
        second = await alloc.submit(prepared(num_qubits=6, features=feats))
        await alloc.wait(second["id"], timeout=10)
        after = await alloc.explain(second["id"])
        return before, after, alloc

    before, after, alloc = run_async(main)
    # before: the shipped model (or the prior where none ships); after: the new artifact
    shipped = load_predictor(None)
    assert {r["source"] for r in before["backends"].values() if r["status"] == "scored"} == {
        getattr(shipped, "source", "prior")}
    sources = {r["source"] for r in after["backends"].values() if r["status"] == "scored"}
    # the same circuit ran before: run memory answers for the variant it ran on, the model for the rest
    assert f"model:{model.version}" in sources and sources <= {f"model:{model.version}", "memory:exact"}
    # online correction: the completed run moved that backend's correction away from 1
    assert alloc.predictor.correction(after["chosen"]) != 1.0


def test_qpu_time_is_learned_where_history_has_it(tmp_path):
    """QPU runs that recorded qpu_s beside the estimate made before them teach a correction:
    here the device takes 3x what was estimated; without such rows the estimate stands."""
    from ray_qalloc.backends.registry import make_backend as mk

    qpu = mk("qpu_torino")
    view = BackendView(qpu.spec(), True, qpu.calibration().summary())
    rows = []
    for n in (3, 4, 5, 6, 7, 8, 9, 10):
        for shots in (256, 1024, 4096):
            job = JobView("j", n, frozenset(), features_of(ghz(n), shots), shots)
            est = HeuristicPrior().predict(job, [view])[0].runtime_s
            rows.append({"id": next(_ids), "job_id": f"q{n}-{shots}", "backend": "qpu_torino", "shots": shots,
                         "num_qubits": n, "features": job.features, "outcome": "completed", "wall_s": 9.0,
                         "qpu_s": 3.0 * est, "predicted_s": est, "family": "ghz"})
    sims = [record("aer_statevector", "statevector", "ghz", n, features_of(ghz(n)), wall_s=0.01 * n) for n in (3, 4, 5)]
    history = RunHistory(tmp_path / "h")
    history.append(rows + sims, source="live")
    model = fit_cost_model(history.read(), num_rounds=10)
    assert model.qpu_time is not None
    loaded = CostModel.load(save_artifact(tmp_path / "reg", model))
    job = JobView("k", 5, frozenset(), features_of(ghz(5), 1024), 1024)
    prior = HeuristicPrior().predict(job, [view])[0].runtime_s
    est = LearnedPredictor(loaded, exploration_rate=0).predict(job, [view])[0]
    assert est.runtime_s == pytest.approx(3.0 * prior, rel=0.15) and est.source.endswith(":qpu_time")
    sims_only = RunHistory(tmp_path / "s")
    sims_only.append(sims, source="live")
    assert fit_cost_model(sims_only.read(), num_rounds=5).qpu_time is None
