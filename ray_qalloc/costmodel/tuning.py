"""Tune the runtime model's XGBoost parameters with Ray Tune, refit, publish an artifact.

Why these choices:

* **Grouped cross-validation by circuit family.** Rows of one family (QFT at 8, 10, 12 ...
  qubits, on four methods) are near-duplicates; a random split would score memorisation.
  Holding out whole families measures what matters: predicting a circuit kind not seen yet.
  Live rows without a family are grouped by case or job id.
* **OptunaSearch (TPE) + ASHA.** Trials report CV metrics every ``chunk`` boosting rounds,
  so ASHA stops poor configurations after a few chunks; ``max_concurrent_trials`` equals the
  CPUs so TPE learns from finished trials, and ``reuse_actors`` avoids ~1 s per trial.
* The selected trial's best round count (not its last) is used for the refit on all rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.costmodel.model import RuntimeData, booster_params, fit_cost_model, runtime_data, runtime_metrics
from ray_qalloc.costmodel.registry import save_artifact

log = logging.getLogger(__name__)

QUICK_SAMPLES = 4
QUICK_ROUNDS = 40


def _search_space(max_rounds: int, chunk: int) -> dict[str, Any]:
    from ray import tune

    return {
        "max_depth": tune.randint(3, 9),
        "eta": tune.loguniform(0.02, 0.3),
        "min_child_weight": tune.loguniform(0.5, 20.0),
        "subsample": tune.uniform(0.6, 1.0),
        "colsample_bytree": tune.uniform(0.5, 1.0),
        "lambda": tune.loguniform(0.1, 10.0),
        "aft_scale": tune.loguniform(0.2, 1.5),
        "num_boost_round": tune.randint(max(chunk, max_rounds // 4), max_rounds + 1),
    }


def _folds(data: RuntimeData, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """GroupKFold splits; no group appears on both sides."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(set(data.groups.tolist()))
    k = min(folds, n_groups)
    if k < 2:
        raise ValueError(f"cross-validation needs rows from at least 2 circuit families/cases; "
                         f"the history has {n_groups}. Run the sweep over more families.")
    return [(tr, va) for tr, va in GroupKFold(n_splits=k).split(data.X, groups=data.groups)]


def cv_trainable(config: dict[str, Any], data: RuntimeData, splits: list[tuple[np.ndarray, np.ndarray]],
                 chunk: int, seed: int) -> None:
    """One trial: boost every fold side by side, reporting out-of-fold metrics every ``chunk`` rounds."""
    import xgboost as xgb
    from ray import tune

    params = booster_params(config, nthread=1, seed=seed)
    rounds = int(config["num_boost_round"])
    parts = [(data.subset(tr).dmatrix(), data.subset(va)) for tr, va in splits]
    dvalid = [va.dmatrix() for _, va in parts]
    boosters = [xgb.Booster(params, [dtr]) for dtr, _ in parts]
    oof = data.subset(np.concatenate([va for _, va in splits]))
    best: dict[str, float] = {"best_rmse": math.inf, "best_round": 0.0}
    done = 0
    while done < rounds:
        step = min(chunk, rounds - done)
        for (dtr, _), bst in zip(parts, boosters):
            for i in range(done, done + step):
                bst.update(dtr, i)
        done += step
        pred = np.concatenate([bst.predict(dv, output_margin=True) for bst, dv in zip(boosters, dvalid)])
        m = runtime_metrics(pred.astype(np.float64), oof)
        rmse = m.get("rmse_log", math.inf)
        if rmse < best["best_rmse"]:
            best = {"best_rmse": rmse, "best_round": float(done),
                    **{f"best_{k}": v for k, v in m.items() if k != "rmse_log"}}
        tune.report({"rmse": rmse, "rounds": done, **best})


