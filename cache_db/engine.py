"""Engines, pre-flight checks and transactions with retry, for SQLite files and PostgreSQL.

SQLite: WAL journal (readers never block the writer), synchronous=NORMAL (a crash loses at most the
last commits, never consistency), a 30 s busy timeout, foreign keys on, and write transactions
opened with BEGIN IMMEDIATE so two writers queue on the busy handler instead of deadlocking on a lock
upgrade. Anything still reported as "database is locked" is retried with backoff.
PostgreSQL: psycopg 3; deadlocks and serialization failures are retried the same way.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from .errors import CacheUnavailableError

__all__ = [
    "BUSY_TIMEOUT_S",
    "ENV_VAR",
    "make_engine",
    "mask_url",
    "parse_spec",
    "preflight_sqlite",
    "probe_sqlite",
    "run_transaction",
    "sqlite_file",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_VAR = "AUTOQUANT_CACHE_URL"
BUSY_TIMEOUT_S = 30.0
RETRY_BUDGET_S = 120.0
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected
_ELSEWHERE = f"or set {ENV_VAR} to another location"


def parse_spec(spec: str | os.PathLike[str]) -> URL:
    """A database URL from a URL string or a filesystem path (a path means a SQLite file).

    'postgresql://' and 'postgres://' get the psycopg 3 driver; relative SQLite paths become
    absolute so the store's description is unambiguous in logs."""
    text = os.fspath(spec)
    if "://" not in text:
        return URL.create("sqlite+pysqlite", database=str(Path(text).expanduser().absolute()))
    url = make_url(text)
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if url.database and url.database != ":memory:":
            path = Path(url.database).expanduser().absolute()
            return url.set(drivername="sqlite+pysqlite", database=str(path))
        return url.set(drivername="sqlite+pysqlite")
    raise CacheUnavailableError(
        mask_url(url), f"unsupported database {backend!r}",
        f"Use a sqlite:///path or postgresql+psycopg://user@host/db URL, {_ELSEWHERE}.")


