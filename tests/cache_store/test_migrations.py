"""Schema versions: a hand-made v1 database is upgraded in place with its data kept; a newer one
is refused and left byte for byte as it was."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from autoquant.cache_db import CacheUnavailableError, SQLStore
from autoquant.cache_db.migrations import MIGRATIONS, SCHEMA_VERSION
from sqlalchemy import create_engine, inspect, text

from autoquant.keys import Measurement, OpShape, Timed

from .conftest import CPU_ENV
from .helpers import figures, key

# The v1 schema as the first release wrote it (see autoquant.cache_db.migrations' history).
_V1 = """
CREATE TABLE schema_version (id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
                             version INTEGER NOT NULL);
CREATE TABLE environments (
  id {serial} PRIMARY KEY, hash TEXT NOT NULL UNIQUE, device_kind TEXT NOT NULL,
  sku TEXT NOT NULL, capability TEXT NOT NULL, units INTEGER NOT NULL, memory_mb INTEGER NOT NULL,
  driver TEXT NOT NULL, cuda TEXT NOT NULL, torch TEXT NOT NULL, triton TEXT NOT NULL,
  autoquant TEXT NOT NULL, created_at {ts} DEFAULT CURRENT_TIMESTAMP NOT NULL);
CREATE TABLE measurements (
  id {serial} PRIMARY KEY,
  env_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
  candidate TEXT NOT NULL, params TEXT NOT NULL, version INTEGER NOT NULL,
  m BIGINT NOT NULL, k BIGINT NOT NULL, n BIGINT NOT NULL, bias BOOLEAN NOT NULL,
  dtype TEXT NOT NULL, timed TEXT NOT NULL CHECK (timed IN ('full', 'matmul', 'relu')),
  median_s FLOAT NOT NULL, p25_s FLOAT NOT NULL, p75_s FLOAT NOT NULL, samples INTEGER NOT NULL,
  created_at {ts} DEFAULT CURRENT_TIMESTAMP NOT NULL,
  CONSTRAINT uq_measurements_key UNIQUE (env_id, candidate, m, k, n, dtype, bias, timed, params,
                                         version));
INSERT INTO schema_version (id, version) VALUES (1, 1);
"""


def _make_v1(url: str) -> None:
    engine = create_engine(url)
    pg = engine.dialect.name == "postgresql"
    ddl = _V1.format(serial="SERIAL" if pg else "INTEGER", ts="TIMESTAMPTZ" if pg else "TIMESTAMP")
    env = CPU_ENV.to_dict()
    with engine.begin() as conn:
        for stmt in filter(str.strip, ddl.split(";")):
            conn.execute(text(stmt))
        conn.execute(text(f"INSERT INTO environments (hash, {', '.join(env)}) VALUES "
                          f"(:hash, {', '.join(':' + f for f in env)})"),
                     {"hash": CPU_ENV.hash, **env})
        k = key(CPU_ENV)
        conn.execute(text(
            "INSERT INTO measurements (env_id, candidate, params, version, m, k, n, bias, dtype, "
            "timed, median_s, p25_s, p75_s, samples) VALUES (1, :c, :p, :v, :m, :k, :n, :b, :d, "
            "'full', 2e-5, 1.9e-5, 2.1e-5, 25)"),
            {"c": k.candidate, "p": k.params, "v": k.version, "m": k.op.m, "k": k.op.k,
             "n": k.op.n, "b": k.op.bias, "d": k.op.dtype})
    engine.dispose()


def _columns(url: str) -> dict[str, list[str]]:
    engine = create_engine(url)
    insp = inspect(engine)
    out = {t: sorted(c["name"] for c in insp.get_columns(t)) for t in insp.get_table_names()}
    engine.dispose()
    return out


def test_migrations_are_an_unbroken_chain() -> None:
    assert [m.from_version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION))


def test_v1_database_is_upgraded_with_its_data(store_url: str, tmp_path: Path) -> None:
    _make_v1(store_url)
    store = SQLStore(store_url)
    assert (store.upgraded_from, store.schema_version) == (1, SCHEMA_VERSION)
    k = key(CPU_ENV)
    assert store.get_many([k]) == {k: Measurement(2e-5, 1.9e-5, 2.1e-5, 25, None)}
    (row,) = store.measurements()
    assert row.host == "" and row.created_at is not None
    store.put_many(CPU_ENV, {key(CPU_ENV, 3): figures(load=1.5)})  # new columns in use
    store.save_profile("p", "fp", {OpShape(1, 8, 8, False, "float32"): 1})
    assert store.get_many([key(CPU_ENV, 3)])[key(CPU_ENV, 3)].load_avg == 1.5
    eager = key(CPU_ENV, 5, timed=Timed.EAGER)  # v4: the timed check accepts 'eager'
    store.put_many(CPU_ENV, {eager: figures()})
    assert eager in store.get_many([eager])
    store.close()
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    SQLStore(fresh).close()
    assert _columns(store_url) == _columns(fresh)
    assert SQLStore(store_url).upgraded_from == SCHEMA_VERSION  # the second open changes nothing


V2_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v2" / "cache_v2.db.bin"


def test_v2_file_made_by_the_v2_release_is_upgraded_to_v3(tmp_path: Path) -> None:
    """tests/fixtures/cache_v2: a SQLite cache written by main at schema v2 (40 CPU and 12 GPU
    measurements, profile 'bert'). Opening it upgrades it in place; every row is still there, the
    claims table works, and a fresh file has the same columns."""
    import shutil

    from autoquant.cache_db import claims

    path = tmp_path / "cache.sqlite"
    shutil.copy(V2_FIXTURE, path)
    before = sqlite3.connect(path)
    assert before.execute("SELECT version FROM schema_version").fetchone() == (2,)
    counts = before.execute("SELECT COUNT(*) FROM measurements").fetchone()
    before.close()
    store = SQLStore(path)
    assert (store.upgraded_from, store.schema_version) == (2, SCHEMA_VERSION)
    assert (len(store.measurements()),) == counts == (52,)
    assert store.load_profile("bert").counts()[OpShape(8, 384, 384, True, "float32")] == 24
    assert claims.try_claim(store, CPU_ENV.hash, "unit-1", "host:1")
    assert not claims.try_claim(store, CPU_ENV.hash, "unit-1", "host:2")
    store.close()
    fresh = tmp_path / "fresh.sqlite"
    SQLStore(fresh).close()
    assert _columns(f"sqlite:///{path}") == _columns(f"sqlite:///{fresh}")


def _newer_sqlite(path: Path) -> bytes:
    SQLStore(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return path.read_bytes()


def test_newer_sqlite_file_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    before = _newer_sqlite(path)
    with pytest.raises(CacheUnavailableError) as info:
        SQLStore(path)
    message = str(info.value)
    assert str(path) in message and "newer autoquant" in message and "Upgrade autoquant" in message
    assert isinstance(info.value, RuntimeError)
    assert path.read_bytes() == before


@pytest.mark.postgres
def test_newer_postgres_schema_is_refused_and_untouched(postgres_url: str) -> None:
    SQLStore(postgres_url).close()
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 7})
    with pytest.raises(CacheUnavailableError, match="newer autoquant") as info:
        SQLStore(postgres_url)
    assert "***" in str(info.value)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT version FROM schema_version")) == SCHEMA_VERSION + 7
    engine.dispose()


def test_a_database_that_is_not_a_cache_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(CacheUnavailableError, match="not a tuning cache"):
        SQLStore(path)
    assert path.read_bytes() == before