def _ensure_ray() -> bool:
    """Use the caller's Ray; start (and later stop) a small local one only if there is none."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:  # Optuna announces every study at INFO
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover
        pass
    return True


def _load(history: Path | str | pa.Table) -> pa.Table:
    return history if isinstance(history, pa.Table) else RunHistory(history).read()


def train(history: Path | str | pa.Table, registry_dir: Path | str, *, num_samples: int = 8,
          max_rounds: int = 200, folds: int = 3, seed: int = 0, quick: bool = False,
          specs: Mapping[str, BackendSpec] | None = None, max_concurrent_trials: int | None = None) -> Path:
    """Tune, refit the best configuration on all rows, and write a versioned artifact.
    ``max_concurrent_trials`` bounds the cores the search holds (default: every CPU of the cluster;
    the retraining loop runs beside jobs and passes its own bound)."""
    if quick:
        num_samples, max_rounds = min(num_samples, QUICK_SAMPLES), min(max_rounds, QUICK_ROUNDS)
    table = _load(history)
    data = runtime_data(table, specs)
    splits = _folds(data, folds)
    chunk = max(5, max_rounds // 8)
    started = time.perf_counter()
    best = _tune(data, splits, num_samples=num_samples, max_rounds=max_rounds, chunk=chunk, seed=seed,
                 max_concurrent_trials=max_concurrent_trials)
    tune_s = time.perf_counter() - started
    config = {k: v for k, v in best["config"].items() if k != "num_boost_round"}
    rounds = max(int(best["metrics"]["best_round"]), 1)
    cv = {("cv_rmse_log" if k == "best_rmse" else f"cv_{k.removeprefix('best_')}"): v
          for k, v in best["metrics"].items() if k.startswith("best_") and k != "best_round"}
    metrics = {**cv, "cv_folds": len(splits), "cv_grouped_by": "family|case_id|job_id",
               "tune_seconds": round(tune_s, 2), "tune_samples": num_samples, "best_round": rounds,
               "best_config": config}
    model = fit_cost_model(table, config, num_rounds=rounds, specs=specs, metrics=metrics, seed=seed)
    path = save_artifact(registry_dir, model, metrics=metrics, data_hash=data.data_hash())
    log.info("cost model %s: cv rmse(log) %.3f, within 20%% %.2f, %d rows (%d censored)",
             path.name, cv.get("cv_rmse_log", float("nan")), cv.get("cv_within_20pct", float("nan")),
             data.n_rows, int(data.censored.sum()))
    return path


def _tune(data: RuntimeData, splits: list[tuple[np.ndarray, np.ndarray]], *, num_samples: int,
          max_rounds: int, chunk: int, seed: int, max_concurrent_trials: int | None = None) -> dict[str, Any]:
    """Run the Tune experiment; return the best trial's config and its best-round metrics."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no progress tables
    started_ray = _ensure_ray()
    storage = tempfile.mkdtemp(prefix="qalloc-tune-")
    try:
        trainable = tune.with_resources(
            tune.with_parameters(cv_trainable, data=data, splits=splits, chunk=chunk, seed=seed), {"cpu": 1})
        tuner = tune.Tuner(
            trainable,
            param_space=_search_space(max_rounds, chunk),
            tune_config=tune.TuneConfig(
                metric="best_rmse", mode="min", num_samples=num_samples, reuse_actors=True,
                max_concurrent_trials=max(1, max_concurrent_trials or int(ray.cluster_resources().get("CPU", 2))),
                search_alg=OptunaSearch(seed=seed),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=math.ceil(max_rounds / chunk),
                                        grace_period=2, reduction_factor=2)),
            run_config=tune.RunConfig(name="costmodel", storage_path=storage, verbose=0),
        )
        results = tuner.fit()
        best = results.get_best_result(metric="best_rmse", mode="min")
        if best.metrics is None or not math.isfinite(best.metrics.get("best_rmse", math.inf)):
            raise RuntimeError("no trial produced a finite validation error; see the Tune logs.")
        return {"config": dict(best.config), "metrics": dict(best.metrics)}
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune.costmodel", description=__doc__.splitlines()[0])
    parser.add_argument("--history", required=True, help="run-history directory (Parquet parts)")
    parser.add_argument("--registry", required=True, help="model registry directory to publish into")
    parser.add_argument("--samples", type=int, default=8, help="Tune trials")
    parser.add_argument("--rounds", type=int, default=200, help="most boosting rounds per trial")
    parser.add_argument("--folds", type=int, default=3, help="grouped CV folds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"≤{QUICK_SAMPLES} trials of ≤{QUICK_ROUNDS} rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in (__name__, "ray_qalloc.costmodel"):
        logging.getLogger(name).setLevel(logging.INFO)
    path = train(args.history, args.registry, num_samples=args.samples, max_rounds=args.rounds,
                 folds=args.folds, seed=args.seed, quick=args.quick)
    meta = json.loads((path / "meta.json").read_text())
    print(json.dumps({"artifact": str(path), "n_rows": meta.get("n_rows"), "metrics": meta.get("metrics")},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
