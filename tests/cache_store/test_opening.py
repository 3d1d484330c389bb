"""open_store / default_cache_url / open_store_or_memory / SafeStore (a cache failing mid-tune)."""

from __future__ import annotations

from pathlib import Path

import pytest
from autoquant.cache_db import (
    CacheUnavailableError,
    SQLStore,
    default_cache_url,
    open_store,
    open_store_or_memory,
)
from autoquant.cache_db.engine import mask_url, parse_spec

from autoquant.store import MemoryStore
from autoquant.store import SafeStore

from .conftest import CPU_ENV
from .helpers import figures, key


def test_none_means_memory_only() -> None:
    assert open_store(None) is None
    store, warning = open_store_or_memory(None)
    assert isinstance(store, MemoryStore) and warning is None


def test_a_store_is_passed_through() -> None:
    mem = MemoryStore()
    assert open_store(mem) is mem
    with pytest.raises(TypeError):
        open_store(42)  # type: ignore[arg-type]


def test_paths_and_urls(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b" / "cache.sqlite"
    for spec in (nested, str(nested), f"sqlite:///{nested}"):
        store = open_store(spec)
        assert isinstance(store, SQLStore) and store.describe() == str(nested)
        store.close()
    assert nested.is_file()


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_spec("rel.sqlite").database == str(tmp_path / "rel.sqlite")
    assert parse_spec("sqlite:///rel.sqlite").database == str(tmp_path / "rel.sqlite")


def test_postgres_urls_get_the_psycopg_driver() -> None:
    for url in ("postgresql://u:pw@h/db", "postgres://u:pw@h/db", "postgresql+psycopg://u:pw@h/db"):
        assert parse_spec(url).drivername == "postgresql+psycopg"
    assert mask_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"


def test_unsupported_database_is_unavailable() -> None:
    with pytest.raises(CacheUnavailableError, match="unsupported database 'mysql'"):
        open_store("mysql://u:pw@h/db")
    store, warning = open_store_or_memory("mysql://u:pw@h/db")
    assert isinstance(store, MemoryStore) and "***" in (warning or "") and "pw@" not in warning


def test_default_cache_url(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AUTOQUANT_CACHE_URL", raising=False)
    monkeypatch.setattr("platformdirs.user_cache_dir", lambda app: str(tmp_path / app))
    assert default_cache_url() == f"sqlite:///{tmp_path / 'autoquant' / 'tuning-cache.sqlite'}"
    monkeypatch.setenv("AUTOQUANT_CACHE_URL", "postgresql+psycopg://team@db/cache")
    assert default_cache_url() == "postgresql+psycopg://team@db/cache"
    monkeypatch.setenv("AUTOQUANT_CACHE_URL", "  ")
    assert default_cache_url().startswith("sqlite:///")


def test_open_store_or_memory_gives_a_working_store(tmp_path: Path) -> None:
    store, warning = open_store_or_memory(tmp_path / "c.sqlite")
    assert isinstance(store, SQLStore) and warning is None
    store.put_many(CPU_ENV, {key(CPU_ENV): figures()})
    assert store.get_many([key(CPU_ENV)]) == {key(CPU_ENV): figures()}
    assert store.describe() == str(tmp_path / "c.sqlite")


class _Broken:
    def get_many(self, *args: object) -> dict:
        raise CacheUnavailableError("/x.sqlite", "database error: disk I/O error", "Fix it.")

    put_many = get_many

    def describe(self) -> str:
        return "/x.sqlite"


def test_safe_store_degrades_once_and_keeps_working(caplog) -> None:
    store = SafeStore(_Broken())
    k = key(CPU_ENV)
    store.put_many(CPU_ENV, {k: figures()})  # the failure: logged, then kept in memory
    assert store.get_many([k]) == {k: figures()}
    assert store.describe().endswith("(failed; in memory)")
    assert "/x.sqlite" in (store.failure or "") and "Fix it." in (store.failure or "")
    assert caplog.text.count("disk I/O error") == 1
