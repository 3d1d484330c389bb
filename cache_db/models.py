"""The tuning cache schema as SQLAlchemy 2.0 typed models (DESIGN.md section 6).

The store reads and writes through these tables with Core statements and hands out plain
dataclasses (:mod:`.records`), never ORM rows. Any change here needs a migration in
:mod:`.migrations` and a bump of ``SCHEMA_VERSION`` there.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ENVIRONMENT_FIELD_COLUMNS",
    "MEASUREMENT_FIGURE_COLUMNS",
    "MEASUREMENT_KEY_COLUMNS",
    "Base",
    "EnvironmentRow",
    "MeasurementRow",
    "SchemaVersionRow",
    "ShapeProfileRow",
    "WorkClaimRow",
]

# SQLite only auto-numbers an INTEGER PRIMARY KEY (the rowid alias); PostgreSQL gets a 64-bit id.
_BigId = BigInteger().with_variant(Integer(), "sqlite")
_Timestamp = DateTime(timezone=True)

# The measurement identity, in the unique index's order (env first: every lookup filters on it).
MEASUREMENT_KEY_COLUMNS = ("env_id", "candidate", "m", "k", "n", "dtype", "bias", "timed", "params",
                           "version")
MEASUREMENT_FIGURE_COLUMNS = ("median_s", "p25_s", "p75_s", "samples", "load_avg")
# Every field of autoquant.hardware.Environment; a test checks this matches the dataclass.
ENVIRONMENT_FIELD_COLUMNS = ("device_kind", "sku", "capability", "units", "memory_mb", "driver",
                             "cuda", "torch", "triton", "autoquant")


class Base(DeclarativeBase):
    pass


class SchemaVersionRow(Base):
    """One row (id 1) holding the schema version the file was last written with."""

    __tablename__ = "schema_version"
    __table_args__ = (CheckConstraint("id = 1", name="ck_schema_version_single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer)


class EnvironmentRow(Base):
    """A device + software fingerprint; `hash` is ``Environment.hash`` (the BenchKey env_hash)."""

    __tablename__ = "environments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[str] = mapped_column(Text, unique=True)
    device_kind: Mapped[str] = mapped_column(Text)
    sku: Mapped[str] = mapped_column(Text)
    capability: Mapped[str] = mapped_column(Text)
    units: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    driver: Mapped[str] = mapped_column(Text)
    cuda: Mapped[str] = mapped_column(Text)
    torch: Mapped[str] = mapped_column(Text)
    triton: Mapped[str] = mapped_column(Text)
    autoquant: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_Timestamp, server_default=func.now())


class MeasurementRow(Base):
    """One raw timing. Unique on everything but the figures, created_at and host: writes upsert."""

    __tablename__ = "measurements"
    __table_args__ = (
        UniqueConstraint(*MEASUREMENT_KEY_COLUMNS, name="uq_measurements_key"),
        CheckConstraint("timed IN ('full', 'matmul', 'relu', 'eager')", name="ck_measurements_timed"),
        CheckConstraint("m >= 0 AND k > 0 AND n > 0", name="ck_measurements_shape"),
        CheckConstraint("samples >= 1", name="ck_measurements_samples"),
        CheckConstraint("median_s >= 0 AND p25_s >= 0 AND p75_s >= 0",
                        name="ck_measurements_times"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True)
    env_id: Mapped[int] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"))
    candidate: Mapped[str] = mapped_column(Text)
    params: Mapped[str] = mapped_column(Text)  # canonical JSON of the candidate's params
    version: Mapped[int] = mapped_column(Integer)
    m: Mapped[int] = mapped_column(BigInteger)
    k: Mapped[int] = mapped_column(BigInteger)
    n: Mapped[int] = mapped_column(BigInteger)
    bias: Mapped[bool] = mapped_column(Boolean)
    dtype: Mapped[str] = mapped_column(Text)
    timed: Mapped[str] = mapped_column(Text)  # 'full' | 'matmul' | 'relu' | 'eager' (autoquant.keys.Timed)
    median_s: Mapped[float] = mapped_column(Float)
    p25_s: Mapped[float] = mapped_column(Float)
    p75_s: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    load_avg: Mapped[float | None] = mapped_column(Float, nullable=True)
    host: Mapped[str] = mapped_column(Text, server_default="")
    created_at: Mapped[datetime] = mapped_column(_Timestamp, server_default=func.now())


class ShapeProfileRow(Base):
    """The op shapes (and how often each ran) recorded from a model, kept to tune without it."""

    __tablename__ = "shape_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    model_fingerprint: Mapped[str] = mapped_column(Text)
    ops: Mapped[str] = mapped_column(Text)  # JSON list of {m, k, n, bias, dtype, count}
    created_at: Mapped[datetime] = mapped_column(_Timestamp, server_default=func.now())


class WorkClaimRow(Base):
    """One unit of pre-tuning work (an op and a candidate set, ``unit``) for one environment,
    claimed by a worker until ``lease_until``; ``state`` 'done' once its measurements are written.

    A worker that dies leaves its claim 'claimed' with a lease that runs out; another worker then
    takes it over (``attempts`` counts the takes). Times are the workers' UTC clocks."""

    __tablename__ = "work_claims"
    __table_args__ = (
        UniqueConstraint("env_hash", "unit", name="uq_work_claims_unit"),
        CheckConstraint("state IN ('claimed', 'done')", name="ck_work_claims_state"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True)
    env_hash: Mapped[str] = mapped_column(Text)
    unit: Mapped[str] = mapped_column(Text)  # canonical JSON: the op and its candidate set's digest
    state: Mapped[str] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(Text)  # "host:pid" of the worker holding or finishing it
    claimed_at: Mapped[datetime] = mapped_column(_Timestamp)
    lease_until: Mapped[datetime] = mapped_column(_Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(_Timestamp, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, server_default="1")
