"""JobStore: the durable record of every accepted job, its transitions and its attempts.

Why it exists: the allocator's queue lives in memory and is rebuilt from here on every
start, so a job written here survives any crash after it. A job's state changes only
through the named transitions of ``jobs.TRANSITIONS``; each one is a conditional UPDATE
(``WHERE state IN sources``) committed together with its transition row, *before* the
side effect it announces (a dispatch, a reply). That conditional update is also what makes
completion exactly-once: a second "complete" for a job finds it no longer RUNNING and
changes nothing.

SQLite in WAL mode is the embedded default; any SQLAlchemy URL (PostgreSQL for clusters)
selects another database. Every statement is SQLAlchemy Core and dialect-neutral; where the
two databases lock differently (PostgreSQL locks rows, SQLite the whole file), the code takes
row locks in one order (jobs before attempts) and treats a deadlock like a lost race, so the
same calls give the same answers on both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ray_qalloc.exceptions import InvalidJobSpec, JobNotFound, StoreError
from ray_qalloc.jobs import TRANSITIONS, Intent, JobState, PreparedJob, Priority

metadata = sa.MetaData()

# Surrogate keys of append-only tables: BIGINT (BIGSERIAL) on PostgreSQL, where a busy cluster
# could pass 2**31 transitions; plain INTEGER on SQLite, where only INTEGER PRIMARY KEY is the
# auto-incrementing rowid.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Serialises schema creation and migration across processes opening one PostgreSQL store at once.
_SCHEMA_LOCK_KEY = 0x51A110C  # "qalloc"

# SQLSTATEs of a transaction PostgreSQL aborted to break a lock cycle: the work may be retried.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure

jobs_table = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.String(16), nullable=False),
    sa.Column("intent", sa.String(16), nullable=False),
    sa.Column("shots", sa.Integer, nullable=False),
    sa.Column("deadline_s", sa.Float),
    sa.Column("fidelity_min", sa.Float),
    sa.Column("num_qubits", sa.Integer, nullable=False),
    sa.Column("num_clbits", sa.Integer, nullable=False),
    sa.Column("ops", sa.Text, nullable=False),            # JSON list
    sa.Column("features", sa.Text, nullable=False),       # JSON object
    sa.Column("source_format", sa.String(16), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("backend", sa.String(128)),                 # current or last backend
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("result", sa.Text),                         # JSON RunResult
    sa.Column("error", sa.Text),
    sa.Column("explanation", sa.Text),                    # JSON of the last placement
    sa.Column("allowed_backends", sa.Text),               # JSON list, or NULL for any
    sa.Column("flag", sa.Text),                           # why it will miss its deadline, if it will
    sa.UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idem"),
)
sa.Index("ix_jobs_state", jobs_table.c.state)
sa.Index("ix_jobs_tenant_created", jobs_table.c.tenant, jobs_table.c.created_at)

transitions_table = sa.Table(
    "transitions", metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("name", sa.String(32), nullable=False),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("stimulus", sa.Text),
)

attempts_table = sa.Table(
    "attempts", metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("backend", sa.String(128), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),   # running|completed|actor_died|timed_out|backend_error|...
    sa.Column("queued_at", sa.Float),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("predicted_s", sa.Float),
    sa.Column("wall_s", sa.Float),
    sa.Column("transpile_s", sa.Float),
    sa.Column("execute_s", sa.Float),
    sa.Column("qpu_s", sa.Float),
    sa.Column("provider_job_id", sa.String(128)),
    sa.Column("error", sa.Text),
    sa.Column("exported", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("job_id", "n", name="uq_attempts_job_n"),
)

@dataclass
class JobRecord:
    """One row of ``jobs``, decoded."""

    id: str
    tenant: str
    idempotency_key: str | None
    state: JobState
    priority: Priority
    intent: Intent
    shots: int
    deadline_s: float | None
    fidelity_min: float | None
    num_qubits: int
    num_clbits: int
    ops: frozenset[str]
    features: dict[str, float]
    source_format: str
    created_at: float
    updated_at: float
    backend: str | None
    attempts: int
    result: dict[str, Any] | None
    error: str | None
    explanation: dict[str, Any] | None
    allowed_backends: tuple[str, ...] | None = None
    flag: str | None = None
    payload: bytes = field(repr=False, default=b"")

    def to_prepared(self) -> PreparedJob:
        return PreparedJob(
            id=self.id, tenant=self.tenant, priority=self.priority, intent=self.intent, shots=self.shots,
            deadline_s=self.deadline_s, fidelity_min=self.fidelity_min,
            idempotency_key=self.idempotency_key, payload=self.payload,
            source_format=self.source_format, num_qubits=self.num_qubits, num_clbits=self.num_clbits,
            ops=self.ops, features=self.features, backends=self.allowed_backends)

    def public(self) -> dict[str, Any]:
        """What a client may see of its job (no circuit bytes)."""
        return {
            "id": self.id, "tenant": self.tenant, "state": self.state.value,
            "priority": self.priority.value, "intent": self.intent.value, "shots": self.shots,
            "deadline_s": self.deadline_s, "fidelity_min": self.fidelity_min,
            "num_qubits": self.num_qubits, "created_at": self.created_at,
            "updated_at": self.updated_at, "backend": self.backend, "attempts": self.attempts,
            "error": self.error, "flag": self.flag,
        }


def _text(value: str, limit: int) -> str:
    """Free text as every database accepts it: PostgreSQL's TEXT refuses NUL characters."""
    return value[:limit].replace("\x00", "\ufffd")