def mask_url(url: URL | str) -> str:
    """The URL with its password replaced by ***: safe for logs and reports."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for in-memory SQLite and for other backends."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _unavailable(path: Path, problem: str, remedy: str) -> CacheUnavailableError:
    return CacheUnavailableError(str(path), problem, remedy)


def preflight_sqlite(path: Path) -> None:
    """Raise CacheUnavailableError for a path SQLite could not use safely; create missing parent
    directories. Only reads: the file is never created, truncated or removed here.

    The checks use os.access, which answers for the real user: root passes permission checks, as it
    would in SQLite itself."""
    try:
        exists = path.exists()
        if not exists:
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, or no permission to create the directory
        raise _unavailable(path, f"cannot create its directory ({err.strerror or err})",
                           f"Make {path.parent} a writable directory, {_ELSEWHERE}.") from err
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise _unavailable(path, f"its directory {path.parent} is not writable (SQLite needs to "
                           "create -wal and -shm files beside the database)",
                           f"Make the directory writable, {_ELSEWHERE}.")
    if not exists:
        return
    if path.is_dir():
        raise _unavailable(path, "is a directory, not a database file",
                           f"Remove or rename that directory, {_ELSEWHERE}.")
    if not path.is_file():
        raise _unavailable(path, "is not a regular file", f"Remove it, {_ELSEWHERE}.")
    if not os.access(path, os.R_OK):
        raise _unavailable(path, "cannot be read (permission denied)",
                           f"Fix its permissions (chmod u+rw), {_ELSEWHERE}.")
    if not os.access(path, os.W_OK):
        raise _unavailable(path, "is read-only", f"Make it writable (chmod u+w), {_ELSEWHERE}.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as err:
        raise _unavailable(path, f"cannot be read ({err.strerror or err})",
                           f"Fix its permissions, {_ELSEWHERE}.") from err
    if head and head != _SQLITE_MAGIC:
        raise corrupt_error(path, "it does not start with the SQLite header")


def corrupt_error(path: Path, detail: str) -> CacheUnavailableError:
    return _unavailable(
        path, f"is not a readable SQLite database ({detail}): corrupt, or not a cache file",
        f"Move it aside (e.g. rename it to {path.name}.corrupt) and a fresh cache is created, "
        f"{_ELSEWHERE}. autoquant never deletes it.")


def probe_sqlite(path: Path) -> tuple[set[str], int | None]:
    """(table names, schema version or None) read through a read-only connection, so a corrupt or
    newer file is inspected without a single byte written to it."""
    if not path.exists() or path.stat().st_size == 0:
        return set(), None
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {r[0] for r in rows}
            version = None
            if "schema_version" in tables:
                row = con.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
                version = int(row[0]) if row else None
            return tables, version
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise corrupt_error(path, str(err)) from err


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Hand transaction control to SQLAlchemy's "begin" event below (pysqlite's implicit BEGIN
    # would not cover reads, and cannot be told to BEGIN IMMEDIATE per transaction).
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA foreign_keys = ON")
        if dbapi_connection.execute("PRAGMA database_list").fetchone()[2]:  # a file, not :memory:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


def _on_sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("autoquant_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: URL) -> Engine:
    """An engine for a parsed URL (see :func:`parse_spec`); no connection is made yet."""
    if url.get_backend_name() == "sqlite":
        connect_args = {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
        if sqlite_file(url) is None:  # one shared in-memory database per store
            engine = create_engine(url, connect_args=connect_args, poolclass=StaticPool)
        else:
            engine = create_engine(url, connect_args=connect_args)
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    # No pool_pre_ping: it costs a round trip per call. A connection the server dropped raises a
    # disconnect error instead, which run_transaction retries on a fresh connection.
    return create_engine(url, connect_args={"connect_timeout": 10})


def _transient(err: exc.DBAPIError) -> bool:
    if err.connection_invalidated:  # a pooled connection the server had closed
        return True
    text = str(err.orig).lower()
    if "database is locked" in text or "database table is locked" in text or "busy" in text:
        return True
    return getattr(err.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES


def _fatal(err: exc.DBAPIError) -> bool:
    """Errors that mean the database itself is unusable (not a bug in a statement)."""
    return isinstance(err, exc.OperationalError) or type(err) is exc.DatabaseError


@contextmanager
def _transaction(engine: Engine, write: bool, snapshot: bool) -> Iterator[Connection]:
    with engine.connect() as conn:
        if write:
            conn.execution_options(autoquant_write=True)
        elif not snapshot and conn.dialect.name == "postgresql":
            # One SELECT is atomic on its own: skip the BEGIN and ROLLBACK round trips.
            conn.execution_options(isolation_level="AUTOCOMMIT")
        with conn.begin():
            yield conn


def run_transaction(engine: Engine, location: str, fn: Callable[[Connection], T], *,
                    write: bool, snapshot: bool = True) -> T:
    """Run `fn(conn)` in one transaction (`snapshot=False`: reads that need no common snapshot
    across statements may run without one); retry the whole transaction with exponential backoff
    while the database reports a lock, deadlock or serialization conflict. A database that cannot
    be used (corrupt, gone, full, unreachable) raises CacheUnavailableError naming `location`."""
    deadline = time.monotonic() + RETRY_BUDGET_S
    delay = 0.01
    while True:
        try:
            with _transaction(engine, write, snapshot) as conn:
                return fn(conn)
        except exc.DBAPIError as err:
            if _transient(err) and time.monotonic() < deadline:
                log.debug("cache %s busy (%s); retrying in %.2fs", location, err.orig, delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            if _fatal(err):
                if _transient(err):  # still locked when the retry budget ran out
                    remedy = (f"Another process has held a lock on it for over {RETRY_BUDGET_S:.0f} s (a long "
                              f"transaction or a stuck writer): find it (e.g. `fuser` on the file) and end it, "
                              f"{_ELSEWHERE}.")
                elif engine.dialect.name == "sqlite":
                    remedy = ("If the file is damaged, move it aside (a fresh cache is then "
                              f"created), {_ELSEWHERE}; autoquant never deletes it.")
                else:
                    remedy = f"Check that the server is up and the URL is right, {_ELSEWHERE}."
                raise CacheUnavailableError(
                    location, f"database error: {str(err.orig).strip()}", remedy) from err
            raise
