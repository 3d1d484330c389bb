"""Fixtures for the tuning-cache tests: a real PostgreSQL server on loopback, and stores on both
backends.

The server is started once per session (see pgserver.py here; as root its commands run
as `nobody`). Without server binaries the PostgreSQL tests skip with the reason, except under CI
(the CI environment variable set), where they fail: CI must never skip them silently.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoquant.cache_db.sql_store import SQLStore
from helpers import running_in_ci

from autoquant.hardware import Environment

from .pgserver import (
    PostgresServer,
    PostgresStartError,
    find_pg_bin,
    start_postgres,
)

TEST_DB = "autoquant_tests"
CPU_ENV = Environment(device_kind="cpu", sku="Test CPU 9000", capability="avx2,fma", units=8,
                      memory_mb=16384, driver="", cuda="", torch="2.13.0", triton="",
                      autoquant="0.1.0")
GPU_ENV = Environment(device_kind="cuda", sku="NVIDIA H100 80GB HBM3", capability="9.0",
                      units=132, memory_mb=81559, driver="550.54", cuda="12.4", torch="2.13.0",
                      triton="3.3.0", autoquant="0.1.0")


def _no_server(reason: str) -> None:
    if running_in_ci():
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run (run "
                    "scripts/ensure_postgres.sh first)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401 - the driver the store uses
    except ImportError:
        _no_server("psycopg is not installed (pip install 'autoquant-tuner[postgres]')")
    if find_pg_bin() is None:
        _no_server("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                   "/usr/lib/postgresql/*/bin")
    try:
        server = start_postgres(fsync=False)
        server.create_database(TEST_DB)
    except PostgresStartError as err:
        pytest.fail(f"could not start PostgreSQL for the tests:\n{err}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A URL to a fresh, empty schema (its own search_path) on the session's server."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_schema(TEST_DB, schema)
    yield url
    postgres_server.drop_schema(TEST_DB, schema)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty cache, on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[SQLStore]:
    s = SQLStore(store_url)
    yield s
    s.close()
