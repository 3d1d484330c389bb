"""SQLite settings, lock retry, and the PostgreSQL helpers (server starter, CI script)."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from autoquant.cache_db import SQLStore, engine
from sqlalchemy import text

from .conftest import CPU_ENV, _no_server
from .helpers import figures, key
from .pgserver import find_pg_bin

REPO = Path(__file__).resolve().parents[2]


def test_sqlite_pragmas(tmp_path: Path) -> None:
    store = SQLStore(tmp_path / "c.sqlite")
    with store._engine.connect() as conn:
        def pragma(name: str) -> object:
            return conn.exec_driver_sql(f"PRAGMA {name}").scalar()

        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 1  # NORMAL
        assert pragma("busy_timeout") == int(engine.BUSY_TIMEOUT_S * 1000)
        assert pragma("foreign_keys") == 1


def test_writers_wait_for_a_held_lock_and_retry(tmp_path: Path, monkeypatch, caplog) -> None:
    # A tiny busy timeout makes SQLite report "database is locked" at once: the retry loop,
    # not the busy handler, has to carry the write through.
    monkeypatch.setattr(engine, "BUSY_TIMEOUT_S", 0.01)
    monkeypatch.setattr(engine, "RETRY_BUDGET_S", 15.0)
    path = tmp_path / "c.sqlite"
    store = SQLStore(path)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
    release.start()
    start = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="autoquant.cache_db.engine"):
        store.put_many(CPU_ENV, {key(CPU_ENV): figures()})
    release.join()
    holder.close()
    assert time.monotonic() - start >= 0.4
    assert "busy" in caplog.text and "retrying" in caplog.text
    assert store.get_many([key(CPU_ENV)]) == {key(CPU_ENV): figures()}


def test_find_pg_bin_honours_the_override(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("initdb", "pg_ctl", "postgres"):
        (fake / name).write_text("#!/bin/sh\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("AUTOQUANT_PG_BIN", str(fake))
    assert find_pg_bin() == fake
    monkeypatch.setenv("AUTOQUANT_PG_BIN", str(tmp_path / "missing"))
    assert find_pg_bin() != tmp_path / "missing"


def test_ensure_postgres_script_reports_what_it_found() -> None:
    if find_pg_bin() is None:
        _no_server("no PostgreSQL binaries here: the script would install them")
    out = subprocess.run(["bash", str(REPO / "scripts" / "ensure_postgres.sh"), "--check"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "found PostgreSQL server binaries in" in out and "PostgreSQL" in out


def test_ensure_postgres_check_fails_when_nothing_is_installed(tmp_path: Path) -> None:
    """The script on a machine without server binaries: its system-wide search roots are pointed at
    empty directories (a copy of the script), so this runs whatever this machine has installed."""
    script = (REPO / "scripts" / "ensure_postgres.sh").read_text()
    roots = {"/usr/lib/postgresql": tmp_path / "lib-postgresql", "/usr/local/pgsql": tmp_path / "local-pgsql"}
    for real, empty in roots.items():
        assert script.count(real) >= 1, f"ensure_postgres.sh no longer searches {real}: update this test"
        empty.mkdir()
        script = script.replace(real, str(empty))
    copy = tmp_path / "ensure_postgres.sh"
    copy.write_text(script)
    env = {"PATH": "/usr/bin:/bin", "AUTOQUANT_PG_BIN": str(tmp_path)}  # distributions install under /usr/lib
    proc = subprocess.run([shutil.which("bash") or "/bin/bash", str(copy), "--check"], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 1 and "no PostgreSQL server binaries" in proc.stderr, proc.stderr


@pytest.mark.postgres
def test_server_listens_on_loopback_only_and_not_as_root(postgres_server) -> None:
    url = postgres_server.url("postgres")
    with SQLStore(postgres_server.create_schema("autoquant_tests", "probe")) as store, \
            store._engine.connect() as conn:
        assert conn.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
        data_dir = conn.execute(text("SHOW data_directory")).scalar()
    postgres_server.drop_schema("autoquant_tests", "probe")
    assert os.stat(data_dir).st_uid != 0 or os.geteuid() != 0
    assert url.startswith("postgresql+psycopg://") and "127.0.0.1" in url


def test_missing_server_skips_locally_and_fails_under_ci(monkeypatch) -> None:
    from .conftest import _no_server

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no binaries"):
        _no_server("no binaries")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        _no_server("no binaries")
