"""The learned cost model: XGBoost runtime (and memory, fidelity) predictors per (job, backend).

Why it looks like this:

* **Runtime is anchored on the analytic prior.** Each row's boosting starts from
  ``log(prior seconds)`` (XGBoost ``base_margin``) and the trees learn the log-residual.
  Trees cannot extrapolate: a plain model trained on ≤ 20-qubit runs predicts a 30-qubit
  statevector like a 20-qubit one, 1000× too fast. Anchored, it keeps the prior's scaling law
  (2ⁿ, 4ⁿ, χ³ ...) outside the data and the measured constants inside it. The anchor is a
  frozen copy of ``prior.simulator_runtime`` per ``ANCHOR_VERSION``: a saved artifact records
  the version it was trained on and is always predicted with that anchor, so retuning the
  prior (a new version) never shifts an old artifact's numbers.
* **Right-censored runs use XGBoost's ``survival:aft`` objective.** A run stopped at its cap
  says "at least cap seconds"; AFT takes it as the interval [cap, +inf) and only pushes a
  prediction up when it is below the cap. Dropping such rows would bias the model toward
  exactly the fast runs, i.e. toward the catastrophic choices (MPS on entangling circuits).
  Uncensored rows are the interval [t, t], where AFT with a normal distribution is a
  least-squares fit in log space.
* **QPU runtime is the prior's modelled QPU time** (overhead + shots × (schedule + repetition
  delay)), **corrected where history has it**: with 20+ QPU runs that recorded ``qpu_s`` (billed
  on a real device, modelled from the transpiled schedule on an emulated one) beside the
  estimate made before the run, a small booster learns log(qpu_s / estimate) (routing, real
  overheads). Emulation wall time on this machine is meaningless for a real device and is
  never learned.
* **Fidelity** of QPUs is the calibration's estimated success probability (``prior.qpu_fidelity``),
  corrected by a learned log-ratio only when the history carries a measured ``fidelity`` column.
* **Memory** is learned on ``log(peak_memory_bytes)`` where measured and never predicted below
  the analytic state size (16·2ⁿ, 16·4ⁿ), which the feasibility filter relies on.
* Models are saved as ``.ubj`` with a ``meta.json`` (schemas, features, checksums): never pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import xgboost as xgb

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.circuits import ENTANGLEMENT_FEATURES, FEATURE_NAMES, FEATURE_SCHEMA_VERSION
from ray_qalloc.costmodel.prior import HeuristicPrior, method_log_sd, qpu_fidelity
from ray_qalloc.placement.model import BackendView, Estimate, JobView

log = logging.getLogger(__name__)

#: Bumped whenever MODEL_FEATURES or the artifact layout change.
MODEL_SCHEMA_VERSION = 1
#: The anchor new fits use. Version 2 gave MPS a per-gate floor and the O(shots·n·χ²) cost of
#: sampling: v1 charged shots·n·2e-7, 20× below measured, so trees learned a large positive
#: residual on low-χ circuits and carried it onto deep ones (predicting 27 s for a 1.3 s run).
#: Version 3 (feature schema 2) takes MPS's χ from the entanglement the circuit reaches
#: (``mps_gate_work_log2``: Σ χ³ over the cuts each entangling gate crosses; ``mps_sample_work_log2``:
#: Σ χ² over the cuts, per shot) instead of the count of gates crossing the worst cut, which
#: called a QFT of |0…0⟩ (a product state, 30 ms) as costly as a random circuit.
ANCHOR_VERSION = 3
ANCHOR_VERSIONS: tuple[int, ...] = (1, 2, 3)

METHODS: tuple[str, ...] = ("statevector", "matrix_product_state", "stabilizer", "density_matrix")
_CAL_KEYS: tuple[str, ...] = ("t1_median_us", "t2_median_us", "readout_error_median",
                              "gate_1q_error_median", "gate_2q_error_median")
BACKEND_FEATURES: tuple[str, ...] = (
    *(f"b_method_{m}" for m in (*METHODS, "other")), "b_is_qpu", "b_gpu", "b_threads",
    *(f"b_cal_{k}" for k in _CAL_KEYS),
)
#: Column order of every model matrix: circuit features, then backend features.
MODEL_FEATURES: tuple[str, ...] = (*FEATURE_NAMES, *BACKEND_FEATURES)
N_CIRCUIT = len(FEATURE_NAMES)

_IDX = {name: i for i, name in enumerate(MODEL_FEATURES)}
_LOG_CLIP = 3.0           # bound on online and fidelity corrections, in log space (×20)
_MIN_MEMORY_ROWS = 20     # fewer measured peaks than this: analytic memory only
_MIN_FIDELITY_ROWS = 20
_MIN_QPU_ROWS = 20        # QPU runs with a recorded qpu_s and estimate before QPU time is learned
_MIN_METHOD_ROWS = 5      # fewer uncensored rows of a method than this: no per-method residual
_MIN_LOG_SD = 0.05        # no estimate of a run is more certain than timing noise

DEFAULT_PARAMS: dict[str, Any] = {
    "max_depth": 6, "eta": 0.1, "min_child_weight": 1.0, "subsample": 0.9,
    "colsample_bytree": 0.9, "lambda": 1.0, "aft_scale": 0.5,
}


class IncompatibleArtifact(ValueError):
    """An artifact written for other features or another layout; it must not be loaded."""


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

def method_category(method: str | None) -> str:
    return method if method in METHODS else "other"


def backend_features(spec: BackendSpec, calibration: Mapping[str, float] | None) -> dict[str, float]:
    """Backend half of a model row. Calibration numbers are NaN for simulators (XGBoost: missing).

    The memory cap is left out on purpose: it is half of the memory free at start-up, so it
    varies run to run on the same machine, is not recorded in the history, and does not change
    the runtime of a run that fits.
    """
    is_qpu = spec.kind == "qpu"
    method = None if is_qpu else method_category(spec.method)
    out = {f"b_method_{m}": float(method == m) for m in (*METHODS, "other")}
    out["b_is_qpu"] = float(is_qpu)
    out["b_gpu"] = float(spec.name.endswith("_gpu") or spec.family == "gpu" or spec.device == "GPU")
    out["b_threads"] = float(max(spec.threads, 1))
    cal = calibration or {}
    for k in _CAL_KEYS:
        value = cal.get(k) if is_qpu else None
        out[f"b_cal_{k}"] = float("nan") if value is None else float(value)
    return out


def backend_vector(spec: BackendSpec, calibration: Mapping[str, float] | None) -> np.ndarray:
    feats = backend_features(spec, calibration)
    return np.array([feats[k] for k in BACKEND_FEATURES], dtype=np.float32)


def circuit_vector(features: Mapping[str, float]) -> np.ndarray:
    """Circuit half of a row; a feature the job lacks is NaN (missing), never a made-up 0."""
    get = features.get
    return np.array([_num(get(n)) for n in FEATURE_NAMES], dtype=np.float32)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


@lru_cache(maxsize=256)
def _spec_of(name: str) -> BackendSpec | None:
    """A history row names its backend; a simulator's spec is rebuilt from the name (cached).

    Only local backends are built: an ``ibm_*`` name must never reach the network from a
    training job, and QPU rows need only their kind (from the name) for the runtime model.
    """
    from ray_qalloc.backends.pools import candidate_spec, parse_candidate
    from ray_qalloc.backends.registry import make_backend

    c = parse_candidate(name)
    if c is not None:   # a pool's variant: method and threads are in its name
        return candidate_spec(c.pool, c.method, c.threads, cores=c.threads, memory_bytes=1 << 30)
    if not name.startswith("aer_"):
        return None
    try:
        return make_backend(name).spec()
    except Exception as exc:  # unknown or unavailable backend: derive what the name says
        log.info("cost model: no spec for backend %r (%s); using its name only", name, exc)
        return None


@lru_cache(maxsize=256)
def _calibration_of(name: str) -> tuple[tuple[str, float], ...]:
    """Calibration summary of an emulated QPU (its snapshot is fixed); () for anything else."""
    from ray_qalloc.backends.registry import make_backend

    if not name.startswith("qpu_"):
        return ()
    try:
        cal = make_backend(name).calibration()
    except Exception:
        return ()
    return tuple(cal.summary().items()) if cal is not None else ()


def _row_spec(name: str, method: str | None, specs: Mapping[str, BackendSpec] | None) -> BackendSpec:
    spec = (specs or {}).get(name) or _spec_of(name)
    if spec is None:
        kind = "qpu" if name.startswith(("qpu_", "ibm_")) else "simulator"
        spec = BackendSpec(name=name, kind=kind, family="unknown", num_qubits=0, method=method)
    if method and spec.kind == "simulator" and spec.method != method:
        spec = spec.copy(method=method)  # the sweep records the method actually used
    return spec


def _column(table: pa.Table, name: str, dtype: Any = np.float64) -> np.ndarray:
    """A column as numpy (nulls → NaN for numbers, None for objects); absent → all missing."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan if dtype is not object else None, dtype=dtype)
    col = table.column(name)
    if dtype is object:
        return np.array(col.to_pylist(), dtype=object)
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=dtype)


