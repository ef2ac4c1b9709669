"""Measuring a QPU run's fidelity after it completed, off the allocator's event loop.

Why here and why off the loop: the allocator's loop places and completes every job; an exact
ideal distribution costs tens to hundreds of milliseconds of Python (``costmodel.fidelity``:
statevector of ≤ 12 qubits), which must not sit between two dispatch passes. So completion
only *submits* (``FidelityMeter.submit``: a few checks and an uncorrected estimate, µs), and
the measurement runs as a Ray task with ``num_cpus=0`` (in another process, so it takes no
slot from the simulator pools and no GIL from the loop; a thread when Ray is not running, as
in unit tests). At most ``max_in_flight`` run at once and ``max_pending`` wait; beyond that a
measurement is dropped and counted, never queued without bound.

What is recorded: one row per measured attempt in ``qalloc_fidelity`` (the store, committed
before any in-memory state changes), with the measured Hellinger fidelity, the calibration
estimate it is compared with (the predictor's uncorrected fidelity for the job on the device
as calibrated when it completed), the estimate placement showed, the device's own reported
ESP where it gives one, and the calibration stamp. Then the device's correction
(``costmodel.fidelity_correction``) takes the sample, and a predictor that learns fidelity
residuals (the bandit's ``observe_fidelity``) is told. The history flush exports the rows as
Parquet parts beside the runs (``RunHistory.append_fidelity``), and ``RunHistory.read`` joins
them onto their attempts (columns ``fidelity``, ``fidelity_method``, ...). A restarted
allocator rebuilds the corrections from the table (``load``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.costmodel.fidelity import EXACT_MAX_QUBITS, Measurement, esp_equivalent, measure_payload
from ray_qalloc.costmodel.fidelity_correction import FidelitySample, corrections_of

log = logging.getLogger("ray_qalloc.fidelity")

metadata = sa.MetaData()
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

fidelity_table = sa.Table(
    "qalloc_fidelity", metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("n", sa.Integer, nullable=False),                  # the attempt
    sa.Column("backend", sa.String(128), nullable=False, index=True),
    sa.Column("fidelity", sa.Float, nullable=False),             # measured (Hellinger vs exact ideal)
    sa.Column("method", sa.String(32), nullable=False),
    sa.Column("calibration_estimate", sa.Float),                 # uncorrected estimate, at completion
    sa.Column("estimate", sa.Float),                             # what placement showed
    sa.Column("device_esp", sa.Float),                           # the device's own ESP, if it reports one
    sa.Column("calibration_at", sa.Float),
    sa.Column("outcomes", sa.Float),                             # effective ideal outcomes
    sa.Column("esp_equivalent", sa.Float),                       # the success probability it implies
    sa.Column("shots", sa.Integer),
    sa.Column("num_qubits", sa.Integer),
    sa.Column("measure_s", sa.Float),
    sa.Column("measured_at", sa.Float, nullable=False),
    sa.Column("exported", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("job_id", "n", name="uq_qalloc_fidelity_job_n"),
)

#: Measurements running at once / waiting, before new ones are dropped.
MAX_IN_FLIGHT = 2
MAX_PENDING = 256
#: Samples per device read back at start (the corrections keep fewer).
LOAD_PER_BACKEND = 256


def _measure_remote(payload: bytes, counts: Mapping[str, int], shots: int) -> dict[str, Any]:
    return measure_payload(payload, counts, shots).to_dict()


_REMOTE: Any = None


def _remote() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(num_cpus=0, max_retries=1)(_measure_remote)
    return _REMOTE


class FidelityMeter:
    """Measures completed QPU runs' fidelity off the loop, records it, feeds the corrections."""

    def __init__(self, engine: Engine, db: Callable[..., Any], predictor: Callable[[], Any], *,
                 max_in_flight: int = MAX_IN_FLIGHT, max_pending: int = MAX_PENDING,
                 offload: str = "auto") -> None:
        from ray_qalloc.store import add_missing_columns, create_tables

        create_tables(engine, metadata, migrate=lambda conn: add_missing_columns(conn, metadata))
        self.engine = engine
        self.db = db                       # runs a function on the store thread (Dispatcher.db)
        self.predictor = predictor         # the allocator's current predictor stack
        self.max_pending = int(max_pending)
        self.offload = offload             # auto | ray | thread
        self._sem: asyncio.Semaphore | None = None
        self._max_in_flight = max(1, int(max_in_flight))
        self._waiting = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._thread: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.stats: collections.Counter[str] = collections.Counter()

    # ---- on the loop, at completion -------------------------------------------------------
    def submit(self, r: Any, result: Mapping[str, Any], member: Any) -> bool:
        """Queue the measurement of a completed QPU run; False when there is nothing to measure."""
        job = r.job
        counts = result.get("counts") or {}
        if job.num_qubits > EXACT_MAX_QUBITS:
            self.stats["skipped:wide"] += 1
            return False
        if not counts:
            self.stats["skipped:no_counts"] += 1
            return False
        if self._waiting >= self.max_pending:
            self.stats["dropped"] += 1
            return False
        try:
            view = member.view()
            calib = self._calibration_estimate(r.view, view)
        except Exception:  # noqa: BLE001 - an estimate that fails measures nothing; the run is done
            log.exception("fidelity: no calibration estimate for %s on %s", job.id, r.backend)
            self.stats["skipped:no_estimate"] += 1
            return False
        est = r.plan.estimates.get(r.backend) if r.plan is not None else None
        meta = result.get("metadata") or {}
        row = {"job_id": job.id, "n": int(r.attempt), "backend": r.backend, "calibration_estimate": calib,
               "estimate": None if est is None else float(est.fidelity),
               "device_esp": _float(meta.get("esp")), "calibration_at": member.calibration_taken_at,
               "shots": int(result.get("shots") or job.shots), "num_qubits": int(job.num_qubits)}
        self._waiting += 1
        task = asyncio.get_running_loop().create_task(
            self._measure(row, job.payload, dict(counts), r.backend, r.predicted_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _calibration_estimate(self, job_view: Any, backend_view: Any) -> float:
        p = self.predictor()
        fn = getattr(p, "calibration_fidelity", None)
        if fn is not None:
            return float(fn(job_view, backend_view))
        return float(p.predict(job_view, [backend_view])[0].fidelity)

    async def _measure(self, row: dict[str, Any], payload: bytes, counts: dict[str, int], backend: str,
                       predicted_s: float) -> None:
        try:
            if self._sem is None:
                self._sem = asyncio.Semaphore(self._max_in_flight)
            async with self._sem:
                self._waiting -= 1
                m = await self._run(payload, counts, row["shots"])
            if m.fidelity is None:
                self.stats[f"skipped:{(m.reason or 'unknown').split(':')[0]}"] += 1
                return
            profile = tuple(m.profile) if m.profile else None
            row.update(fidelity=m.fidelity, method=m.method, outcomes=m.outcomes, measure_s=m.seconds,
                       esp_equivalent=esp_equivalent(m.fidelity, profile) if profile else None,
                       measured_at=time.time(), exported=False)
            if not await self.db(self.record, row):
                return
            self.stats["measured"] += 1
            self.learn(row, predicted_s)
        except Exception:  # noqa: BLE001 - a failed measurement never touches the job
            self.stats["failed"] += 1
            log.exception("fidelity measurement of %s on %s failed", row.get("job_id"), backend)

    async def _run(self, payload: bytes, counts: dict[str, int], shots: int) -> Measurement:
        if self._use_ray():
            raw = await _remote().remote(payload, counts, shots)
            return Measurement(**raw)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="qalloc-fidelity")
        return await asyncio.get_running_loop().run_in_executor(self._thread, measure_payload, payload, counts,
                                                                shots)

    def _use_ray(self) -> bool:
        if self.offload != "auto":
            return self.offload == "ray"
        import ray

        return ray.is_initialized()

    def learn(self, row: Mapping[str, Any], predicted_s: float | None = None) -> None:
        """A recorded measurement: into the device's correction, and to a predictor that learns
        fidelity residuals itself (the bandit)."""
        p = self.predictor()
        corr = corrections_of(p)
        if corr is not None and row.get("calibration_estimate"):
            corr.add(_sample(row))
        observe = getattr(p, "observe_fidelity", None)
        if observe is not None and predicted_s is not None:
            observe(row["backend"], predicted_s, float(row["fidelity"]))

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the measurements in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    # ---- on the store thread --------------------------------------------------------------
    def record(self, row: Mapping[str, Any]) -> bool:
        """One measured attempt (once: a second measurement of the attempt changes nothing)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(fidelity_table.insert().values(**row))
            return True
        except sa.exc.IntegrityError:
            return False

    def rows(self, backend: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        t = fidelity_table
        q = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        if backend is not None:
            q = q.where(t.c.backend == backend)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in reversed(conn.execute(q).all())]

    def load(self) -> int:
        """Rebuild the corrections from the newest rows of each device (at start)."""
        corr = corrections_of(self.predictor())
        if corr is None:
            return 0
        t = fidelity_table
        with self.engine.connect() as conn:
            names = [r[0] for r in conn.execute(sa.select(t.c.backend).distinct()).all()]
        n = 0
        for name in names:
            n += corr.load(_sample(r) for r in self.rows(name, LOAD_PER_BACKEND) if r["calibration_estimate"])
        return n

    def export(self, history: Any, limit: int = 10_000) -> int:
        """Unexported rows into the Parquet history (``RunHistory.append_fidelity``)."""
        t = fidelity_table
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                sa.select(t).where(t.c.exported.is_(False)).order_by(t.c.id).limit(limit)).all()]
        if not rows:
            return 0
        history.append_fidelity(rows)
        ids = [r["id"] for r in rows]
        with self.engine.begin() as conn:
            for i in range(0, len(ids), 500):
                conn.execute(t.update().where(t.c.id.in_(ids[i:i + 500])).values(exported=True))
        return len(rows)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)


def _sample(row: Mapping[str, Any]) -> FidelitySample:
    """The correction learns in success-probability space: a measurement's ESP equivalent (what
    the device's noise was, with the circuit's output shape taken out), the raw Hellinger
    fidelity for rows recorded before it was kept."""
    measured = row.get("esp_equivalent")
    measured = row["fidelity"] if measured is None else measured
    return FidelitySample(row["backend"], float(row["calibration_estimate"]), float(measured),
                          float(row.get("measured_at") or 0.0), row.get("calibration_at"))


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


__all__ = ["FidelityMeter", "fidelity_table", "MAX_IN_FLIGHT", "MAX_PENDING"]
