"""Calibration time series: every refresh of every QPU, per qubit and per coupler, with retention.

Why a series and not just the latest calibration: drift detection compares a value with
its own history, trends need a window, and after an incident someone asks "when did q17
start going bad". One sample is one number: ``(device, quantity, qubits, at, value)``,
where ``at`` is the calibration's own ``taken_at`` (not when we looked), so polling an
unchanged calibration twice records nothing new.

Storage follows ``ray_qalloc/store.py``: SQLAlchemy Core only, dialect-neutral (SQLite in
WAL mode embedded, any SQLAlchemy URL for a server), tables created under the same kind
of lock, an append is one transaction. The tables are this module's own metadata, so a
series can share the job store's database or live in a file of its own:

* ``calseries_series``  — one row per (device, quantity, element); samples point at it;
* ``calseries_samples`` — (series_id, at, value), primary key (series_id, at);
* ``calseries_snapshots`` — one row per (device, at): which refreshes exist (latest, staleness).

Retention is by age (``max_age_s``, measured from the device's newest snapshot unless a
``now`` is given) and by count (the newest ``max_samples`` of each series and of each
device's snapshots), applied every ``prune_every`` appends and on ``prune()``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from ray_qalloc.backends.base import Calibration
from ray_qalloc.exceptions import StoreError
from ray_qalloc.monitor.keys import QUANTITIES, QUBIT_GATE_QUANTITIES, QUBIT_QUANTITIES, Quantity, SeriesKey
from ray_qalloc.store import _normalise_url, _sqlite_pragmas

__all__ = ["QUANTITIES", "QUBIT_GATE_QUANTITIES", "QUBIT_QUANTITIES", "Quantity", "SeriesKey", "CalibrationSeries",
           "Retention", "Snapshot", "Trend", "samples_from_calibration", "safe_log"]

LOG_FLOOR = 1e-12  # values are compared in log space; an error of exactly 0 sits here
_SCHEMA_LOCK_KEY = 0x51A11CA1  # "qalloc cal": a different advisory lock from the job store's


def safe_log(values: Any) -> np.ndarray:
    """Natural log with a floor, so zero errors compare (series are judged in log space)."""
    return np.log(np.maximum(np.asarray(values, dtype=float), LOG_FLOOR))


def samples_from_calibration(calibration: Calibration,
                             qubit_gate_errors: Mapping[str, Sequence[float]] | None = None
                             ) -> dict[SeriesKey, float]:
    """The samples one calibration contributes (finite values only).

    ``Calibration`` keeps single-qubit gate errors only as device medians, so per-qubit
    ones come separately from backends that know them (``qubit_gate_errors``: op -> per
    qubit). A coupler's error is the better of its two directions, as layout sees it.
    """
    out: dict[SeriesKey, float] = {}
    for quantity, values in (("t1", calibration.t1_s), ("t2", calibration.t2_s),
                             ("readout_error", calibration.readout_error)):
        for q, v in enumerate(values):
            if v is not None and math.isfinite(v):
                out[SeriesKey(quantity, (q,))] = float(v)
    for op, values in (qubit_gate_errors or {}).items():
        quantity = QUBIT_GATE_QUANTITIES.get(op)
        if quantity is None:
            continue
        for q, v in enumerate(values):
            if v is not None and math.isfinite(v):
                out[SeriesKey(quantity, (q,))] = float(v)
    for (a, b), v in calibration.edge_error.items():
        if v is None or not math.isfinite(v) or a == b:
            continue
        key = SeriesKey("gate_2q_error", (min(a, b), max(a, b)))
        out[key] = min(float(v), out.get(key, math.inf))
    return out


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Snapshot:
    """Every value of one device at one refresh."""

    device: str
    taken_at: float
    values: dict[SeriesKey, float]

    def get(self, quantity: str, *qubits: int) -> float | None:
        return self.values.get(SeriesKey(quantity, tuple(qubits)))

    @property
    def num_qubits(self) -> int:
        return 1 + max((k.qubits[0] for k in self.values if len(k.qubits) == 1), default=-1)


@dataclass(frozen=True)
class Series:
    """One quantity's samples, oldest first."""

    key: SeriesKey
    at: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.at)