def feature_matrix(rows: pa.Table, specs: Mapping[str, BackendSpec] | None = None,
                   calibrations: Mapping[str, Mapping[str, float]] | None = None) -> np.ndarray:
    """Float32 matrix in MODEL_FEATURES order from history rows.

    Circuit features come from the ``f_<name>`` columns; backend features are rebuilt from the
    ``backend`` name (``specs`` mapping, else ``make_backend(name).spec()``, cached) with the
    row's ``method`` column taking precedence, since sweeps record the method actually run.
    """
    n = rows.num_rows
    X = np.empty((n, len(MODEL_FEATURES)), dtype=np.float32)
    for j, name in enumerate(FEATURE_NAMES):
        X[:, j] = _column(rows, f"f_{name}")
    names = _column(rows, "backend", object)
    methods = _column(rows, "method", object)
    cache: dict[tuple[str, str | None], np.ndarray] = {}
    for i in range(n):
        key = (str(names[i]), methods[i])
        vec = cache.get(key)
        if vec is None:
            spec = _row_spec(key[0], key[1], specs)
            cal = None
            if spec.kind == "qpu":
                cal = (calibrations or {}).get(key[0]) or dict(_calibration_of(key[0]))
            vec = cache[key] = backend_vector(spec, cal)
        X[i, N_CIRCUIT:] = vec
    return X


def _anchor_v3(method: str, n: float, size: float, shots: float, par: float, fused: float,
               gate_work_log2: float, sample_work_log2: float) -> float | None:
    """Version 3 (feature schema 2); None where its features are missing (then v2 applies).

    Statevector: a pass over the 2ⁿ amplitudes to set up and sample the state, plus one per
    gate, or per fused block from Aer's fusion threshold (14 qubits) up: measured here, a
    20-qubit GHZ (5 blocks) ran in 0.37 s and a 20-qubit QAOA (62 blocks) in 3.1 s, so gate
    count alone (v2) was wrong by ×10 between them. MPS: χ from the entanglement reached."""
    ne = min(n, 60.0)
    if method == "statevector" and fused == fused:
        passes = fused if n >= 14 else size * 0.12
        return 1.5e-3 + 2.0 ** ne * (5e-8 + passes * 1e-8) / par + shots * 1e-7
    if method == "density_matrix":
        return 2e-3 + 4.0 ** ne * (5e-8 + size * 2.5e-9) / par + shots * 1e-7
    if method == "matrix_product_state" and gate_work_log2 == gate_work_log2 and sample_work_log2 == sample_work_log2:
        return (1.5e-3 + size * 2e-5 + 2.0 ** min(gate_work_log2, 60.0) * 5e-9
                + shots * (n * 3e-6 + 2.0 ** min(sample_work_log2, 60.0) * 3.3e-9))
    return None


