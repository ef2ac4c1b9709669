"""The run history: one Parquet row per finished attempt, the cost model's training data.

Why Parquet parts exported from the store: the store is the durable record (a completed
attempt is committed with its timings in the same transaction as the result), and the
history is written from it in batches, so a crash between the two loses nothing: unexported
attempts are exported at the next flush. Each flush writes one new part file atomically
(temporary name, then rename); readers see whole parts only. ``attempt_id`` is unique
across parts, so a part written twice after a crash is removed by ``read`` de-duplication.

Measured fidelity arrives after its attempt (it is computed off the allocator's loop,
``ray_qalloc.fidelity_meter``), possibly after the attempt was exported, so it is written as
parts of its own (``fidelity-*.parquet``, one row per measured attempt) and ``read`` joins them
onto their attempts by (job, attempt): columns ``fidelity`` (the Hellinger fidelity measured
against the exact ideal distribution; null where nothing was measured), ``fidelity_method``,
``fidelity_calibration`` (the uncorrected calibration estimate it was compared with),
``fidelity_estimate`` (what placement showed), ``fidelity_device_esp`` and
``fidelity_calibration_at``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

HISTORY_SCHEMA_VERSION = 1

_BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("attempt_id", pa.int64()), ("job_id", pa.string()), ("attempt", pa.int32()),
    ("backend", pa.string()), ("outcome", pa.string()), ("success", pa.bool_()),
    ("censored", pa.bool_()),
    ("queued_at", pa.float64()), ("started_at", pa.float64()), ("finished_at", pa.float64()),
    ("queue_s", pa.float64()), ("predicted_s", pa.float64()), ("wall_s", pa.float64()),
    ("transpile_s", pa.float64()), ("execute_s", pa.float64()), ("qpu_s", pa.float64()),
    ("shots", pa.int64()), ("num_qubits", pa.int32()), ("tenant", pa.string()),
    ("priority", pa.string()), ("intent", pa.string()), ("source", pa.string()),
    ("error", pa.string()), ("features_json", pa.string()), ("schema_version", pa.int32()),
    # sweep-only context (None for live runs)
    ("case_id", pa.string()), ("family", pa.string()), ("level", pa.string()),
    ("peak_memory_bytes", pa.float64()), ("cap_s", pa.float64()), ("method", pa.string()),
    # measurement context: 1-min load average, runs of which the fastest was kept, and the
    # circuit-feature schema the f_* columns were computed with (None: before it was recorded)
    ("load_avg", pa.float64()), ("repeats", pa.int32()), ("feature_schema_version", pa.int32()),
    ("cpu_s", pa.float64()),
]


#: Columns ``read`` joins onto the attempts from the fidelity parts: (column, field of a part).
FIDELITY_FIELDS: list[tuple[str, str, pa.DataType]] = [
    ("fidelity", "fidelity", pa.float64()), ("fidelity_method", "method", pa.string()),
    ("fidelity_calibration", "calibration_estimate", pa.float64()), ("fidelity_estimate", "estimate", pa.float64()),
    ("fidelity_device_esp", "device_esp", pa.float64()), ("fidelity_calibration_at", "calibration_at", pa.float64()),
]
_FIDELITY_PART_FIELDS: list[tuple[str, pa.DataType]] = [
    ("job_id", pa.string()), ("attempt", pa.int32()), ("backend", pa.string()),
    *((part, t) for _, part, t in FIDELITY_FIELDS),
    ("outcomes", pa.float64()), ("shots", pa.int64()), ("num_qubits", pa.int32()),
    ("measure_s", pa.float64()), ("measured_at", pa.float64()),
]


def _row(rec: dict[str, Any], source: str) -> dict[str, Any]:
    features = rec.get("features") or {}
    if isinstance(features, str):
        features = json.loads(features)
    queued, started = rec.get("queued_at"), rec.get("started_at")
    outcome = rec.get("outcome", "completed")
    out = {
        "attempt_id": rec.get("id", rec.get("attempt_id")), "job_id": rec.get("job_id"),
        "attempt": rec.get("n", rec.get("attempt", 1)), "backend": rec["backend"], "outcome": outcome,
        "success": outcome == "completed", "censored": bool(rec.get("censored", outcome == "timed_out" or outcome.startswith("censored"))),
        "queued_at": queued, "started_at": started, "finished_at": rec.get("finished_at"),
        "queue_s": (started - queued) if (queued is not None and started is not None) else None,
        "predicted_s": rec.get("predicted_s"), "wall_s": rec.get("wall_s"),
        "transpile_s": rec.get("transpile_s"), "execute_s": rec.get("execute_s"), "qpu_s": rec.get("qpu_s"),
        "shots": rec.get("shots"), "num_qubits": rec.get("num_qubits"), "tenant": rec.get("tenant"),
        "priority": rec.get("priority"), "intent": rec.get("intent"), "source": source,
        "error": rec.get("error"), "features_json": json.dumps(features, sort_keys=True),
        "schema_version": HISTORY_SCHEMA_VERSION,
        "case_id": rec.get("case_id"), "family": rec.get("family"), "level": rec.get("level"),
        "peak_memory_bytes": rec.get("peak_memory_bytes"), "cap_s": rec.get("cap_s"),
        "method": rec.get("method"), "load_avg": rec.get("load_avg"), "repeats": rec.get("repeats"),
        "feature_schema_version": rec.get("feature_schema_version"), "cpu_s": rec.get("cpu_s"),
    }
    for key, value in features.items():
        out[f"f_{key}"] = None if value is None else float(value)
    return out


class RunHistory:
    """Append-only Parquet dataset under one directory."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def append(self, records: Iterable[dict[str, Any]], *, source: str = "live") -> Path | None:
        rows = [_row(r, source) for r in records]
        if not rows:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        fields = list(_BASE_FIELDS)
        feature_cols = sorted({k for r in rows for k in r if k.startswith("f_")})
        fields += [(c, pa.float64()) for c in feature_cols]
        schema = pa.schema(fields)
        table = pa.Table.from_pylist([{name: r.get(name) for name, _ in fields} for r in rows], schema=schema)
        return self._write("part", table)

    def _write(self, prefix: str, table: pa.Table) -> Path:
        name = f"{prefix}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.directory / f".{name}.tmp"
        pq.write_table(table, tmp)
        final = self.directory / name
        os.replace(tmp, final)
        return final

    def append_fidelity(self, records: Iterable[dict[str, Any]]) -> Path | None:
        """Measured fidelities (``fidelity_meter`` rows: job_id, n, backend, fidelity, ...)."""
        rows = [{**r, "attempt": r.get("n", r.get("attempt"))} for r in records]
        if not rows:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        schema = pa.schema(_FIDELITY_PART_FIELDS)
        table = pa.Table.from_pylist([{name: r.get(name) for name, _ in _FIDELITY_PART_FIELDS} for r in rows],
                                     schema=schema)
        return self._write("fidelity", table)

    def read_fidelity(self) -> pa.Table:
        """The measured fidelities alone, one row per (job, attempt), newest part winning."""
        parts = sorted(self.directory.glob("fidelity-*.parquet")) if self.directory.exists() else []
        if not parts:
            return pa.table({name: pa.array([], type=t) for name, t in _FIDELITY_PART_FIELDS})
        table = ds.dataset([str(p) for p in parts], format="parquet",
                           schema=pa.schema(_FIDELITY_PART_FIELDS)).to_table()
        last: dict[tuple[Any, Any], int] = {}
        for i, key in enumerate(zip(table.column("job_id").to_pylist(), table.column("attempt").to_pylist())):
            last[key] = i
        return table.take(sorted(last.values())) if len(last) != table.num_rows else table

    def read(self) -> pa.Table:
        """All rows, one per attempt id (parts may differ in feature columns), with the
        measured fidelity columns joined on where any exists (``FIDELITY_FIELDS``; null where none)."""
        parts = sorted(self.directory.glob("part-*.parquet")) if self.directory.exists() else []
        if not parts:
            table = pa.table({name: pa.array([], type=t) for name, t in _BASE_FIELDS})
            return _with_fidelity(table, self.read_fidelity())
        table = ds.dataset([str(p) for p in parts], format="parquet",
                           schema=_unified_schema(parts)).to_table()
        ids = table.column("attempt_id").to_pylist()
        seen: set[Any] = set()
        keep = []
        for i, a in enumerate(ids):
            if a is None or a not in seen:
                keep.append(i)
                seen.add(a)
        table = table.take(keep) if len(keep) != len(ids) else table
        return _with_fidelity(table, self.read_fidelity())

    def __len__(self) -> int:
        return self.read().num_rows


def _with_fidelity(table: pa.Table, fidelity: pa.Table) -> pa.Table:
    """``table`` with the FIDELITY_FIELDS columns, from ``fidelity`` rows of the same (job, attempt);
    unchanged where nothing was ever measured (a history without measurements reads as before)."""
    if not fidelity.num_rows:
        return table
    table = table.drop_columns([c for c, _, _ in FIDELITY_FIELDS if c in table.column_names])
    index: dict[tuple[Any, Any], int] = {}
    if fidelity.num_rows:
        for i, key in enumerate(zip(fidelity.column("job_id").to_pylist(), fidelity.column("attempt").to_pylist())):
            index[key] = i
    at = [index.get(key) for key in zip(table.column("job_id").to_pylist(), table.column("attempt").to_pylist())] \
        if index else [None] * table.num_rows
    for column, part, dtype in FIDELITY_FIELDS:
        values = fidelity.column(part).to_pylist() if index else []
        table = table.append_column(pa.field(column, dtype), pa.array(
            [None if i is None else values[i] for i in at], type=dtype))
    return table


def _unified_schema(parts: list[Path]) -> pa.Schema:
    return pa.unify_schemas([pq.read_schema(p) for p in parts])
