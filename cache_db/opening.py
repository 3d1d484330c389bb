"""Where the cache lives and how the tuner opens it without ever failing because of it.

>>> store, warning = open_store_or_memory(None)
>>> store.describe(), warning
('memory', None)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import platformdirs

from ..hardware import Environment
from ..keys import BenchKey, Measurement
from ..store import MemoryStore, Store
from .engine import ENV_VAR
from .errors import CacheUnavailableError
from .sql_store import SQLStore

__all__ = [
    "DEFAULT_FILE_NAME",
    "FallbackStore",
    "default_cache_url",
    "open_store",
    "open_store_or_memory",
]

log = logging.getLogger(__name__)
DEFAULT_FILE_NAME = "tuning-cache.sqlite"


def default_cache_url() -> str:
    """$AUTOQUANT_CACHE_URL if set, else a SQLite file in the platform's user cache directory
    (e.g. ~/.cache/autoquant/tuning-cache.sqlite on Linux)."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured:
        return configured
    return f"sqlite:///{Path(platformdirs.user_cache_dir('autoquant')) / DEFAULT_FILE_NAME}"


def open_store(spec: Store | str | os.PathLike[str] | None) -> Store | None:
    """None -> None (memory only: the caller uses MemoryStore); a Store -> itself; a
    'sqlite:///...' or 'postgresql+psycopg://...' URL, or a filesystem path (a SQLite file) -> a
    SQLStore. Parent directories of a SQLite file are created. Raises CacheUnavailableError."""
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        return SQLStore(spec)
    if isinstance(spec, Store):
        return spec
    raise TypeError(f"cache must be None, a Store, a URL or a path, not {type(spec).__name__}")


class FallbackStore:
    """A SQL store that turns into a MemoryStore the first time the database fails mid-tune
    (CacheUnavailableError from get_many/put_many): the tuner keeps going, a warning is logged
    once, and `warning` holds the message for the report."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.memory: MemoryStore | None = None
        self.warning: str | None = None

    def _fail(self, err: CacheUnavailableError) -> MemoryStore:
        self.warning = f"{err} Tuning continues with an in-memory cache."
        log.warning("%s", self.warning)
        self.memory = MemoryStore()
        return self.memory

    def get_many(self, keys: Iterable[BenchKey]) -> dict[BenchKey, Measurement]:
        if self.memory is None:
            keys = list(keys)
            try:
                return self.inner.get_many(keys)
            except CacheUnavailableError as err:
                self._fail(err)
        return self.memory.get_many(keys)

    def put_many(self, env: Environment | None, items: Mapping[BenchKey, Measurement]) -> None:
        if self.memory is None:
            try:
                self.inner.put_many(env, items)
                return
            except CacheUnavailableError as err:
                self._fail(err)
        self.memory.put_many(env, items)

    def describe(self) -> str:
        return "memory" if self.memory is not None else self.inner.describe()


def open_store_or_memory(spec: Store | str | os.PathLike[str] | None) -> tuple[Store, str | None]:
    """What the tuner calls: (a usable store, a warning or None). A cache that cannot be opened
    gives a MemoryStore and the reason (also logged); one that fails later degrades the same way
    through FallbackStore."""
    try:
        store = open_store(spec)
    except CacheUnavailableError as err:
        message = f"{err} Tuning continues with an in-memory cache."
        log.warning("%s", message)
        return MemoryStore(), message
    if store is None:
        return MemoryStore(), None
    return FallbackStore(store), None