def anchor_seconds(method: str, n: float, size: float, shots: float, threads: float, cut: float,
                   gate_work_log2: float = float("nan"), sample_work_log2: float = float("nan"),
                   fused: float = float("nan"), version: int = ANCHOR_VERSION) -> float:
    """The analytic prior's runtime for one simulator row (nan inputs mean "unknown").

    A frozen copy of ``prior.simulator_runtime`` per anchor version: artifacts depend on it,
    so a version's formulas never change once released. Scalar on purpose: for the handful of
    backends of one job, plain floats cost ~1 µs a row where numpy costs ~40 µs a call.
    """
    n = 1.0 if n != n else n
    size = 1.0 if size != size else max(size, 1.0)
    shots = 1024.0 if shots != shots else shots
    par = max(1.0 if threads != threads else threads, 1.0) ** 0.8
    ne = min(n, 60.0)  # beyond any memory: keeps the numbers finite
    if version >= 3:
        v3 = _anchor_v3(method, n, size, shots, par, fused, gate_work_log2, sample_work_log2)
        if v3 is not None:
            return v3
    if method == "statevector":
        return 1.5e-3 + size * 2.0 ** ne * 1.2e-9 / par + shots * 1e-7
    if method == "density_matrix":
        return 2e-3 + size * 4.0 ** ne * 2.5e-9 / par + shots * 1e-7
    if method == "stabilizer":
        return 1e-3 + size * n * 4e-8 + shots * n * n * 2e-9
    if method == "matrix_product_state":
        chi = min(n if cut != cut else cut, n / 2.0, 14.0)
        if version == 1:
            return 2e-3 + size * 2.0 ** (3.0 * chi) * 2e-9 + shots * n * 2e-7
        return 1.5e-3 + size * (2e-5 + 2.0 ** (3.0 * chi) * 1e-9) + shots * n * (3e-6 + 2.0 ** (2.0 * chi) * 3.3e-9)
    return 1e-2 + size * 2.0 ** min(n, 30.0) * 2e-9


_ANCHOR_COLS = [_IDX[c] for c in ("num_qubits", "size", "shots", "b_threads", "cut_max",
                                   "mps_gate_work_log2", "mps_sample_work_log2", "fused_blocks")]
_METHOD_COLS = [(m, _IDX[f"b_method_{m}"]) for m in METHODS]


def anchor_log_runtime(X: np.ndarray, version: int = ANCHOR_VERSION) -> np.ndarray:
    """log(prior seconds) per row of a model matrix: the base every tree adds to."""
    out = np.empty(X.shape[0], dtype=np.float64)
    cols = X[:, _ANCHOR_COLS].astype(np.float64).tolist()
    onehot = X[:, [c for _, c in _METHOD_COLS]].tolist()
    for i, (args, flags) in enumerate(zip(cols, onehot)):
        method = next((m for (m, _), f in zip(_METHOD_COLS, flags) if f > 0.5), "other")
        out[i] = math.log(anchor_seconds(method, *args, version=version))
    return out


def analytic_memory(X: np.ndarray) -> np.ndarray:
    n = np.nan_to_num(X[:, _IDX["num_qubits"]].astype(np.float64), nan=0.0)
    sv = np.where(X[:, _IDX["b_method_statevector"]] > 0.5, 16.0 * 2.0 ** np.minimum(n, 60), 0.0)
    dm = np.where(X[:, _IDX["b_method_density_matrix"]] > 0.5, 16.0 * 4.0 ** np.minimum(n, 60), 0.0)
    return sv + dm


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------

def _is_censored(outcome: Any, flag: Any) -> bool:
    text = str(outcome or "")
    return bool(flag) or text.startswith("censored") or text == "timed_out"


@dataclass
class RuntimeData:
    """Simulator runs ready for AFT: intervals [lower, upper] in seconds, upper=inf if censored."""

    X: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    anchor: np.ndarray
    groups: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def censored(self) -> np.ndarray:
        return np.isinf(self.upper)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    def subset(self, idx: np.ndarray) -> "RuntimeData":
        return RuntimeData(self.X[idx], self.lower[idx], self.upper[idx], self.anchor[idx],
                           self.groups[idx], dict(self.dropped))

    def data_hash(self) -> str:
        """Identifies the exact training data an artifact came from."""
        h = hashlib.sha256()
        for a in (self.X, self.lower, self.upper):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def dmatrix(self) -> xgb.DMatrix:
        d = xgb.DMatrix(self.X, base_margin=self.anchor, feature_names=list(MODEL_FEATURES),
                        missing=np.nan)
        d.set_float_info("label_lower_bound", self.lower)
        d.set_float_info("label_upper_bound", self.upper)
        return d


def _groups(table: pa.Table) -> np.ndarray:
    """CV groups: circuit family for sweeps; for live rows the case or job, so no circuit leaks."""
    out = []
    for fam, case, job in zip(_column(table, "family", object), _column(table, "case_id", object),
                              _column(table, "job_id", object)):
        out.append(f"family:{fam}" if fam else f"case:{case}" if case else f"job:{job}")
    return np.array(out, dtype=object)


def _is_simulator_row(name: str, method: Any, specs: Mapping[str, BackendSpec] | None) -> bool:
    return _row_spec(name, method if isinstance(method, str) else None, specs).kind == "simulator"


def current_feature_rows(table: pa.Table) -> np.ndarray:
    """Rows whose circuit features are of this code's schema.

    A row is older when it says so (``feature_schema_version``) or lacks a feature added since
    (live rows do not record the version; their features are whatever intake computed, so the
    added columns tell). Mixing schemas would teach the trees that "missing" means "cheap".
    """
    n = table.num_rows
    ok = np.ones(n, dtype=bool)
    version = _column(table, "feature_schema_version")
    ok &= np.isnan(version) | (version >= FEATURE_SCHEMA_VERSION)
    for name in ENTANGLEMENT_FEATURES:
        ok &= ~np.isnan(_column(table, f"f_{name}"))
    return ok


def training_families(table: pa.Table) -> list[str]:
    """Families of the rows a model learns from (recorded in its meta.json)."""
    return sorted({str(f) for f in _column(table, "family", object) if f})