def _is_retryable(exc: sa.exc.DBAPIError) -> bool:
    """A deadlock or serialisation failure: the database rolled back, nothing was written."""
    return getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _row_to_record(row: sa.Row, with_circuit: bool) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"], tenant=m["tenant"], idempotency_key=m["idempotency_key"], state=JobState(m["state"]),
        priority=Priority(m["priority"]), intent=Intent(m["intent"]), shots=m["shots"],
        deadline_s=m["deadline_s"], fidelity_min=m["fidelity_min"], num_qubits=m["num_qubits"],
        num_clbits=m["num_clbits"], ops=frozenset(json.loads(m["ops"])), features=json.loads(m["features"]),
        source_format=m["source_format"], created_at=m["created_at"], updated_at=m["updated_at"],
        backend=m["backend"], attempts=m["attempts"], result=_loads(m["result"]), error=m["error"],
        explanation=_loads(m["explanation"]),
        allowed_backends=tuple(json.loads(m["allowed_backends"])) if m["allowed_backends"] else None,
        flag=m["flag"],
        payload=bytes(m["payload"]) if with_circuit else b"",
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")   # durable across process crashes; fsync at checkpoints
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA cache_size=-65536")       # 64 MiB of pages: indexes of 100k+ jobs stay in memory
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _normalise_url(url: str) -> sa.engine.URL:
    """``postgresql://`` and ``postgres://`` without a driver mean psycopg 3 (the one installed)."""
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str) -> Engine:
    """An engine with the settings each database needs (WAL and busy timeout for SQLite;
    a checked, bounded connection pool for a server)."""
    try:
        parsed = _normalise_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = parsed.database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"check_same_thread": False})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            connect_args: dict[str, Any] = {}
            if parsed.get_backend_name() == "postgresql":  # libpq settings; a URL's own win
                for key, value in (("connect_timeout", 10), ("application_name", "ray-qalloc")):
                    if key not in parsed.query:
                        connect_args[key] = value
            # pre_ping: a server restart or an idle-timeout proxy must not fail the next job;
            # the pool covers the allocator's threads plus a burst, and stays well under the
            # server's max_connections (100 by default) with a few processes per cluster.
            # READ COMMITTED pinned: the conditional UPDATEs rely on it (a server defaulting to
            # REPEATABLE READ would turn a lost race into a serialisation error).
            isolation = {"isolation_level": "READ COMMITTED"} if parsed.get_backend_name() == "postgresql" else {}
            engine = sa.create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=8, pool_timeout=30,
                                      pool_recycle=1800, connect_args=connect_args, **isolation)
        _create_schema(engine)
    except sa.exc.SQLAlchemyError as exc:
        try:
            shown = _normalise_url(url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            shown = url
        raise StoreError(f"cannot open the job store at {shown!r}: {exc.__class__.__name__}: {exc}",
                         fix="check the data directory is writable, or the database URL and server.") from None
    return engine


def _create_schema(engine: Engine) -> None:
    """The job store's tables, then the additive migration (``create_tables``)."""
    create_tables(engine, metadata, migrate=_add_missing_columns)


def create_tables(engine: Engine, *metadatas: sa.MetaData,
                  migrate: Callable[[sa.Connection], None] | None = None) -> None:
    """Tables (and a migration) on the store's database under one lock: processes that open it
    at the same moment (allocator, CLI, API replicas) take turns. Every module with tables of
    its own on this database (alerts, events, the change feed, ...) creates them here.

    PostgreSQL: a transaction-scoped advisory lock (DDL there is transactional). SQLite:
    ``BEGIN IMMEDIATE`` takes the write lock first, waiting ``busy_timeout`` for it. Without
    it Python's sqlite3 runs DDL outside any transaction, so racers that all saw "no table"
    collided on each table and index in turn, and one could lose more times than it retried."""
    for attempt in range(3):
        try:
            with engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
                elif conn.dialect.name == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                for md in metadatas:
                    md.create_all(conn)
                if migrate is not None:
                    migrate(conn)
                conn.commit()
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
            if attempt == 2 or engine.dialect.name != "sqlite":
                raise


def _add_missing_columns(conn: sa.Connection) -> None:
    """Additive migration: a store written by an older version gets the new nullable columns."""
    add_missing_columns(conn, metadata)


def add_missing_columns(conn: sa.Connection, md: sa.MetaData) -> None:
    """``md``'s tables get the nullable columns an older version did not create (pass as
    ``create_tables(..., migrate=lambda c: add_missing_columns(c, md))``)."""
    inspector = sa.inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    for table in md.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for col in table.columns:
            if col.name not in have and col.nullable:
                kind = col.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(col.name)} {kind}")