@dataclass(frozen=True)
class Trend:
    """Least-squares slope of a series over a window, in its own units and in log space."""

    key: SeriesKey
    n: int
    window_s: float
    slope_per_s: float
    log_slope_per_s: float

    @property
    def change(self) -> float:
        """Relative change the slope makes over the window (1.2: up 20%)."""
        return math.exp(self.log_slope_per_s * self.window_s)

    def arrow(self, threshold: float = 0.10) -> str:
        """↑ / ↓ when the window's relative change passes ``threshold``, else →."""
        if self.change >= 1.0 + threshold:
            return "↑"
        if self.change <= 1.0 / (1.0 + threshold):
            return "↓"
        return "→"


def least_squares_slopes(group: np.ndarray, x: np.ndarray, y: np.ndarray, groups: int) -> np.ndarray:
    """Slope of y on x within each group (NaN where a group has fewer than two distinct x)."""
    n = np.bincount(group, minlength=groups).astype(float)
    sx = np.bincount(group, x, groups)
    sy = np.bincount(group, y, groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = sx / n, sy / n
        dx = x - mx[group]
        sxx = np.bincount(group, dx * dx, groups)
        sxy = np.bincount(group, dx * (y - my[group]), groups)
        return np.where(sxx > 0, sxy / sxx, np.nan)


# ----------------------------------------------------------------------------- schema

metadata = sa.MetaData()

series_table = sa.Table(
    "calseries_series", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("quantity", sa.String(32), nullable=False),
    sa.Column("element", sa.String(32), nullable=False),
    sa.UniqueConstraint("device", "quantity", "element", name="uq_calseries_series"),
)

samples_table = sa.Table(
    "calseries_samples", metadata,
    sa.Column("series_id", sa.Integer, sa.ForeignKey("calseries_series.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("at", sa.Float, primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
)

snapshots_table = sa.Table(
    "calseries_snapshots", metadata,
    sa.Column("device", sa.String(128), primary_key=True),
    sa.Column("at", sa.Float, primary_key=True),
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.Column("samples", sa.Integer, nullable=False),
)


_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s", "numeric": ":{n}"}   # positional styles


def _insert_samples_sql(paramstyle: str) -> str:
    mark = _PLACEHOLDERS[paramstyle]
    marks = ", ".join(mark.format(n=n) for n in (1, 2, 3))
    return f"INSERT INTO {samples_table.name} (series_id, at, value) VALUES ({marks})"


def open_engine(url: str) -> Engine:
    """An engine set up the way the job store sets up its own (WAL, busy timeout, pre-ping)."""
    parsed = _normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        from pathlib import Path

        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(parsed, pool_pre_ping=True, pool_size=4, max_overflow=4, pool_recycle=1800)


def create_schema(engine: Engine) -> None:
    """The tables, under an advisory lock on PostgreSQL; on SQLite a lost race retries."""
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
                metadata.create_all(conn)
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
            if attempt == 2 or engine.dialect.name != "sqlite":
                raise


class Retention(BaseModel):
    """How much history each series keeps."""

    model_config = ConfigDict(frozen=True)

    max_age_s: float | None = Field(30 * 86_400.0, gt=0, description="Drop samples older than this.")
    max_samples: int | None = Field(5_000, gt=0, description="Keep at most this many samples per series.")
    prune_every: int = Field(16, gt=0, description="Prune after this many appends.")


# ----------------------------------------------------------------------------- the series


class CalibrationSeries:
    """Per-device calibration history behind SQLAlchemy Core."""

    def __init__(self, engine: Engine | str, *, retention: Retention | None = None) -> None:
        self._owns_engine = isinstance(engine, str)
        try:
            self.engine = open_engine(engine) if isinstance(engine, str) else engine
            create_schema(self.engine)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot open the calibration series: {exc.__class__.__name__}: {exc}",
                             fix="check the database URL and that its directory is writable.") from None
        self.retention = retention or Retention()
        self._ids: dict[tuple[str, SeriesKey], int] = {}
        self._appends = 0

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    # -- writing -----------------------------------------------------------------------------

    def append(self, device: str, taken_at: float, values: Mapping[SeriesKey, float], *,
               now: float | None = None) -> int:
        """Record one refresh; returns the samples written (0 when ``taken_at`` is already stored)."""
        rows = [(k, float(v)) for k, v in values.items() if v is not None and math.isfinite(v)]
        ids = self._series_ids(device, [k for k, _ in rows])
        try:
            with self.engine.begin() as conn:
                conn.execute(snapshots_table.insert(), {"device": device, "at": float(taken_at),
                                                        "recorded_at": time.time(), "samples": len(rows)})
                if rows:
                    # the driver's executemany with plain tuples: a refresh is hundreds of rows a
                    # second per device, and SQLAlchemy's per-row parameter building was most
                    # of the monitor's CPU (benchmarks.operations)
                    at = float(taken_at)
                    if conn.dialect.paramstyle in _PLACEHOLDERS:
                        conn.exec_driver_sql(_insert_samples_sql(conn.dialect.paramstyle),
                                             [(ids[k], at, v) for k, v in rows])
                    else:
                        conn.execute(samples_table.insert(), [{"series_id": ids[k], "at": at, "value": v}
                                                              for k, v in rows])
        except sa.exc.IntegrityError:
            return 0  # this refresh is stored already (polled twice, or another writer got there first)
        self._appends += 1
        if self._appends % self.retention.prune_every == 0:
            self.prune(now, devices=[device])
        return len(rows)

    def append_calibration(self, device: str, calibration: Calibration,
                           qubit_gate_errors: Mapping[str, Sequence[float]] | None = None, *,
                           now: float | None = None) -> int:
        return self.append(device, calibration.taken_at, samples_from_calibration(calibration, qubit_gate_errors),
                           now=now)

    def _series_ids(self, device: str, keys: Iterable[SeriesKey]) -> dict[SeriesKey, int]:
        keys = list(keys)
        if any((device, k) not in self._ids for k in keys):
            self._load_ids(device)
            missing = [k for k in keys if (device, k) not in self._ids]
            if missing:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(series_table.insert(), [{"device": device, "quantity": k.quantity,
                                                              "element": k.element} for k in missing])
                except sa.exc.IntegrityError:
                    pass  # another writer created some of them: read them back
                self._load_ids(device)
        return {k: self._ids[(device, k)] for k in keys}

    def _load_ids(self, device: str) -> None:
        with self.engine.connect() as conn:
            for row in conn.execute(sa.select(series_table.c.id, series_table.c.quantity, series_table.c.element)
                                    .where(series_table.c.device == device)):
                self._ids[(device, SeriesKey.parse(row.quantity, row.element))] = row.id

    def prune(self, now: float | None = None, *, devices: Iterable[str] | None = None) -> int:
        """Apply retention; returns the samples deleted."""
        r = self.retention
        deleted = 0
        with self.engine.begin() as conn:
            for device in (list(devices) if devices is not None else self._devices(conn)):
                ids = sa.select(series_table.c.id).where(series_table.c.device == device).scalar_subquery()
                if r.max_age_s is not None:
                    ref = now if now is not None else conn.execute(
                        sa.select(sa.func.max(snapshots_table.c.at)).where(snapshots_table.c.device == device)
                    ).scalar()
                    if ref is not None:
                        cutoff = float(ref) - r.max_age_s
                        deleted += conn.execute(samples_table.delete().where(
                            samples_table.c.series_id.in_(ids), samples_table.c.at < cutoff)).rowcount or 0
                        conn.execute(snapshots_table.delete().where(snapshots_table.c.device == device,
                                                                    snapshots_table.c.at < cutoff))
                if r.max_samples is not None:
                    deleted += self._keep_newest(conn, device, r.max_samples)
        return deleted

    @staticmethod
    def _keep_newest(conn: sa.Connection, device: str, keep: int) -> int:
        s = samples_table
        rank = sa.func.row_number().over(partition_by=s.c.series_id, order_by=s.c.at.desc()).label("rank")
        ranked = (sa.select(s.c.series_id, s.c.at, rank)
                  .where(s.c.series_id.in_(sa.select(series_table.c.id).where(series_table.c.device == device)))
                  .subquery())
        doomed = sa.select(ranked.c.series_id, ranked.c.at).where(ranked.c.rank > keep)
        count = conn.execute(s.delete().where(sa.tuple_(s.c.series_id, s.c.at).in_(doomed))).rowcount or 0
        snap = snapshots_table
        srank = sa.func.row_number().over(partition_by=snap.c.device, order_by=snap.c.at.desc()).label("rank")
        sranked = sa.select(snap.c.at, srank).where(snap.c.device == device).subquery()
        conn.execute(snap.delete().where(snap.c.device == device,
                                         snap.c.at.in_(sa.select(sranked.c.at).where(sranked.c.rank > keep))))
        return count

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def _devices(conn: sa.Connection) -> list[str]:
        return list(conn.execute(sa.select(snapshots_table.c.device).distinct()
                                 .order_by(snapshots_table.c.device)).scalars())

    def devices(self) -> list[str]:
        with self.engine.connect() as conn:
            return self._devices(conn)

    def last_taken_at(self, device: str) -> float | None:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(sa.func.max(snapshots_table.c.at))
                                 .where(snapshots_table.c.device == device)).scalar()
        return None if value is None else float(value)

    def snapshot_times(self, device: str, *, since: float | None = None) -> list[float]:
        q = sa.select(snapshots_table.c.at).where(snapshots_table.c.device == device)
        if since is not None:
            q = q.where(snapshots_table.c.at >= since)
        with self.engine.connect() as conn:
            return [float(x) for x in conn.execute(q.order_by(snapshots_table.c.at)).scalars()]

    def _rows(self, device: str, *, since: float | None = None, until: float | None = None,
              at: float | None = None, key: SeriesKey | None = None) -> list[sa.Row]:
        s, ser = samples_table, series_table
        q = (sa.select(s.c.at, ser.c.quantity, ser.c.element, s.c.value)
             .join(ser, ser.c.id == s.c.series_id).where(ser.c.device == device))
        if key is not None:
            q = q.where(ser.c.quantity == key.quantity, ser.c.element == key.element)
        if at is not None:
            q = q.where(s.c.at == at)
        if since is not None:
            q = q.where(s.c.at >= since)
        if until is not None:
            q = q.where(s.c.at <= until)
        with self.engine.connect() as conn:
            return list(conn.execute(q.order_by(s.c.at)))

    def snapshot(self, device: str, taken_at: float) -> Snapshot | None:
        rows = self._rows(device, at=taken_at)
        if not rows:
            return None
        return Snapshot(device, float(taken_at), {SeriesKey.parse(r.quantity, r.element): float(r.value)
                                                  for r in rows})

    def latest(self, device: str) -> Snapshot | None:
        """The device's newest refresh, every value of it."""
        at = self.last_taken_at(device)
        if at is None:
            return None
        return self.snapshot(device, at) or Snapshot(device, at, {})

    def series(self, device: str, key: SeriesKey, *, since: float | None = None,
               until: float | None = None) -> Series:
        rows = self._rows(device, since=since, until=until, key=key)
        return Series(key, np.array([r.at for r in rows], dtype=float), np.array([r.value for r in rows], dtype=float))

    def history(self, device: str, *, since: float | None = None,
                until: float | None = None) -> list[tuple[float, dict[SeriesKey, float]]]:
        """Every refresh in the range, oldest first: what a detector replays after a restart."""
        out: list[tuple[float, dict[SeriesKey, float]]] = []
        for r in self._rows(device, since=since, until=until):
            if not out or out[-1][0] != r.at:
                out.append((float(r.at), {}))
            out[-1][1][SeriesKey.parse(r.quantity, r.element)] = float(r.value)
        return out

    def trends(self, device: str, window_s: float, *, now: float | None = None) -> dict[SeriesKey, Trend]:
        """Slope of every series of the device over ``[now - window_s, now]`` (now: its newest refresh)."""
        ref = now if now is not None else self.last_taken_at(device)
        if ref is None:
            return {}
        rows = self._rows(device, since=ref - window_s, until=ref)
        if not rows:
            return {}
        keys: dict[tuple[str, str], int] = {}
        group = np.array([keys.setdefault((r.quantity, r.element), len(keys)) for r in rows], dtype=np.intp)
        at = np.array([r.at for r in rows], dtype=float) - ref
        values = np.array([r.value for r in rows], dtype=float)
        slope = least_squares_slopes(group, at, values, len(keys))
        log_slope = least_squares_slopes(group, at, safe_log(values), len(keys))
        counts = np.bincount(group, minlength=len(keys))
        out: dict[SeriesKey, Trend] = {}
        for (quantity, element), i in keys.items():
            if counts[i] >= 2 and math.isfinite(slope[i]):
                key = SeriesKey.parse(quantity, element)
                out[key] = Trend(key, int(counts[i]), float(window_s), float(slope[i]), float(log_slope[i]))
        return out

    def trend(self, device: str, key: SeriesKey, window_s: float, *, now: float | None = None) -> Trend | None:
        series = self.series(device, key, since=None if now is None else now - window_s, until=now)
        if len(series) == 0:
            return None
        ref = now if now is not None else float(series.at[-1])
        keep = series.at >= ref - window_s
        at, values = series.at[keep] - ref, series.values[keep]
        if len(at) < 2:
            return None
        group = np.zeros(len(at), dtype=np.intp)
        slope = least_squares_slopes(group, at, values, 1)[0]
        if not math.isfinite(slope):
            return None
        log_slope = least_squares_slopes(group, at, safe_log(values), 1)[0]
        return Trend(key, len(at), float(window_s), float(slope), float(log_slope))
