"""The bandit and the retraining loop, unattended, on real Aer runs and a real Ray Tune (issue #13).

The story: the model in service was trained where every run took 20× longer (another machine,
or this one under load); the live history now says otherwise. Nobody is asked: the loop sees
the new history, retrains with Ray Tune (one tiny trial) on the shared test Ray, validates the
candidate on held-out families and on the newest rows, runs it in shadow beside the model in
service on the jobs the bandit places and Aer runs, promotes it, audits and announces the
promotion; then one call rolls it back.
"""

from __future__ import annotations

import statistics
import time
from itertools import count

import pytest
import sqlalchemy as sa
from qiskit import QuantumCircuit

from ray_qalloc.adminstate import AdminState
from ray_qalloc.alerts.outbox import Outbox
from ray_qalloc.backends.registry import make_backend
from ray_qalloc.config import Limits
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.costmodel.model import fit_cost_model
from ray_qalloc.costmodel.policy import LearningSettings, RetrainSettings, bandit_of, wrap
from ray_qalloc.costmodel.registry import ArtifactWatcher, latest_artifact, load_predictor, save_artifact
from ray_qalloc.costmodel.retrain import SHADOW, RetrainLoop, split
from ray_qalloc.costmodel.versions import ACTIVE_KEY, rollback, versions
from ray_qalloc.jobs import make_spec, prepare_job
from ray_qalloc.placement.model import BackendView, JobView, LiveState
from ray_qalloc.placement.pipeline import plan, select

AER = ("aer_statevector", "aer_mps", "aer_stabilizer")
SHOTS = 256
_ids = count(1)


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure_all()
    return qc


