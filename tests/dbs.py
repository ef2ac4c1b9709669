"""Databases for the store's tests: ``db_url`` runs a test on SQLite and on a real PostgreSQL.

PostgreSQL comes from ``QALLOC_TEST_PG_URL`` when set (a database where the tests may create
schemas), else from a throwaway server this module starts once per session with the
machine's own ``initdb``/``pg_ctl`` (Debian's ``postgresql`` package, which ``.ci/run``
installs), and stops and deletes at the end. Only when neither is possible are the PostgreSQL
cases skipped, with the reason repeated in the terminal summary so that nobody mistakes a
skipped run for a passed one. Every test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
import sqlalchemy as sa

PG_URL_ENV = "QALLOC_TEST_PG_URL"


@dataclass
class _PgState:
    """What this session's PostgreSQL is, for the fixtures and the terminal summary."""

    env_url: str | None = None          # read at configure time: the suite's autouse fixture clears QALLOC_*
    url: str | None = None              # a database the tests may create schemas in
    skip_reason: str | None = None
    description: str = ""
    tests_run: int = 0
    admin: sa.Engine | None = field(default=None, repr=False)  # AUTOCOMMIT, creates and drops schemas
    stop: Callable[[], None] | None = field(default=None, repr=False)


_PG = _PgState()


def pytest_configure(config: pytest.Config) -> None:
    env = os.environ.get(PG_URL_ENV)
    for plain in ("postgresql://", "postgres://"):  # no driver named: psycopg 3, as the store does
        if env and env.startswith(plain):
            env = "postgresql+psycopg://" + env[len(plain):]
    _PG.env_url = env or None


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """One line saying whether the PostgreSQL cases ran, and on what; visible even with -q."""
    if _PG.skip_reason is not None:
        terminalreporter.write_line(f"PostgreSQL store tests SKIPPED: {_PG.skip_reason}", yellow=True, bold=True)
    elif _PG.url is not None:
        terminalreporter.write_line(f"PostgreSQL store tests: {_PG.tests_run} ran on {_PG.description}")


# ---- a throwaway server ----------------------------------------------------------------------
def _find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<v>/bin (Debian), else wherever pg_ctl is on PATH."""
    def version(path: str) -> float:
        try:
            return float(Path(path).parent.parent.name)
        except ValueError:
            return 0.0

    for ctl in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version, reverse=True):
        bin_dir = Path(ctl).parent
        if (bin_dir / "initdb").exists() and (bin_dir / "postgres").exists():
            return bin_dir
    ctl = shutil.which("pg_ctl")
    if ctl:  # resolve a symlink such as /usr/local/bin/pg_ctl: postgres lives beside the real one
        bin_dir = Path(os.path.realpath(ctl)).parent
        if (bin_dir / "initdb").exists():
            return bin_dir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server() -> tuple[str, str, Callable[[], None]]:
    """Start a server; return (admin URL, description, stop). Raises RuntimeError with a reason.

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` system user
    (created by the Debian package) in a directory that user owns."""
    bin_dir = _find_bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin "
                           f"or on PATH; install Debian's 'postgresql' package or set {PG_URL_ENV}")
    prefix: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no 'postgres' user to run the server as") from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise RuntimeError("running as root and 'runuser' is missing: cannot drop to the 'postgres' user")
        prefix = [runuser, "-u", "postgres", "--"]

    base = Path(tempfile.mkdtemp(prefix="qalloc-pg-", dir="/tmp"))  # short: holds the unix socket
    data, log, pwfile = base / "data", base / "server.log", base / "pw"
    password = secrets.token_hex(16)
    pwfile.write_text(password + "\n")
    if owner is not None:
        for p in (base, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    os.chmod(base, 0o700)
    os.chmod(pwfile, 0o600)

    def run(*args: str, timeout: float = 60) -> None:
        proc = subprocess.run([*prefix, *args], cwd=base, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            if log.exists():
                tail += log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(args[0]).name} failed: " + " | ".join(tail))

    def stop() -> None:
        try:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           cwd=base, capture_output=True, timeout=30)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    port = _free_port()
    # fsync and friends off: a throwaway test server needs speed, not crash durability.
    opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c shared_buffers=32MB -c max_connections=200 -c deadlock_timeout=100ms")
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
            f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start",
            timeout=90)
    except BaseException:
        stop()
        raise
    version = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True).stdout
    url = f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/postgres"
    return url, f"a throwaway {version.strip() or 'PostgreSQL'} on 127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL database where tests may create schemas; skips (visibly) if there is none."""
    if _PG.url is None and _PG.skip_reason is None:
        reasons = []
        if _PG.env_url:
            try:
                engine = sa.create_engine(_PG.env_url, poolclass=sa.pool.NullPool)
                with engine.connect() as conn:
                    version = conn.exec_driver_sql("SHOW server_version").scalar()
                engine.dispose()
                _PG.url, _PG.description = _PG.env_url, f"PostgreSQL {version} from {PG_URL_ENV}"
            except Exception as exc:  # noqa: BLE001 - try the throwaway server next
                reasons.append(f"{PG_URL_ENV} unusable: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
        if _PG.url is None:
            t0 = time.perf_counter()
            try:
                _PG.url, _PG.description, _PG.stop = _start_server()
                _PG.description += f" (started in {time.perf_counter() - t0:.1f} s)"
                _PG.description += "".join(f"; {r}" for r in reasons)
            except Exception as exc:  # noqa: BLE001 - every reason ends the same way: a visible skip
                reasons.append(f"cannot start a throwaway server: {exc}")
                _PG.skip_reason = "; ".join(reasons)
    if _PG.skip_reason is not None:
        pytest.skip(_PG.skip_reason)
    assert _PG.url is not None
    _PG.admin = sa.create_engine(_PG.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        yield _PG.url
    finally:
        _PG.admin.dispose()
        _PG.admin = None
        if _PG.stop is not None:
            _PG.stop()
            _PG.stop = None


@contextlib.contextmanager
def fresh_schema(pg_admin_url: str) -> Iterator[str]:
    """A URL whose connections see only a fresh, empty schema (``search_path``), dropped after:
    for a test that needs several (one per hypothesis example)."""
    schema = f"qt_{secrets.token_hex(6)}"
    admin = _PG.admin
    assert admin is not None
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    _PG.tests_run += 1
    url = sa.engine.make_url(pg_admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '10s'")
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture()
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A URL whose connections see only a fresh, empty schema, dropped after the test."""
    with fresh_schema(pg_admin_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on SQLite (a file in tmp_path) and on PostgreSQL (its own schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")