class JobStore:
    """Durable jobs, transitions and attempts behind SQLAlchemy Core."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    # ---- intake -------------------------------------------------------------------------
    def add_job(self, job: PreparedJob, *, now: float | None = None,
                dispatch_to: tuple[str, float, dict[str, Any]] | None = None) -> tuple[str, bool, int | None]:
        """Store a new job (state QUEUED) and return ``(job_id, created, attempt)``.

        With an idempotency key already used by the same tenant, nothing is written and the
        existing job's id is returned with ``created=False``. ``dispatch_to=(backend,
        predicted_s, explanation)`` also dispatches it in the same transaction (the fast path
        when a backend is free and nobody waits ahead): ``attempt`` is then 1.
        """
        now = time.time() if now is None else now
        row = self._row(job, now)
        transitions = [{"job_id": job.id, "name": "accept", "from_state": None,
                        "to_state": JobState.QUEUED.value, "at": now, "stimulus": "submitted"}]
        if dispatch_to is not None:  # both transitions, one commit: the row is born RUNNING
            backend, predicted_s, explanation = dispatch_to
            row.update(state=JobState.RUNNING.value, backend=backend, attempts=1,
                       explanation=json.dumps(explanation))
            transitions.append({"job_id": job.id, "name": "dispatch", "from_state": JobState.QUEUED.value,
                                "to_state": JobState.RUNNING.value, "at": now, "stimulus": f"placed on {backend}"})
        try:  # the unique (tenant, idempotency_key) constraint decides duplicates, race-free
            with self.engine.begin() as conn:
                conn.execute(jobs_table.insert(), row)
                conn.execute(transitions_table.insert(), transitions)
                if dispatch_to is not None:
                    conn.execute(attempts_table.insert(), {
                        "job_id": job.id, "n": 1, "backend": backend, "outcome": "running", "queued_at": now,
                        "started_at": now, "predicted_s": predicted_s, "exported": False})
        except sa.exc.IntegrityError:
            # Lost a race with the same key: on PostgreSQL this insert waited for the winner's
            # commit, so the winner's row is visible now.
            if job.idempotency_key is not None:
                existing = self.find_by_key(job.tenant, job.idempotency_key)
                if existing is not None:
                    return existing, False, None
            if self._same_job_stored(job):
                # The same job again (ids are random per job): a retried call whose first try
                # committed, e.g. Ray re-sending a submit to a restarted allocator.
                return job.id, False, None
            raise StoreError(f"job id {job.id!r} already exists.", fix="submit with a new id.") from None
        return job.id, True, (1 if dispatch_to is not None else None)

    def _same_job_stored(self, job: PreparedJob) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table.c.tenant, jobs_table.c.payload)
                               .where(jobs_table.c.id == job.id)).first()
        return row is not None and row.tenant == job.tenant and bytes(row.payload) == job.payload

    def add_jobs(self, jobs: list[PreparedJob], *, now: float | None = None) -> list[tuple[str, bool]]:
        """Many jobs (state QUEUED) in one transaction; ``(job_id, created)`` per job, in order.

        Falls back to one transaction per job when the batch hits an idempotency key that is
        already taken, so each job still gets its own answer."""
        now = time.time() if now is None else now
        rows = [self._row(job, now) for job in jobs]
        transitions = [{"job_id": job.id, "name": "accept", "from_state": None, "to_state": JobState.QUEUED.value,
                        "at": now, "stimulus": "submitted"} for job in jobs]
        try:
            with self.engine.begin() as conn:
                if rows:
                    conn.execute(jobs_table.insert(), rows)
                    conn.execute(transitions_table.insert(), transitions)
            return [(job.id, True) for job in jobs]
        except sa.exc.IntegrityError:
            pass
        except sa.exc.OperationalError as exc:
            # PostgreSQL: two batches sharing keys in different orders wait on each other and
            # one is rolled back; one-job transactions cannot form such a cycle.
            if not _is_retryable(exc):
                raise
        return [self.add_job(job, now=now)[:2] for job in jobs]

    def _row(self, job: PreparedJob, now: float) -> dict[str, Any]:
        if job.idempotency_key is not None and "\x00" in job.idempotency_key:
            # PostgreSQL cannot store it; refused on every database so both behave alike.
            raise InvalidJobSpec("the idempotency key contains a NUL character.", field="idempotency_key",
                                 fix="use printable characters only.")
        return {
            "id": job.id, "tenant": job.tenant, "idempotency_key": job.idempotency_key,
            "state": JobState.QUEUED.value, "priority": job.priority.value, "intent": job.intent.value,
            "shots": job.shots, "deadline_s": job.deadline_s, "fidelity_min": job.fidelity_min,
            "num_qubits": job.num_qubits, "num_clbits": job.num_clbits,
            "ops": json.dumps(sorted(job.ops)), "features": json.dumps(dict(job.features)),
            "source_format": job.source_format, "payload": job.payload,
            "created_at": now, "updated_at": now, "attempts": 0,
            "allowed_backends": json.dumps(list(job.backends)) if job.backends else None,
        }

    def find_by_key(self, tenant: str, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(jobs_table.c.id).where(
                jobs_table.c.tenant == tenant, jobs_table.c.idempotency_key == key)).scalar()

    # ---- transitions --------------------------------------------------------------------
    def _transition(self, conn: sa.Connection, job_id: str, name: str, stimulus: str,
                    now: float, **fields: Any) -> JobState | None:
        sources, target = TRANSITIONS[name]
        for _ in range(4):
            if len(sources) == 1:  # one possible source: the conditional UPDATE alone decides
                (current,) = (src.value for src in sources)
            else:  # FOR UPDATE (PostgreSQL; nothing on SQLite): the state cannot move before the UPDATE
                current = conn.execute(sa.select(jobs_table.c.state).where(
                    jobs_table.c.id == job_id).with_for_update()).scalar()
            if current is None or JobState(current) not in sources:
                return None
            res = conn.execute(jobs_table.update().where(
                jobs_table.c.id == job_id, jobs_table.c.state == current).values(
                state=target.value, updated_at=now, **fields))
            if res.rowcount == 1:
                break
            if len(sources) == 1:
                return None
            # Another transition committed between the read and the UPDATE (SQLite reads
            # outside the write lock): look again, now inside it.
        else:
            return None
        conn.execute(transitions_table.insert().values(
            job_id=job_id, name=name, from_state=current, to_state=target.value, at=now,
            stimulus=stimulus))
        return JobState(current)

    def transition(self, job_id: str, name: str, *, stimulus: str = "", **fields: Any) -> bool:
        """Apply one named transition; False (and nothing written) if the job is not in a source state."""
        with self.engine.begin() as conn:
            return self._transition(conn, job_id, name, stimulus, time.time(), **fields) is not None

    def dispatch(self, job_id: str, backend: str, *, predicted_s: float | None, queued_at: float | None,
                 explanation: dict[str, Any] | None = None) -> int | None:
        """QUEUED → RUNNING plus a new attempt row, atomically. Returns the attempt number."""
        now = time.time()
        with self.engine.begin() as conn:
            return self._dispatch(conn, job_id, backend, predicted_s, queued_at, explanation, now)

    def _dispatch(self, conn: sa.Connection, job_id: str, backend: str, predicted_s: float | None,
                  queued_at: float | None, explanation: dict[str, Any] | None, now: float,
                  attempt: int | None = None) -> int | None:
        n = attempt or (conn.execute(sa.select(jobs_table.c.attempts).where(
            jobs_table.c.id == job_id).with_for_update()).scalar() or 0) + 1
        extra: dict[str, Any] = {"backend": backend, "attempts": n}
        if explanation is not None:
            extra["explanation"] = json.dumps(explanation)
        if self._transition(conn, job_id, "dispatch", f"placed on {backend}", now, **extra) is None:
            return None
        conn.execute(attempts_table.insert().values(
            job_id=job_id, n=n, backend=backend, outcome="running", queued_at=queued_at,
            started_at=now, predicted_s=predicted_s, exported=False))
        return n

    def hedge(self, job_id: str, backend: str, *, predicted_s: float | None) -> int | None:
        """A backup attempt beside a running one (RUNNING stays RUNNING); its number, or None when
        the job is no longer running."""
        now = time.time()
        with self.engine.begin() as conn:
            n = (conn.execute(sa.select(jobs_table.c.attempts).where(
                jobs_table.c.id == job_id).with_for_update()).scalar() or 0) + 1
            if self._transition(conn, job_id, "hedge", f"backup attempt {n} on {backend}", now,
                                attempts=n) is None:
                return None
            conn.execute(attempts_table.insert().values(
                job_id=job_id, n=n, backend=backend, outcome="running", queued_at=now, started_at=now,
                predicted_s=predicted_s, exported=False))
        return n

    def close_attempt(self, job_id: str, attempt: int, outcome: str, error: str = "") -> None:
        """End one attempt without moving the job (the other attempt of a hedged job goes on, or
        already decided it)."""
        with self.engine.begin() as conn:
            self._finish_attempt(conn, job_id, attempt, outcome, time.time(), error=error or None)

    def set_provider_job_id(self, job_id: str, attempt: int, provider_job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(attempts_table.update().where(
                attempts_table.c.job_id == job_id, attempts_table.c.n == attempt).values(
                provider_job_id=provider_job_id))

    def complete(self, job_id: str, attempt: int, result: dict[str, Any]) -> bool:
        """Record the result once. False if the job was already completed, failed or cancelled."""
        now = time.time()
        with self.engine.begin() as conn:
            prev = self._transition(conn, job_id, "complete", f"attempt {attempt} on {result.get('backend')}",
                                    now, result=json.dumps(result), backend=result.get("backend"))
            self._finish_attempt(conn, job_id, attempt, "completed" if prev else "superseded", now,
                                 result=result)
        return prev is not None

    def end_attempt(self, job_id: str, attempt: int, outcome: str, error: str, *,
                    then: str = "failover") -> bool:
        """Close a failed attempt and move the job (``failover``/``requeue`` to QUEUED, or ``fail``).

        The job row is written before the attempt row, as in ``complete`` and ``dispatch``: on
        PostgreSQL the other order lets a racing ``complete`` deadlock with it."""
        now = time.time()
        with self.engine.begin() as conn:
            fields = {"error": _text(error, 2000)} if then == "fail" else {}
            moved = self._transition(conn, job_id, then, f"attempt {attempt}: {outcome}", now, **fields)
            self._finish_attempt(conn, job_id, attempt, outcome, now, error=error)
            return moved is not None

    def _finish_attempt(self, conn: sa.Connection, job_id: str, attempt: int, outcome: str, now: float,
                        *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        values: dict[str, Any] = {"outcome": outcome, "finished_at": now}
        if result is not None:
            for key in ("wall_s", "transpile_s", "execute_s", "qpu_s", "provider_job_id"):
                if result.get(key) is not None:
                    values[key] = result[key]
        if error is not None:
            values["error"] = _text(error, 2000)
        conn.execute(attempts_table.update().where(
            attempts_table.c.job_id == job_id, attempts_table.c.n == attempt,
            attempts_table.c.outcome == "running").values(**values))

    def fail(self, job_id: str, error: str) -> bool:
        return self.transition(job_id, "fail", stimulus="gave up", error=_text(error, 2000))

    def cancel(self, job_id: str) -> bool:
        return self.transition(job_id, "cancel", stimulus="cancelled by caller")

    def flag(self, job_id: str, reason: str) -> None:
        """Mark a job that will miss its deadline (not a state change: it still runs)."""
        with self.engine.begin() as conn:
            conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(flag=_text(reason, 500)))

    def save_explanation(self, job_id: str, explanation: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(
                explanation=json.dumps(explanation)))

    # ---- reads --------------------------------------------------------------------------
    def get(self, job_id: str, *, with_circuit: bool = False) -> JobRecord:
        cols = list(jobs_table.c) if with_circuit else [c for c in jobs_table.c if c.name != "payload"]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*cols).where(jobs_table.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}.", field="job_id",
                              fix="check the id (as printed by submit) and the data directory.")
        return _row_to_record(row, with_circuit)

    def active(self) -> list[JobRecord]:
        """Jobs that are not finished, oldest first: what a (re)started allocator must carry on."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_table).where(
                jobs_table.c.state.in_([JobState.QUEUED.value, JobState.RUNNING.value])).order_by(
                jobs_table.c.created_at)).all()
        return [_row_to_record(r, True) for r in rows]

    def list_jobs(self, *, tenant: str | None = None, limit: int = 100, offset: int = 0) -> list[JobRecord]:
        q = sa.select(*[c for c in jobs_table.c if c.name != "payload"]).order_by(
            jobs_table.c.created_at.desc()).limit(limit).offset(offset)
        if tenant is not None:
            q = q.where(jobs_table.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [_row_to_record(r, False) for r in conn.execute(q).all()]

    def transitions(self, job_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(transitions_table).where(
                transitions_table.c.job_id == job_id).order_by(transitions_table.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(attempts_table).where(
                attempts_table.c.job_id == job_id).order_by(attempts_table.c.n)).all()
        return [dict(r._mapping) for r in rows]


    def attempt_history(self, job_id: str) -> list[dict[str, Any]]:
        """The failover history as clients see it: one entry per attempt, in order."""
        return [{"attempt": a["n"], "backend": a["backend"], "outcome": a["outcome"],
                 "started_at": a["started_at"], "finished_at": a["finished_at"], "error": a["error"]}
                for a in self.attempts(job_id)]
    def attempt(self, job_id: str, n: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(attempts_table).where(
                attempts_table.c.job_id == job_id, attempts_table.c.n == n)).first()
        return None if row is None else dict(row._mapping)

    def counts_by_state(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_table.c.state, sa.func.count()).group_by(jobs_table.c.state)).all()
        return {s: n for s, n in rows}

    # ---- run history export ---------------------------------------------------------------
    def unexported_runs(self, limit: int = 10_000) -> list[dict[str, Any]]:
        """Finished attempts joined with their job's features, not yet in the Parquet history."""
        a, j = attempts_table, jobs_table
        q = (sa.select(a.c.id, a.c.job_id, a.c.n, a.c.backend, a.c.outcome, a.c.queued_at, a.c.started_at,
                       a.c.finished_at, a.c.predicted_s, a.c.wall_s, a.c.transpile_s, a.c.execute_s,
                       a.c.qpu_s, a.c.error, j.c.features, j.c.shots, j.c.num_qubits, j.c.tenant,
                       j.c.priority, j.c.intent)
             .join(j, j.c.id == a.c.job_id)
             .where(a.c.exported.is_(False), a.c.outcome != "running")
             .order_by(a.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q).all()]

    def mark_exported(self, attempt_ids: Iterable[int]) -> None:
        ids = list(attempt_ids)
        if not ids:
            return
        with self.engine.begin() as conn:
            for i in range(0, len(ids), 500):
                conn.execute(attempts_table.update().where(attempts_table.c.id.in_(ids[i:i + 500])).values(
                    exported=True))

