"""The run history: one Parquet row per finished attempt, the cost model's training data.

Why Parquet parts exported from the store: the store is the durable record (a completed
attempt is committed with its timings in the same transaction as the result), and the
history is written from it in batches, so a crash between the two loses nothing: unexported
attempts are exported at the next flush. Each flush writes one new part file atomically
(temporary name, then rename); readers see whole parts only. ``attempt_id`` is unique
across parts, so a part written twice after a crash is removed by ``read`` de-duplication.
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
        "method": rec.get("method"),
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
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.directory / f".{name}.tmp"
        pq.write_table(table, tmp)
        final = self.directory / name
        os.replace(tmp, final)
        return final

    def read(self) -> pa.Table:
        """All rows, one per attempt id (parts may differ in feature columns)."""
        parts = sorted(self.directory.glob("part-*.parquet")) if self.directory.exists() else []
        if not parts:
            return pa.table({name: pa.array([], type=t) for name, t in _BASE_FIELDS})
        table = ds.dataset([str(p) for p in parts], format="parquet",
                           schema=_unified_schema(parts)).to_table()
        ids = table.column("attempt_id").to_pylist()
        seen: set[Any] = set()
        keep = []
        for i, a in enumerate(ids):
            if a is None or a not in seen:
                keep.append(i)
                seen.add(a)
        return table.take(keep) if len(keep) != len(ids) else table

    def __len__(self) -> int:
        return self.read().num_rows


def _unified_schema(parts: list[Path]) -> pa.Schema:
    return pa.unify_schemas([pq.read_schema(p) for p in parts])
