"""Where the cache lives and how the tuner opens it without ever failing because of it.

>>> store, warning = open_store_or_memory(None)
>>> store.describe(), warning
('memory', None)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import platformdirs

from ..store import MemoryStore, Store
from .engine import ENV_VAR
from .errors import CacheUnavailableError
from .sql_store import SQLStore

__all__ = [
    "DEFAULT_FILE_NAME",
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


def open_store_or_memory(spec: Store | str | os.PathLike[str] | None) -> tuple[Store, str | None]:
    """What the tuner calls: (a usable store, a warning or None). A cache that cannot be opened
    gives a MemoryStore and the reason (also logged). One that fails later, mid-tune, is the
    tuner's to handle: ``autoquant.tune.SafeStore`` carries on in memory and puts the reason in
    the report."""
    try:
        store = open_store(spec)
    except CacheUnavailableError as err:
        message = f"{err} Tuning continues with an in-memory cache."
        log.warning("%s", message)
        return MemoryStore(), message
    if store is None:
        return MemoryStore(), None
    return store, None
