"""Plain frozen dataclasses the SQL store hands out: never ORM rows, nothing tied to a session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

from ..hardware import Environment
from ..keys import BenchKey, Measurement, OpShape, Timed
from ..profile import ShapeProfile  # one class for files and the cache (autoquant/profile.py)

__all__ = [
    "CacheStats",
    "EnvironmentCount",
    "ExportReport",
    "ImportReport",
    "PruneReport",
    "ShapeProfile",
    "StoredMeasurement",
    "as_utc",
]


def as_utc(value: datetime | None) -> datetime | None:
    """Timezone-aware UTC. SQLite hands back naive timestamps, written in UTC by
    CURRENT_TIMESTAMP."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


@dataclass(frozen=True)
class StoredMeasurement:
    """One cache row: its key, its figures, and when and where it was taken."""

    key: BenchKey
    measurement: Measurement
    created_at: datetime | None = None
    host: str = ""


def key_values(key: BenchKey) -> tuple:
    """A key's column values after the environment: (candidate, m, k, n, dtype, bias, timed,
    params, version), the order of the unique index and of every bulk path."""
    op = key.op
    return (key.candidate, op.m, op.k, op.n, op.dtype, op.bias, key.timed.value, key.params,
            key.version)


class MeasurementRecord(NamedTuple):
    """A measurement as plain values, for the bulk paths (import, merge), where building
    BenchKey and Measurement dataclasses for every row would cost more than the database."""

    env: str  # environment hash
    key: tuple  # key_values() order
    figures: tuple  # (median_s, p25_s, p75_s, samples, load_avg)
    created_at: datetime | None
    host: str

    @classmethod
    def from_stored(cls, sm: StoredMeasurement) -> MeasurementRecord:
        m = sm.measurement
        return cls(sm.key.env_hash, key_values(sm.key),
                   (m.median_s, m.p25_s, m.p75_s, m.samples, m.load_avg), sm.created_at, sm.host)

    def to_stored(self) -> StoredMeasurement:
        candidate, m, k, n, dtype, bias, timed, params, version = self.key
        return StoredMeasurement(
            BenchKey(self.env, candidate, params, version, OpShape(m, k, n, bias, dtype),
                     Timed(timed)), Measurement(*self.figures), self.created_at, self.host)


@dataclass(frozen=True)
class EnvironmentCount:
    hash: str
    environment: Environment
    measurements: int


@dataclass(frozen=True)
class CacheStats:
    location: str
    backend: str  # "sqlite" | "postgresql"
    schema_version: int
    environments: int
    measurements: int
    profiles: int
    per_environment: tuple[EnvironmentCount, ...]
    oldest: datetime | None
    newest: datetime | None
    size_bytes: int | None


@dataclass(frozen=True)
class PruneReport:
    measurements: int
    environments: int


@dataclass(frozen=True)
class ExportReport:
    environments: int
    measurements: int
    profiles: int


@dataclass(frozen=True)
class ImportReport:
    """What an import or merge did. A conflict is a key present on both sides with different
    figures: the measurement with more samples is kept (the existing one on a tie)."""

    records: int
    environments_added: int
    inserted: int
    replaced: int  # conflicts won by the incoming measurement
    kept_existing: int  # conflicts won by the measurement already stored
    identical: int  # same key, same figures: nothing to write
    profiles_added: int
    profiles_kept: int  # a profile of that name existed and differed; the stored one was kept
    conflict_examples: tuple[str, ...] = ()

    @property
    def conflicts(self) -> int:
        return self.replaced + self.kept_existing
