"""Schema versions and the forward-only migration runner.

Each entry of ``MIGRATIONS`` upgrades a database from version N to N+1 inside the caller's write
transaction; opening a store runs every step the file still needs, in order. A database newer than
``SCHEMA_VERSION`` is refused before anything is written to it.

History
  v1  schema_version, environments, measurements without `load_avg` and `host`.
  v2  measurements gain `load_avg` (nullable) and `host` (default ''); shape_profiles added.
  v3  work_claims added (pre-tuning workers' claims on units of work, issue 17).
  v4  measurements.timed may be 'eager' (CUDA: synchronized eager calls, issue 13); SQLite cannot
      alter a CHECK constraint, so the table is rebuilt there with its rows and ids.

To change the schema: edit :mod:`.models`, append a migration that turns the previous version into
the new one (its DDL frozen here, not read from the models, which keep changing), bump
``SCHEMA_VERSION``, and extend tests/cache_store/test_migrations.py with a database of the old version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
)

from .errors import CacheUnavailableError
from .models import Base, SchemaVersionRow

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Migration",
    "check_readable_version",
    "ensure_schema",
    "newer_schema_error",
]

SCHEMA_VERSION = 4
# Any fixed number: PostgreSQL sessions migrating the same database queue on this advisory lock.
_PG_MIGRATION_LOCK = 0x6175746F71  # "autoq"


@dataclass(frozen=True)
class Migration:
    from_version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_to_v2(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE measurements ADD COLUMN load_avg FLOAT"))
    conn.execute(text("ALTER TABLE measurements ADD COLUMN host TEXT DEFAULT '' NOT NULL"))
    frozen = MetaData()
    Table(
        "shape_profiles", frozen,
        Column("id", Integer, primary_key=True),
        Column("name", Text, nullable=False, unique=True),
        Column("model_fingerprint", Text, nullable=False),
        Column("ops", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    ).create(conn)


def _v2_to_v3(conn: Connection) -> None:
    frozen = MetaData()
    Table(
        "work_claims", frozen,
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("env_hash", Text, nullable=False),
        Column("unit", Text, nullable=False),
        Column("state", Text, nullable=False),
        Column("owner", Text, nullable=False),
        Column("claimed_at", DateTime(timezone=True), nullable=False),
        Column("lease_until", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True), nullable=True),
        Column("attempts", Integer, server_default="1", nullable=False),
        UniqueConstraint("env_hash", "unit", name="uq_work_claims_unit"),
        CheckConstraint("state IN ('claimed', 'done')", name="ck_work_claims_state"),
    ).create(conn)


_TIMED_V4 = "timed IN ('full', 'matmul', 'relu', 'eager')"


def _v3_to_v4(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # By name where create_all made it; a v1 file's inline check got PostgreSQL's own name.
        old = conn.execute(text(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'measurements'::regclass AND contype = 'c' "
            "AND pg_get_constraintdef(oid) LIKE '%timed%'")).scalars().all()
        for name in old:
            conn.execute(text(f'ALTER TABLE measurements DROP CONSTRAINT "{name}"'))
        conn.execute(text(f"ALTER TABLE measurements ADD CONSTRAINT ck_measurements_timed CHECK ({_TIMED_V4})"))
        return
    # SQLite: create the v4 table beside the old one, copy every row (ids kept), swap the names.
    frozen = MetaData()
    Table("environments", frozen, Column("id", Integer, primary_key=True))
    table = Table(
        "measurements_v4", frozen,
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("env_id", ForeignKey("environments.id", ondelete="CASCADE"), nullable=False),
        Column("candidate", Text, nullable=False),
        Column("params", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("m", BigInteger, nullable=False),
        Column("k", BigInteger, nullable=False),
        Column("n", BigInteger, nullable=False),
        Column("bias", Boolean, nullable=False),
        Column("dtype", Text, nullable=False),
        Column("timed", Text, nullable=False),
        Column("median_s", Float, nullable=False),
        Column("p25_s", Float, nullable=False),
        Column("p75_s", Float, nullable=False),
        Column("samples", Integer, nullable=False),
        Column("load_avg", Float, nullable=True),
        Column("host", Text, server_default="", nullable=False),
        Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
        UniqueConstraint("env_id", "candidate", "m", "k", "n", "dtype", "bias", "timed", "params", "version",
                         name="uq_measurements_key"),
        CheckConstraint(_TIMED_V4, name="ck_measurements_timed"),
        CheckConstraint("m >= 0 AND k > 0 AND n > 0", name="ck_measurements_shape"),
        CheckConstraint("samples >= 1", name="ck_measurements_samples"),
        CheckConstraint("median_s >= 0 AND p25_s >= 0 AND p75_s >= 0", name="ck_measurements_times"),
    )
    table.create(conn)
    cols = ", ".join(c.name for c in table.columns)
    conn.execute(text(f"INSERT INTO measurements_v4 ({cols}) SELECT {cols} FROM measurements"))
    conn.execute(text("DROP TABLE measurements"))
    conn.execute(text("ALTER TABLE measurements_v4 RENAME TO measurements"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "measurements.load_avg and .host; shape_profiles table", _v1_to_v2),
    Migration(2, "work_claims table", _v2_to_v3),
    Migration(3, "measurements.timed may be 'eager'", _v3_to_v4),
)
assert [m.from_version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION))


def newer_schema_error(location: str, found: int) -> CacheUnavailableError:
    return CacheUnavailableError(
        location,
        f"was written by a newer autoquant (schema version {found}; this one knows up to "
        f"{SCHEMA_VERSION}). It was left untouched",
        "Upgrade autoquant (pip install -U autoquant-tuner), or set AUTOQUANT_CACHE_URL to "
        "another location.")


def foreign_database_error(location: str) -> CacheUnavailableError:
    return CacheUnavailableError(
        location, "holds tables but no autoquant schema_version: it is not a tuning cache",
        "Point AUTOQUANT_CACHE_URL (or the cache argument) at another file or database.")


def _read(conn: Connection, location: str) -> tuple[bool, int | None]:
    """(has tables, schema version or None)."""
    tables = set(inspect(conn).get_table_names())
    if "schema_version" not in tables:
        return bool(tables), None
    version = conn.scalar(select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1))
    if version is None:
        raise foreign_database_error(location)
    return True, int(version)


def check_readable_version(conn: Connection, location: str) -> None:
    """Raise before any write if the database is newer than this code or not ours."""
    has_tables, version = _read(conn, location)
    if version is None and has_tables:
        raise foreign_database_error(location)
    if version is not None and version > SCHEMA_VERSION:
        raise newer_schema_error(location, version)


def ensure_schema(conn: Connection, location: str) -> tuple[int | None, int]:
    """Create the schema in an empty database or upgrade an older one, in the caller's write
    transaction. Returns (version found or None for a new database, version now)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
    has_tables, found = _read(conn, location)
    if found is None:
        if has_tables:
            raise foreign_database_error(location)
        Base.metadata.create_all(conn)
        conn.execute(SchemaVersionRow.__table__.insert().values(id=1, version=SCHEMA_VERSION))
        return None, SCHEMA_VERSION
    if found > SCHEMA_VERSION:
        raise newer_schema_error(location, found)
    if found < 1:
        raise foreign_database_error(location)
    for step in MIGRATIONS[found - 1:]:
        step.apply(conn)
        conn.execute(SchemaVersionRow.__table__.update().values(version=step.from_version + 1))
    return found, SCHEMA_VERSION