def runtime_data(table: pa.Table, specs: Mapping[str, BackendSpec] | None = None) -> RuntimeData:
    """Select and shape the rows the runtime model learns from, counting every row left out.

    The target is the run's own time: its CPU seconds (``cpu_s``) where the history has them
    and the run used one thread, else its wall time. On a shared machine wall time carries the
    load: the same runs measured twice a minute apart agreed within ±20 % in 12 % of cases by
    wall time and in 100 % by CPU time (docs/notes.md). On an idle core the two are equal, which
    is what placement predicts (queueing is added apart). A censored run's bound is the CPU it
    had used when it was stopped, where recorded.
    """
    dropped = {"failed": 0, "qpu": 0, "no_features": 0, "no_time": 0, "old_features": 0}
    wall = _column(table, "wall_s")
    cpu = _column(table, "cpu_s")
    cap = _column(table, "cap_s")
    outcomes = _column(table, "outcome", object)
    flags = _column(table, "censored", object)
    names = _column(table, "backend", object)
    methods = _column(table, "method", object)
    have_feats = np.zeros(table.num_rows, dtype=bool)
    for name in ("num_qubits", "size"):
        have_feats |= ~np.isnan(_column(table, f"f_{name}"))
    current = current_feature_rows(table)
    keep, lower, upper = [], [], []
    for i in range(table.num_rows):
        if not _is_simulator_row(str(names[i]), methods[i], specs):
            dropped["qpu"] += 1
            continue
        if not have_feats[i]:
            dropped["no_features"] += 1
            continue
        if not current[i]:
            dropped["old_features"] += 1
            continue
        own = cpu[i] > 0 and _row_spec(str(names[i]), methods[i], specs).threads <= 1
        if _is_censored(outcomes[i], flags[i]):
            bound = cpu[i] if own else np.nanmax([wall[i], cap[i], 0.0])
            if not bound > 0:
                dropped["no_time"] += 1
                continue
            keep.append(i), lower.append(bound), upper.append(np.inf)
        elif outcomes[i] in ("completed", None) and wall[i] > 0:
            t = cpu[i] if own else wall[i]
            keep.append(i), lower.append(t), upper.append(t)
        elif outcomes[i] == "completed":
            dropped["no_time"] += 1
        else:
            dropped["failed"] += 1
    if dropped["old_features"]:
        log.warning("cost model: %d runs carry circuit features of an older schema than %d and are left "
                    "out of training. To fix: featurise sweep rows again from their cases "
                    "(python -m ray_qalloc.costmodel.measure refeaturize HISTORY NEW_HISTORY), or "
                    "measure again.", dropped["old_features"], FEATURE_SCHEMA_VERSION)
    sub = table.take(pa.array(keep, type=pa.int64()))
    X = feature_matrix(sub, specs)
    return RuntimeData(X, np.array(lower, dtype=np.float64), np.array(upper, dtype=np.float64),
                       anchor_log_runtime(X), _groups(sub), dropped)


# ---------------------------------------------------------------------------------------------
# Fitting and evaluation
# ---------------------------------------------------------------------------------------------

def booster_params(config: Mapping[str, Any], *, nthread: int = 1, seed: int = 0) -> dict[str, Any]:
    """XGBoost parameters for the runtime model from a (tuned) config."""
    c = {**DEFAULT_PARAMS, **config}
    return {
        "objective": "survival:aft", "eval_metric": "aft-nloglik",
        "aft_loss_distribution": "normal", "aft_loss_distribution_scale": float(c["aft_scale"]),
        "max_depth": int(c["max_depth"]), "eta": float(c["eta"]),
        "min_child_weight": float(c["min_child_weight"]), "subsample": float(c["subsample"]),
        "colsample_bytree": float(c["colsample_bytree"]), "lambda": float(c["lambda"]),
        "tree_method": "hist", "base_score": 1.0, "nthread": nthread, "seed": seed,
    }


def runtime_metrics(log_pred: np.ndarray, data: RuntimeData) -> dict[str, float]:
    """Accuracy in the terms placement cares about (uncensored rows; censored: above the cap?)."""
    done = ~data.censored
    out: dict[str, float] = {"n_eval": float(done.sum()), "n_eval_censored": float((~done).sum())}
    if done.any():
        err = log_pred[done] - np.log(data.lower[done])
        ratio = np.exp(err)
        out["rmse_log"] = float(np.sqrt(np.mean(err ** 2)))
        out["within_20pct"] = float(np.mean(np.abs(ratio - 1.0) <= 0.2))
        out["spearman"] = _spearman(log_pred[done], np.log(data.lower[done]))
    if (~done).any():
        out["censored_above_cap"] = float(np.mean(log_pred[~done] >= np.log(data.lower[~done])))
    for m in METHODS:  # per-method spread: what LearnedPredictor gives its estimates as log_sd
        rows = done & (data.X[:, _IDX[f"b_method_{m}"]] > 0.5)
        if rows.sum() >= _MIN_METHOD_ROWS:
            e = log_pred[rows] - np.log(data.lower[rows])
            out[f"rmse_log_{m}"] = float(np.sqrt(np.mean(e ** 2)))
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def auto_threads(n_rows: int) -> int:
    """One thread below ~10k rows: OpenMP sync costs more than it saves there, and on a busy
    2-core machine two spinning threads made a 72-row fit 300x slower (measured)."""
    return 1 if n_rows < 10_000 else 2


def fit_runtime(data: RuntimeData, config: Mapping[str, Any] | None = None, *, num_rounds: int = 200,
                nthread: int | None = None, seed: int = 0) -> xgb.Booster:
    nthread = nthread or auto_threads(data.n_rows)
    return xgb.train(booster_params(config or {}, nthread=nthread, seed=seed), data.dmatrix(),
                     num_boost_round=int(num_rounds))


