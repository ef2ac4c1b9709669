"""Tenants: bearer tokens (stored only as hashes) and per-tenant quotas.

Why here and not in the HTTP layer: the CLI creates tokens without a server, and the same
checks must hold whichever Serve replica answers. Everything lives in the job store's
database (SQLite or PostgreSQL), in tables of its own.

A token reads ``qat_<id>_<secret>``. ``id`` finds the row; only SHA-256 of the secret is
stored, and it is compared with ``hmac.compare_digest`` (constant time). The secret has 256
bits of entropy, so a plain hash suffices (no password stretching needed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ray_qalloc.exceptions import Forbidden, QAllocError, QuotaExceeded, Unauthorized
from ray_qalloc.jobs import Priority
from ray_qalloc.store import attempts_table, jobs_table, make_engine
from ray_qalloc.wire import JsonFloat, JsonInt

TOKEN_PREFIX = "qat"
#: How long ``admit`` trusts a tenant's usage read from the store (plus what it admitted since).
USAGE_TTL_S = 2.0
_TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"

meta = sa.MetaData()
tenants_table = sa.Table(
    "tenants", meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("quota", sa.Text, nullable=False),          # JSON of Quota
    sa.Column("created_at", sa.Float, nullable=False),
)
tokens_table = sa.Table(
    "tokens", meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Column("scopes", sa.Text),                           # comma-separated (SCOPES); NULL: none
)

#: What a non-admin token may be granted beyond its tenant's own jobs: ``soar`` — a SOAR
#: platform's token that takes threat actions (boost, reserve, pause, resume) and nothing else
#: an admin can do.
SCOPES: frozenset[str] = frozenset({"soar"})


class Quota(BaseModel):
    """What one tenant may use. Defaults are generous for everything but ``emergency``,
    which is granted per tenant."""

    # allow_inf_nan=False: JSON has no infinity, so an infinite limit was stored as null and
    # every later read of that tenant's quota failed (500 on each of its requests)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # JSON numbers only: `false` or "10" for a limit is a client's bug, not a zero or a ten
    max_active_jobs: JsonInt = Field(10_000, ge=0, description="Jobs queued or running at once.")
    shots_per_day: JsonInt = Field(100_000_000, ge=0, description="Shots submitted per UTC day.")
    qpu_seconds_per_day: JsonFloat = Field(3_600.0, ge=0, description="QPU seconds used per UTC day.")
    priorities: tuple[Priority, ...] = Field((Priority.HIGH, Priority.NORMAL, Priority.BATCH),
                                             description="Priority classes this tenant may use.")

    @field_validator("priorities", mode="after")
    @classmethod
    def _dedupe(cls, v: tuple[Priority, ...]) -> tuple[Priority, ...]:
        # after validation: every item is a Priority (hashable); before it, `[{}]` crashed here (a 500)
        return tuple(dict.fromkeys(v))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant a token belongs to, and whether it may use admin routes."""

    tenant: str
    admin: bool
    token_id: str
    scopes: frozenset[str] = frozenset()

    def may(self, scope: str) -> bool:
        """An admin may do everything; another token what its scopes grant."""
        return self.admin or scope in self.scopes


def _add_scopes_column(engine: sa.Engine) -> None:
    """Additive migration: a token table written before scopes existed gets the column."""
    cols = {c["name"] for c in sa.inspect(engine).get_columns("tokens")}
    if "scopes" in cols:
        return
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE tokens ADD COLUMN scopes TEXT")
    except sa.exc.DBAPIError:      # another process added it meanwhile
        if "scopes" not in {c["name"] for c in sa.inspect(engine).get_columns("tokens")}:
            raise


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def day_start(now: float) -> float:
    d = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return d.timestamp()


