"""The persistent, shareable tuning cache (DESIGN.md section 6): SQLite by default, PostgreSQL for
a team, one schema, and plain dataclasses out.

>>> from autoquant.cache_db import open_store_or_memory
>>> store, warning = open_store_or_memory("sqlite://")  # or a path, or default_cache_url()
>>> warning is None
True
"""

from .errors import CacheImportError, CacheUnavailableError
from .migrations import SCHEMA_VERSION
from .opening import (
    DEFAULT_FILE_NAME,
    default_cache_url,
    open_store,
    open_store_or_memory,
)
from .records import (
    CacheStats,
    EnvironmentCount,
    ExportReport,
    ImportReport,
    PruneReport,
    ShapeProfile,
    StoredMeasurement,
)
from .sql_store import SQLStore

__all__ = [
    "DEFAULT_FILE_NAME",
    "SCHEMA_VERSION",
    "CacheImportError",
    "CacheStats",
    "CacheUnavailableError",
    "EnvironmentCount",
    "ExportReport",
    "ImportReport",
    "PruneReport",
    "SQLStore",
    "ShapeProfile",
    "StoredMeasurement",
    "default_cache_url",
    "open_store",
    "open_store_or_memory",
]