def fit_memory(table: pa.Table, specs: Mapping[str, BackendSpec] | None = None, *,
               nthread: int | None = None) -> xgb.Booster | None:
    """log(peak bytes) regression on simulator rows that measured it; None when too few."""
    peak = _column(table, "peak_memory_bytes")
    idx = np.flatnonzero(peak > 0)
    names, methods = _column(table, "backend", object), _column(table, "method", object)
    idx = np.array([i for i in idx if _is_simulator_row(str(names[i]), methods[i], specs)], dtype=np.int64)
    if len(idx) < _MIN_MEMORY_ROWS:
        return None
    X = feature_matrix(table.take(pa.array(idx)), specs)
    d = xgb.DMatrix(X, label=np.log(peak[idx]), feature_names=list(MODEL_FEATURES), missing=np.nan)
    params = {"objective": "reg:squarederror", "max_depth": 4, "eta": 0.1, "seed": 0,
              "nthread": nthread or auto_threads(len(idx))}
    return xgb.train(params, d, num_boost_round=100)


def fit_fidelity(table: pa.Table, specs: Mapping[str, BackendSpec] | None = None,
                 calibrations: Mapping[str, Mapping[str, float]] | None = None, *,
                 nthread: int | None = None) -> xgb.Booster | None:
    """log(measured / estimated success probability) on QPU rows, when a ``fidelity`` column exists."""
    if "fidelity" not in table.column_names:
        return None
    fid = _column(table, "fidelity")
    names, methods = _column(table, "backend", object), _column(table, "method", object)
    idx = np.array([i for i in np.flatnonzero(fid > 0)
                    if not _is_simulator_row(str(names[i]), methods[i], specs)], dtype=np.int64)
    if len(idx) < _MIN_FIDELITY_ROWS:
        return None
    rows = table.take(pa.array(idx))
    X = feature_matrix(rows, specs, calibrations)
    prior = np.array([_prior_fidelity(x) for x in X])
    target = np.clip(np.log(fid[idx]) - np.log(np.maximum(prior, 1e-9)), -_LOG_CLIP, _LOG_CLIP)
    d = xgb.DMatrix(X, label=target, feature_names=list(MODEL_FEATURES), missing=np.nan)
    params = {"objective": "reg:squarederror", "max_depth": 4, "eta": 0.1, "seed": 0,
              "nthread": nthread or auto_threads(len(idx))}
    return xgb.train(params, d, num_boost_round=100)


def fit_qpu_time(table: pa.Table, specs: Mapping[str, BackendSpec] | None = None,
                 calibrations: Mapping[str, Mapping[str, float]] | None = None, *,
                 nthread: int | None = None) -> xgb.Booster | None:
    """log(QPU seconds / the estimate made before the run) on QPU rows that recorded both.

    Why a ratio to the recorded estimate: QPU time is modelled from the calibration (overhead +
    shots × (schedule + repetition delay)); what history can teach is where that estimate is
    off (routing that lengthens the schedule, a device's real overhead), so the trees learn the
    correction, not the formula. None with fewer than 20 such rows (the estimate stands)."""
    qpu, pred = _column(table, "qpu_s"), _column(table, "predicted_s")
    names, methods = _column(table, "backend", object), _column(table, "method", object)
    idx = np.array([i for i in np.flatnonzero((qpu > 0) & (pred > 0))
                    if not _is_simulator_row(str(names[i]), methods[i], specs)], dtype=np.int64)
    if len(idx) < _MIN_QPU_ROWS:
        return None
    X = feature_matrix(table.take(pa.array(idx)), specs, calibrations)
    target = np.clip(np.log(qpu[idx] / pred[idx]), -_LOG_CLIP, _LOG_CLIP)
    d = xgb.DMatrix(X, label=target, feature_names=list(MODEL_FEATURES), missing=np.nan)
    params = {"objective": "reg:squarederror", "max_depth": 4, "eta": 0.1, "seed": 0,
              "nthread": nthread or auto_threads(len(idx))}
    return xgb.train(params, d, num_boost_round=100)


@dataclass(frozen=True)
class _JobLike:
    """The three attributes the prior's formulas read, rebuilt from a model row."""

    num_qubits: int
    shots: int
    features: Mapping[str, float]


def _prior_fidelity(x: np.ndarray) -> float:
    feats = {n: float(x[i]) for i, n in enumerate(FEATURE_NAMES) if x[i] == x[i]}
    cal = {k: float(x[_IDX[f"b_cal_{k}"]]) for k in _CAL_KEYS}
    job = _JobLike(int(feats.get("num_qubits", 1)), int(feats.get("shots", 1)), feats)
    return qpu_fidelity(job, cal)  # type: ignore[arg-type]


def fit_cost_model(table: pa.Table, config: Mapping[str, Any] | None = None, *, num_rounds: int = 200,
                   specs: Mapping[str, BackendSpec] | None = None,
                   calibrations: Mapping[str, Mapping[str, float]] | None = None,
                   metrics: Mapping[str, Any] | None = None, nthread: int | None = None,
                   seed: int = 0) -> "CostModel":
    """Fit every part of the model on a whole history (the refit after tuning, or tests)."""
    data = runtime_data(table, specs)
    if data.n_rows == 0:
        raise ValueError(f"no simulator runs with features to train on (left out: {data.dropped}).")
    runtime = fit_runtime(data, config, num_rounds=num_rounds, nthread=nthread, seed=seed)
    train_metrics = runtime_metrics(_margin(runtime, data.X, data.anchor), data)
    methods = sorted({m for m in METHODS if data.X[:, _IDX[f"b_method_{m}"]].any()})
    meta = {
        "params": booster_params(config or {}, nthread=nthread or auto_threads(data.n_rows), seed=seed),
        "num_rounds": int(num_rounds), "anchor_version": ANCHOR_VERSION,
        "n_rows": data.n_rows, "n_censored": int(data.censored.sum()), "dropped": data.dropped,
        "methods": methods, "data_hash": data.data_hash(), "families": training_families(table),
        "metrics": {**{f"train_{k}": v for k, v in train_metrics.items()}, **dict(metrics or {})},
    }
    return CostModel(runtime, fit_memory(table, specs, nthread=nthread),
                     fit_fidelity(table, specs, calibrations, nthread=nthread), meta,
                     fit_qpu_time(table, specs, calibrations, nthread=nthread))