class TenantStore:
    """Tokens, quotas and usage of tenants, in the job store's database."""

    def __init__(self, url: str) -> None:
        import re

        self._name_re = re.compile(_TENANT_PATTERN)
        self.engine = make_engine(url)
        meta.create_all(self.engine)
        _add_scopes_column(self.engine)
        self._auth_cache: dict[str, tuple[float, str, Principal]] = {}
        # tenant -> (monotonic time read, UTC day start, usage incl. what this process admitted since)
        self._usage_cache: dict[str, tuple[float, float, dict[str, float]]] = {}
        self._usage_lock = threading.Lock()   # admit runs in a thread pool

    def close(self) -> None:
        self.engine.dispose()

    # ---- tenants and tokens ---------------------------------------------------------------
    def _check_name(self, tenant: str) -> None:
        if not self._name_re.match(tenant):
            raise QAllocError(f"tenant name {tenant!r} is not valid.",
                              fix="use 1-64 letters, digits, '_', '.' or '-'.", field="tenant")

    def ensure_tenant(self, tenant: str, quota: Quota | None = None) -> None:
        self._check_name(tenant)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(tenants_table.c.name).where(tenants_table.c.name == tenant)).first()
            if row is None:
                conn.execute(tenants_table.insert().values(
                    name=tenant, quota=(quota or Quota()).model_dump_json(), created_at=time.time()))
            elif quota is not None:
                conn.execute(tenants_table.update().where(tenants_table.c.name == tenant)
                             .values(quota=quota.model_dump_json()))

    def create_token(self, tenant: str, *, admin: bool = False, scopes: tuple[str, ...] | frozenset[str] = ()) -> str:
        """A new token for ``tenant`` (created if new). The token is returned once and never stored."""
        unknown = sorted(set(scopes) - SCOPES)
        if unknown:
            raise QAllocError(f"unknown token scope(s): {', '.join(unknown)}.", field="scopes",
                              fix=f"use {', '.join(sorted(SCOPES))}, or an admin token for everything.")
        self.ensure_tenant(tenant)
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(tokens_table.insert().values(id=token_id, tenant=tenant, secret_sha256=_hash(secret),
                                                      admin=admin, created_at=time.time(),
                                                      scopes=",".join(sorted(set(scopes))) or None))
        return f"{TOKEN_PREFIX}_{token_id}_{secret}"

    def revoke(self, token_id: str) -> bool:
        with self.engine.begin() as conn:
            n = conn.execute(tokens_table.update().where(tokens_table.c.id == token_id,
                                                         tokens_table.c.revoked_at.is_(None))
                             .values(revoked_at=time.time())).rowcount
        self._auth_cache.pop(token_id, None)
        return n > 0

    def tokens(self, tenant: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(tokens_table.c.id, tokens_table.c.tenant, tokens_table.c.admin, tokens_table.c.scopes,
                      tokens_table.c.created_at, tokens_table.c.revoked_at)
        if tenant is not None:
            q = q.where(tokens_table.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(tokens_table.c.created_at))]

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an ``Authorization: Bearer <token>`` header, or Unauthorized."""
        fix = "send 'Authorization: Bearer <token>'; an admin creates one with `qalloc token create TENANT`."
        if not authorization:
            raise Unauthorized("no bearer token was sent.", fix=fix)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header is not 'Bearer <token>'.", fix=fix)
        parts = token.strip().split("_", 2)
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise Unauthorized("the bearer token is malformed.", fix=fix)
        _, token_id, secret = parts
        digest = _hash(secret)
        cached = self._auth_cache.get(token_id)
        # a short cache: a revoked token stops working within 5 s on every replica
        if cached is not None and time.monotonic() - cached[0] < 5.0:
            if hmac.compare_digest(cached[1], digest):
                return cached[2]
            raise Unauthorized("the bearer token is not valid.", fix=fix)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(tokens_table).where(tokens_table.c.id == token_id)).first()
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.secret_sha256, digest):
            raise Unauthorized("the bearer token is not valid (unknown, revoked or wrong).", fix=fix)
        principal = Principal(row.tenant, bool(row.admin), token_id,
                              frozenset(x for x in (row.scopes or "").split(",") if x))
        self._auth_cache[token_id] = (time.monotonic(), row.secret_sha256, principal)
        return principal

    # ---- quotas -----------------------------------------------------------------------------
    def quota(self, tenant: str) -> Quota:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(tenants_table.c.quota).where(tenants_table.c.name == tenant)).first()
        return Quota() if row is None else Quota(**json.loads(row.quota))

    def set_quota(self, tenant: str, quota: Quota) -> None:
        self.ensure_tenant(tenant, quota)

    def usage(self, tenant: str, now: float | None = None) -> dict[str, float]:
        """Active jobs now, shots and QPU seconds since the start of the UTC day."""
        now = time.time() if now is None else now
        since = day_start(now)
        j, a = jobs_table, attempts_table
        with self.engine.connect() as conn:
            active = conn.execute(sa.select(sa.func.count()).select_from(j).where(
                j.c.tenant == tenant, j.c.state.in_(("queued", "running")))).scalar_one()
            shots = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(j.c.shots), 0)).where(
                j.c.tenant == tenant, j.c.created_at >= since)).scalar_one()
            qpu = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(a.c.qpu_s), 0.0))
                               .select_from(a.join(j, a.c.job_id == j.c.id))
                               .where(j.c.tenant == tenant, a.c.started_at >= since)).scalar_one()
        return {"active_jobs": int(active), "shots_today": int(shots), "qpu_seconds_today": float(qpu)}

    def admit(self, tenant: str, jobs: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
        """Check a submission of ``jobs`` (dicts with ``shots``, ``priority``, ``intent``) against
        the tenant's quota. Raises Forbidden (a class not granted) or QuotaExceeded (with
        ``retry_after_s``). Returns the usage it was checked against, and ``qpu_exhausted``:
        when the QPU budget is spent, ``auto`` jobs are still admitted, on simulators only.

        Why usage is cached (``USAGE_TTL_S``) and the quota is not: the three usage queries
        grow with the tenant's jobs (~3 ms at 10k jobs today, ~30 ms at 50k on SQLite) and were
        the largest cost of POST /v1/jobs in a replica; the quota is one primary-key read, and an
        admin's change must apply at once. The cache adds what this process admits, so its own
        admissions count at once; a refusal is always decided on fresh numbers (finished jobs
        free their slots at once). What other processes stored, and QPU seconds spent, within
        the TTL can pass unseen: the same kind of slack the check-then-store race between
        concurrent requests already has. An explicit ``now`` bypasses the cache."""
        explicit = now is not None
        now = time.time() if now is None else now
        q = self.quota(tenant)
        allowed = {p.value for p in q.priorities}
        for job in jobs:
            prio = str(job.get("priority") or "normal")
            if prio not in allowed:
                raise Forbidden(f"tenant {tenant!r} may not submit priority {prio!r}.",
                                fix=f"use one of {', '.join(sorted(allowed))}, or ask an admin to grant {prio!r}.",
                                field="priority")
        n, shots = len(jobs), sum(int(job.get("shots") or 0) for job in jobs)
        quantum = any(job.get("intent") == "quantum" for job in jobs)
        cached = None if explicit else self._cached_usage(tenant, now)
        if cached is not None:
            try:
                exhausted = self._check(tenant, q, cached, n, shots, quantum, now)
            except QuotaExceeded:
                pass   # decided again below, on fresh numbers
            else:
                self._count(tenant, now, n, shots)
                return {**cached, "qpu_exhausted": exhausted}
        use = self.usage(tenant, now)
        exhausted = self._check(tenant, q, use, n, shots, quantum, now)
        if not explicit:
            with self._usage_lock:
                self._usage_cache[tenant] = (time.monotonic(), day_start(now),
                                             {**use, "active_jobs": use["active_jobs"] + n,
                                              "shots_today": use["shots_today"] + shots})
        return {**use, "qpu_exhausted": exhausted}

    def _cached_usage(self, tenant: str, now: float) -> dict[str, float] | None:
        with self._usage_lock:
            entry = self._usage_cache.get(tenant)
            if entry is None or time.monotonic() - entry[0] >= USAGE_TTL_S or entry[1] != day_start(now):
                return None
            return dict(entry[2])

    def _count(self, tenant: str, now: float, n: int, shots: int) -> None:
        """Add an admission to the cached usage (jobs it later refuses only make the cache stricter)."""
        with self._usage_lock:
            entry = self._usage_cache.get(tenant)
            if entry is not None and entry[1] == day_start(now):
                use = entry[2]
                use["active_jobs"] += n
                use["shots_today"] += shots

    @staticmethod
    def _check(tenant: str, q: Quota, use: dict[str, float], n: int, shots: int, quantum: bool,
               now: float) -> bool:
        """Raise QuotaExceeded if ``n`` jobs of ``shots`` in all would pass ``q``; else whether QPU time is spent."""
        until_midnight = max(day_start(now) + 86_400.0 - now, 1.0)
        if use["active_jobs"] + n > q.max_active_jobs:
            raise QuotaExceeded(f"tenant {tenant!r} has {use['active_jobs']} active jobs; {n} more would pass "
                                f"its limit of {q.max_active_jobs}.",
                                fix="wait for jobs to finish (or cancel some), then retry.",
                                limit="max_active_jobs", retry_after_s=5.0)
        if use["shots_today"] + shots > q.shots_per_day:
            raise QuotaExceeded(f"tenant {tenant!r} submitted {use['shots_today']} shots today; {shots} more would "
                                f"pass its limit of {q.shots_per_day} per day.",
                                fix="retry after midnight UTC, or ask an admin for a larger quota.",
                                limit="shots_per_day", retry_after_s=until_midnight)
        exhausted = use["qpu_seconds_today"] >= q.qpu_seconds_per_day
        if exhausted and quantum:
            raise QuotaExceeded(f"tenant {tenant!r} used {use['qpu_seconds_today']:.1f} QPU seconds today, its limit "
                                f"is {q.qpu_seconds_per_day:g}.",
                                fix="retry after midnight UTC, submit with intent 'auto' or 'classical', "
                                    "or ask an admin for more QPU time.",
                                limit="qpu_seconds_per_day", retry_after_s=until_midnight)
        return exhausted