def ladder(n: int, layers: int = 3) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    for layer in range(layers):
        for q in range(n):
            qc.ry(0.3 + 0.1 * q + layer, q)
        for q in range(layer % 2, n - 1, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def qftlike(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    for i in range(n):
        qc.h(i)
        for j in range(i + 1, n):
            qc.cp(3.14159 / 2 ** (j - i), j, i)
    qc.measure_all()
    return qc


FAMILIES = {"ghz": ghz, "ladder": ladder, "qftlike": qftlike}


def features_of(qc: QuantumCircuit) -> dict:
    return prepare_job(make_spec(circuit=qc, shots=SHOTS), Limits()).features


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> dict:
    """Real Aer runs of three families at 4..10 qubits (the live history), and the same rows 20×
    slower (what the model in service was trained on)."""
    backends = {name: make_backend(name) for name in AER}
    for b in backends.values():
        b.run(ghz(2), 16)
    rows = []
    for family, build in FAMILIES.items():
        for n in (4, 5, 6, 7, 8, 9, 10):
            qc = build(n)
            feats = features_of(qc)
            for name, b in backends.items():
                method = b.spec().method
                if method == "stabilizer" and family != "ghz":
                    continue
                wall = min(b.run(qc, SHOTS, seed=1).wall_s for _ in range(2))
                rows.append({"id": next(_ids), "job_id": f"{family}-{n}-{name}", "backend": name, "method": method,
                             "shots": SHOTS, "num_qubits": n, "features": feats, "family": family,
                             "case_id": f"{family}-{n}", "outcome": "completed", "wall_s": wall, "cap_s": 30.0})
    root = tmp_path_factory.mktemp("learning")
    live = RunHistory(root / "history")
    live.append(rows, source="live")
    slow = RunHistory(root / "slow")
    slow.append([{**r, "wall_s": r["wall_s"] * 20.0} for r in rows], source="sweep")
    return {"root": root, "live": root / "history", "table": live.read(), "slow": slow.read(), "backends": backends}


def test_split_holds_out_whole_families_and_the_newest_rows(history):
    train, hold, recent, fams = split(history["table"], 0.34, 10)
    assert len(fams) == 1 and recent.num_rows == 10
    assert set(hold.column("family").to_pylist()) == set(fams)
    assert fams[0] not in set(train.column("family").to_pylist())
    assert train.num_rows + hold.num_rows + recent.num_rows == history["table"].num_rows


def test_bandit_and_retraining_loop_run_unattended(history, qa, tmp_path):
    import ray

    assert ray.is_initialized()          # the session's shared Ray (num_cpus=2)
    models = tmp_path / "models"
    stale = save_artifact(models, fit_cost_model(history["slow"], num_rounds=60))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    admin, outbox = AdminState(engine), Outbox(engine, ["log"])
    settings = RetrainSettings(enabled=True, min_new_rows=1, num_samples=1, max_rounds=30, max_concurrent_trials=1,
                               holdout_share=0.34, recent_rows=12, shadow_runs=10, cooldown_s=0,
                               drift_window=8, drift_threshold=1.0)
    loop = RetrainLoop(settings, history["live"], models, admin=admin, outbox=outbox)
    watcher = ArtifactWatcher(models, current=latest_artifact(models))
    learning = LearningSettings(policy="bandit")
    predictor = wrap(load_predictor(models), learning=learning)
    views = [BackendView(b.spec()) for b in history["backends"].values()]
    free = {v.name: LiveState(0.0, True) for v in views}

    def run_jobs(jobs):
        for i, (family, n) in jobs:
            qc = FAMILIES[family](n)
            view = JobView(f"live-{i}", n, frozenset({"h", "cx", "ry", "cp"}), features_of(qc), SHOTS)
            p = plan(view, views, predictor)
            pick = select(view, p, {b: free[b] for b in p.estimates}).backend
            actual = history["backends"][pick].run(qc, SHOTS, seed=2).wall_s
            predicted = p.estimates[pick].runtime_s
            predictor.observe(pick, predicted, actual)
            loop.observe(view, history["backends"][pick].spec(), predicted, actual)
            loop.tick()

    jobs = list(enumerate((f, n) for n in (5, 7, 9, 6, 8, 10, 4) for f in FAMILIES))
    # 1. jobs placed by the bandit and run on Aer; the model in service is far off: the loop
    #    sees the drift and starts training by itself (no new rows: the history is as trained)
    assert loop.why_train() is None
    run_jobs(jobs[:8])
    assert loop.state == "training" and loop.last["why"].startswith("drift"), loop.status()
    deadline = time.time() + 240
    while loop.state == "training" and time.time() < deadline:
        time.sleep(1.0)
        loop.tick()
    assert loop.state == SHADOW, loop.status()
    v = loop.validation
    assert v["holdout"]["candidate"] < v["holdout"]["current"] and v["recent"]["candidate"] < v["recent"]["current"]

    # 2. more jobs: the candidate predicts them in shadow beside the model in service
    run_jobs(jobs[8:])
    bandit = bandit_of(predictor)
    assert bandit.observations == len(jobs)
    # the bandit learned that the stale model is ~20x pessimistic (log 20 ~ 3, clipped at 3)
    means = [c.mean for (k, _, u), c in bandit.cells.items() if k == "rt" and u == "*"]
    assert statistics.fmean(means) < -1.5

    # 3. promoted: in the registry, audited, announced; the allocator's watcher swaps to it
    assert loop.promotions == 1, loop.status()
    promoted = latest_artifact(models)
    assert promoted != stale and (promoted / "promotion.json").exists()
    audit = admin.audit(key=ACTIVE_KEY)
    assert audit[0]["action"] == "model.promote" and audit[0]["actor"] == "retrain-loop"
    assert audit[0]["new"]["version"] == promoted.name and audit[0]["old"] is None
    events = outbox.recent(10)
    assert {e.status for e in events} == {"firing", "resolved"} and all(e.severity.value == "info" for e in events)
    fresh = watcher.poll()
    assert fresh is not None and fresh.source == f"model:{promoted.name}"
    swapped = wrap(fresh, predictor, learning=learning)
    assert bandit_of(swapped) is bandit         # the bandit's state goes on with the new model

    # 4. one call rolls it back; nothing is deleted
    out = rollback(models, actor="operator", admin=admin, outbox=outbox)
    assert out == {"retired": [promoted.name], "active": stale.name}
    assert latest_artifact(models) == stale
    assert {r["version"]: r["state"] for r in versions(models)}[promoted.name] == "retired"
    assert admin.audit(key=ACTIVE_KEY)[0]["action"] == "model.rollback"