def _margin(booster: xgb.Booster, X: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """anchor + sum of trees. The anchor is added here rather than passed as ``base_margin``:
    ``inplace_predict(base_margin=...)`` builds a proxy DMatrix and costs milliseconds, while
    with ``base_score=1`` (margin log 1 = 0) the trees alone are the residual, in microseconds."""
    trees = booster.inplace_predict(X, predict_type="margin", missing=np.nan)
    return anchor + np.asarray(trees, dtype=np.float64)


def _base_score(booster: xgb.Booster) -> float:
    raw = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
    return float(str(raw).strip("[]").split(",")[0])


# ---------------------------------------------------------------------------------------------
# The model object and its artifact
# ---------------------------------------------------------------------------------------------

_FILES = {"runtime": "runtime.ubj", "memory": "memory.ubj", "fidelity": "fidelity.ubj", "qpu_time": "qpu_time.ubj"}


class CostModel:
    """Runtime booster (+ optional memory and fidelity boosters) and what they were trained on."""

    def __init__(self, runtime: xgb.Booster, memory: xgb.Booster | None = None,
                 fidelity: xgb.Booster | None = None, meta: Mapping[str, Any] | None = None,
                 qpu_time: xgb.Booster | None = None) -> None:
        self.runtime = runtime
        self.memory = memory
        self.fidelity = fidelity
        self.qpu_time = qpu_time
        self.meta: dict[str, Any] = dict(meta or {})
        for booster in (runtime, memory, fidelity, qpu_time):
            if booster is not None:
                booster.set_param({"nthread": 1})  # one row batch: threads only add overhead

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unsaved"))

    @property
    def methods(self) -> frozenset[str]:
        """Simulation methods the training data covered; others fall back to the prior."""
        return frozenset(self.meta.get("methods", METHODS))

    @property
    def anchor_version(self) -> int:
        """The anchor this booster's residuals were learned against (an unsaved fit: the current)."""
        return int(self.meta.get("anchor_version", ANCHOR_VERSION))

    def predict_log_runtime(self, X: np.ndarray) -> np.ndarray:
        return _margin(self.runtime, X, anchor_log_runtime(X, self.anchor_version))

    def predict_runtime(self, X: np.ndarray) -> np.ndarray:
        """Seconds per row, one ``inplace_predict`` call for the whole float32 matrix."""
        return np.exp(self.predict_log_runtime(X))

    def predict_memory(self, X: np.ndarray) -> np.ndarray:
        """Peak bytes, never below the analytic state size."""
        analytic = analytic_memory(X)
        if self.memory is None:
            return analytic
        learned = np.exp(np.asarray(self.memory.inplace_predict(X, missing=np.nan), dtype=np.float64))
        return np.maximum(learned, analytic)

    def qpu_time_log_ratio(self, X: np.ndarray) -> np.ndarray | None:
        """log(measured / estimated QPU seconds) per QPU row; None without QPU history."""
        if self.qpu_time is None:
            return None
        out = np.asarray(self.qpu_time.inplace_predict(X, missing=np.nan), dtype=np.float64)
        return np.clip(out, -_LOG_CLIP, _LOG_CLIP)

    def fidelity_log_ratio(self, X: np.ndarray) -> np.ndarray | None:
        if self.fidelity is None:
            return None
        out = np.asarray(self.fidelity.inplace_predict(X, missing=np.nan), dtype=np.float64)
        return np.clip(out, -_LOG_CLIP, _LOG_CLIP)

    # -- persistence ----------------------------------------------------------------------

    def save(self, directory: Path | str, *, version: str | None = None,
             metrics: Mapping[str, Any] | None = None, data_hash: str | None = None) -> Path:
        """Write ``runtime.ubj`` (+ ``memory.ubj``, ``fidelity.ubj``) and ``meta.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        checksums = {}
        for key, booster in (("runtime", self.runtime), ("memory", self.memory), ("fidelity", self.fidelity),
                             ("qpu_time", self.qpu_time)):
            if booster is not None:
                path = d / _FILES[key]
                booster.save_model(str(path))
                checksums[_FILES[key]] = _sha256(path)
        meta = {
            **self.meta,
            "model_schema_version": MODEL_SCHEMA_VERSION, "feature_schema_version": FEATURE_SCHEMA_VERSION,
            "anchor_version": self.anchor_version, "model_features": list(MODEL_FEATURES),
            "objective": "survival:aft", "xgboost_version": xgb.__version__,
            "created_at": self.meta.get("created_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": version or self.meta.get("version") or "unsaved", "files": checksums,
        }
        if metrics is not None:
            meta["metrics"] = {**meta.get("metrics", {}), **dict(metrics)}
        if data_hash is not None:
            meta["data_hash"] = data_hash
        (d / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default))
        self.meta = meta
        return d

    @classmethod
    def load(cls, directory: Path | str) -> "CostModel":
        d = Path(directory)
        meta = read_meta(d)
        check_compatible(meta)
        boosters: dict[str, xgb.Booster | None] = {}
        for key, filename in _FILES.items():
            path = d / filename
            if filename in meta.get("files", {}):
                if _sha256(path) != meta["files"][filename]:
                    raise IncompatibleArtifact(f"{path}: checksum does not match meta.json (partial copy?)")
                booster = xgb.Booster()
                booster.load_model(str(path))
                boosters[key] = booster
            else:
                boosters[key] = None
        if boosters["runtime"] is None:
            raise IncompatibleArtifact(f"{d}: no runtime.ubj")
        if _base_score(boosters["runtime"]) != 1.0:  # the anchor is added outside XGBoost
            raise IncompatibleArtifact(f"{d}: runtime model has base_score != 1")
        return cls(boosters["runtime"], boosters["memory"], boosters["fidelity"], meta, boosters["qpu_time"])


def read_meta(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise IncompatibleArtifact(f"{directory}: unreadable meta.json ({exc})") from exc


def check_compatible(meta: Mapping[str, Any]) -> None:
    """Raise IncompatibleArtifact unless the artifact matches this code's features and layout."""
    if meta.get("anchor_version") not in ANCHOR_VERSIONS:
        raise IncompatibleArtifact(f"anchor_version is {meta.get('anchor_version')!r}, this code knows "
                                   f"{list(ANCHOR_VERSIONS)}")
    expected = {"model_schema_version": MODEL_SCHEMA_VERSION, "feature_schema_version": FEATURE_SCHEMA_VERSION,
                "model_features": list(MODEL_FEATURES)}
    for key, want in expected.items():
        if meta.get(key) != want:
            got = meta.get(key)
            shown = got if not isinstance(got, list) else f"{len(got)} features"
            raise IncompatibleArtifact(f"{key} is {shown!r}, this code needs "
                                       f"{want if not isinstance(want, list) else f'{len(want)} features'!r}. "
                                       "To fix: train a new artifact with this version (qalloc train) on a "
                                       "history featurised by it (python -m ray_qalloc.costmodel.measure "
                                       "refeaturize, or qalloc measure).")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# The predictor placement calls
# ---------------------------------------------------------------------------------------------

_CACHE_SIZE = 4096   # distinct (circuit, backend set) feature matrices kept


class LearnedPredictor:
    """Predictor protocol over a CostModel, with online correction and bounded exploration.

    * One ``inplace_predict`` for the runtimes of every learnable backend of a job (simulators
      whose method the model was trained on); the rest (QPUs, unknown methods) go to the
      fallback prior in one call.
    * Online correction: ``observe`` keeps a per-backend EWMA of log(actual / predicted),
      each residual and the running bias clipped to ±3 (×20), applied to later predictions.
      Because the residual is taken against the *corrected* prediction, the update
      ``bias += α·residual`` converges to the model's true per-backend bias.
    * Exploration: with probability ``exploration_rate`` (≤ 0.2, seeded RNG) one job's runtime
      on the least-observed learnable backend is divided by ``explore_factor`` (≤ 10), but only
      when that backend's honest prediction is within ``explore_factor`` of the best one and
      under ``explore_max_s``. So an exploratory choice costs at most ``explore_factor``× the
      best predicted runtime, on at most ``exploration_rate`` of jobs. Never for emergency jobs
      or jobs with a deadline. ``observe`` undoes the shrink before learning from the outcome.
    * Spread (``Estimate.log_sd``): per method, the artifact's out-of-fold RMSE of log runtime
      (``metrics.cv_rmse_log_<method>``, written by training since per-method residuals were
      added; train-set RMSE is far too optimistic to use), else the prior's per-method default.
      ``observe`` keeps a per-backend EWMA of squared residuals, started at that spread², and
      a backend's spread is the larger of the two (at most ±3 in log space). Only larger:
      the runs a backend sees are the ones selection sent there, the easy ones for a risky
      method, so their small residuals must not talk its spread down.
    """

    def __init__(self, model: CostModel, *, fallback: Any = None, exploration_rate: float = 0.02,
                 explore_factor: float = 4.0, explore_max_s: float = 60.0, ewma_alpha: float = 0.2,
                 seed: int = 0) -> None:
        self.model = model
        self.fallback = fallback or HeuristicPrior()
        self.exploration_rate = min(max(float(exploration_rate), 0.0), 0.2)
        self.explore_factor = min(max(float(explore_factor), 1.0), 10.0)
        self.explore_max_s = float(explore_max_s)
        self.alpha = min(max(float(ewma_alpha), 0.0), 1.0)
        self.source = f"model:{model.version}"
        self._rng = random.Random(seed)
        self._bias: dict[str, float] = {}
        self._observed: dict[str, int] = {}
        self._explored: OrderedDict[tuple[str, float], float] = OrderedDict()
        self._vectors: dict[str, tuple[BackendSpec, Any, np.ndarray]] = {}
        self._cache: OrderedDict[bytes, tuple[list[float], list[float]]] = OrderedDict()
        self.explorations = 0
        self._method_sd = _artifact_spreads(model.meta)
        self._base_sd: dict[str, float] = {}      # backend -> spread before observations
        self._sq: dict[str, float] = {}           # backend -> EWMA of squared log residuals

    # -- Predictor protocol -----------------------------------------------------------------

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        learn = [b for b in backends if self._learnable(b.spec)]
        rest = [b for b in backends if not self._learnable(b.spec)]
        out: dict[str, Estimate] = {}
        if learn:
            out.update(self._predict_learned(job, learn))
        if rest:
            out.update(self._predict_fallback(job, rest))
        return [out[b.name] for b in backends]

    def observe(self, backend: str, predicted_s: float, actual_s: float) -> None:
        """Learn from one completed run: ``predicted_s`` is the Estimate's runtime_s."""
        if not (predicted_s > 0 and actual_s > 0 and math.isfinite(predicted_s) and math.isfinite(actual_s)):
            return
        honest = predicted_s * self._explored.pop((backend, predicted_s), 1.0)
        residual = _clip(math.log(actual_s / honest), _LOG_CLIP)
        self._bias[backend] = _clip(self._bias.get(backend, 0.0) + self.alpha * residual, _LOG_CLIP)
        self._observed[backend] = self._observed.get(backend, 0) + 1
        base = self._base_sd.get(backend, _OTHER_SD)
        sq = self._sq.get(backend, base * base)
        self._sq[backend] = sq + self.alpha * (residual * residual - sq)

    def spread(self, backend: str, base: float | None = None) -> float:
        """Current log_sd of ``backend``'s runtime predictions (``base``: its method's spread)."""
        if base is None:
            base = self._base_sd.get(backend, _OTHER_SD)
        sq = self._sq.get(backend)
        sd = base if sq is None or sq <= base * base else math.sqrt(sq)
        return min(max(sd, _MIN_LOG_SD), _LOG_CLIP)

    def _spread_of(self, spec: BackendSpec) -> float:
        base = (method_log_sd(None, "qpu") if spec.kind == "qpu"
                else self._method_sd.get(spec.method or "", method_log_sd(spec.method)))
        self._base_sd[spec.name] = base
        return self.spread(spec.name, base)

    def correction(self, backend: str) -> float:
        """Current multiplicative correction of ``backend``'s runtime predictions."""
        return math.exp(self._bias.get(backend, 0.0))

    # -- internals ----------------------------------------------------------------------------

    def _learnable(self, spec: BackendSpec) -> bool:
        return spec.kind == "simulator" and method_category(spec.method) in self.model.methods

    def _backend_vector(self, b: BackendView) -> np.ndarray:
        cached = self._vectors.get(b.name)
        if cached is not None and cached[0] is b.spec and cached[1] is b.calibration:
            return cached[2]
        vec = backend_vector(b.spec, b.calibration)
        self._vectors[b.name] = (b.spec, b.calibration, vec)
        return vec

    def _predict_learned(self, job: JobView, backends: list[BackendView]) -> dict[str, Estimate]:
        X = np.empty((len(backends), len(MODEL_FEATURES)), dtype=np.float32)
        X[:, :N_CIRCUIT] = circuit_vector(job.features)
        X[:, _IDX["num_qubits"]] = job.num_qubits  # the job's own numbers win over stale features
        X[:, _IDX["shots"]] = job.shots
        X[:, _IDX["log2_shots"]] = math.log2(max(job.shots, 1))
        for i, b in enumerate(backends):
            X[i, N_CIRCUIT:] = self._backend_vector(b)
        log_rt, memory = self._raw(X)
        runtime = [math.exp(v + self._bias.get(b.name, 0.0)) for v, b in zip(log_rt, backends)]
        shown = self._explore(job, backends, runtime)
        return {b.name: Estimate(b.name, shown[i], 1.0, b.spec.price.cost(runtime[i], job.shots), memory[i],
                                 self.source if shown[i] == runtime[i] else f"{self.source}:explore",
                                 self._spread_of(b.spec))
                for i, b in enumerate(backends)}

    def _raw(self, X: np.ndarray) -> tuple[list[float], list[float]]:
        """The model's raw outputs, memoised by feature matrix: a circuit submitted again (sweeps,
        parameter scans, retries) costs a dictionary lookup instead of two tree ensembles.
        Online correction and exploration are applied after, so the cache never goes stale."""
        key = X.tobytes()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        out = (self.model.predict_log_runtime(X).tolist(), self.model.predict_memory(X).tolist())
        self._cache[key] = out
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def _predict_fallback(self, job: JobView, backends: list[BackendView]) -> dict[str, Estimate]:
        estimates = self.fallback.predict(job, backends)
        ratios = self._fidelity_ratios(job, backends)
        qpu_ratios = self._qpu_time_ratios(job, backends)
        out = {}
        for i, est in enumerate(estimates):
            runtime = est.runtime_s * math.exp(self._bias.get(est.backend, 0.0))
            fidelity = est.fidelity
            source = est.source
            if qpu_ratios is not None and backends[i].spec.kind == "qpu":
                runtime *= math.exp(qpu_ratios[i])
                source = f"{self.source}:qpu_time"
            if ratios is not None and backends[i].spec.kind == "qpu":
                fidelity = min(max(fidelity * math.exp(ratios[i]), 0.0), 1.0)
                source = f"{self.source}:fidelity"
            self._base_sd[est.backend] = est.log_sd
            out[est.backend] = Estimate(est.backend, runtime, fidelity, est.cost, est.memory_bytes, source,
                                        self.spread(est.backend, est.log_sd))
        return out

    def _qpu_time_ratios(self, job: JobView, backends: list[BackendView]) -> list[float] | None:
        if self.model.qpu_time is None or not any(b.spec.kind == "qpu" for b in backends):
            return None
        X = np.empty((len(backends), len(MODEL_FEATURES)), dtype=np.float32)
        X[:, :N_CIRCUIT] = circuit_vector(job.features)
        for i, b in enumerate(backends):
            X[i, N_CIRCUIT:] = self._backend_vector(b)
        ratios = self.model.qpu_time_log_ratio(X)
        return None if ratios is None else ratios.tolist()

    def _fidelity_ratios(self, job: JobView, backends: list[BackendView]) -> list[float] | None:
        if self.model.fidelity is None or not any(b.spec.kind == "qpu" for b in backends):
            return None
        X = np.empty((len(backends), len(MODEL_FEATURES)), dtype=np.float32)
        X[:, :N_CIRCUIT] = circuit_vector(job.features)
        for i, b in enumerate(backends):
            X[i, N_CIRCUIT:] = self._backend_vector(b)
        ratios = self.model.fidelity_log_ratio(X)
        return None if ratios is None else ratios.tolist()

    def _explore(self, job: JobView, backends: list[BackendView], runtime: list[float]) -> list[float]:
        """Maybe shrink one rarely observed backend's runtime so it gets measured (bounded)."""
        if (self.exploration_rate <= 0.0 or len(backends) < 2 or job.priority == "emergency"
                or job.deadline_s is not None or self._rng.random() >= self.exploration_rate):
            return runtime
        best = min(range(len(runtime)), key=runtime.__getitem__)
        eligible = [i for i in range(len(runtime)) if i != best
                    and runtime[i] <= self.explore_factor * runtime[best] and runtime[i] <= self.explore_max_s]
        if not eligible:
            return runtime
        pick = min(eligible, key=lambda i: (self._observed.get(backends[i].name, 0), runtime[i]))
        shown = list(runtime)
        shown[pick] = runtime[pick] / self.explore_factor
        self._explored[(backends[pick].name, shown[pick])] = self.explore_factor
        while len(self._explored) > 4096:
            self._explored.popitem(last=False)
        self.explorations += 1
        return shown


_OTHER_SD = method_log_sd("other")


def _artifact_spreads(meta: Mapping[str, Any]) -> dict[str, float]:
    """Per-method log_sd from an artifact's out-of-fold residuals; methods it lacks are absent."""
    metrics = meta.get("metrics") or {}
    out: dict[str, float] = {}
    for m in METHODS:
        value = metrics.get(f"cv_rmse_log_{m}") if isinstance(metrics, Mapping) else None
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            out[m] = min(max(float(value), _MIN_LOG_SD), _LOG_CLIP)
    return out


def _clip(x: float, bound: float) -> float:
    return bound if x > bound else -bound if x < -bound else x
