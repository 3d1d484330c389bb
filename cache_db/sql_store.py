"""SQLStore: the tuning cache behind SQLAlchemy, one class for a SQLite file and PostgreSQL.

>>> from autoquant.keys import OpShape, Timed, BenchKey, Measurement
>>> from autoquant.hardware import environment
>>> env = environment("cpu")
>>> store = SQLStore("sqlite://")  # in memory; pass a path or a postgresql+psycopg:// URL
>>> key = BenchKey(env.hash, "float", "{}", 1, OpShape(16, 64, 64, False, "float32"), Timed.FULL)
>>> store.put_many(env, {key: Measurement(2e-6, 1.9e-6, 2.2e-6, 25)})
>>> store.get_many([key])[key].samples
25
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, exists, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL

from ..hardware import Environment
from ..keys import BenchKey, Measurement, OpShape, Timed
from . import transfer
from .engine import (
    make_engine,
    mask_url,
    parse_spec,
    preflight_sqlite,
    probe_sqlite,
    run_transaction,
    sqlite_file,
)
from .lookup import fetch_figures
from .migrations import (
    SCHEMA_VERSION,
    check_readable_version,
    ensure_schema,
    foreign_database_error,
    newer_schema_error,
)
from .models import (
    ENVIRONMENT_FIELD_COLUMNS,
    EnvironmentRow,
    MeasurementRow,
    ShapeProfileRow,
)
from .records import (
    CacheStats,
    EnvironmentCount,
    ExportReport,
    ImportReport,
    PruneReport,
    ShapeProfile,
    StoredMeasurement,
    as_utc,
)
from .upsert import upsert_rows

if TYPE_CHECKING:
    import pandas

__all__ = ["SQLStore"]

M = MeasurementRow.__table__
E = EnvironmentRow.__table__
P = ShapeProfileRow.__table__
# The key columns after env_id, in the unique index's order.
_KEY_COLS = (M.c.candidate, M.c.m, M.c.k, M.c.n, M.c.dtype, M.c.bias, M.c.timed, M.c.params,
             M.c.version)
_FIGURES = (M.c.median_s, M.c.p25_s, M.c.p75_s, M.c.samples, M.c.load_avg)


def _key_from_row(env_hash: str, row: Sequence[Any]) -> BenchKey:
    candidate, m, k, n, dtype, bias, timed, params, version = row[:9]
    return BenchKey(env_hash, candidate, params, version, OpShape(m, k, n, bool(bias), dtype),
                    Timed(timed))


def _figures(row: Sequence[Any]) -> Measurement:
    return Measurement(row[0], row[1], row[2], row[3], row[4])


class SQLStore:
    """A persistent, shareable Store (see autoquant.store.Store) on SQLite or PostgreSQL.

    Opening checks the database first and raises CacheUnavailableError for one that is corrupt,
    unreadable, read-only, not a cache, or newer than this code; an older schema is upgraded.
    Every method is one transaction, retried while another writer holds a lock."""

    def __init__(self, url_or_path: str | os.PathLike[str] | URL) -> None:
        self._url = url_or_path if isinstance(url_or_path, URL) else parse_spec(url_or_path)
        self._path = sqlite_file(self._url)
        self.backend = self._url.get_backend_name()
        if self._path is not None:
            self._location = str(self._path)
            preflight_sqlite(self._path)
            tables, version = probe_sqlite(self._path)
            if version is not None and version > SCHEMA_VERSION:
                raise newer_schema_error(self._location, version)
            if tables and version is None:
                raise foreign_database_error(self._location)
        elif self.backend == "sqlite":
            self._location = "sqlite memory"
        else:
            self._location = mask_url(self._url)
        self._engine = make_engine(self._url)
        self._host = socket.gethostname()
        try:
            if self._path is None:  # a server: refuse a newer schema before taking write locks
                self._read(lambda c: check_readable_version(c, self._location))
            self.upgraded_from, self.schema_version = run_transaction(
                self._engine, self._location, lambda c: ensure_schema(c, self._location),
                write=True)
        except BaseException:
            self._engine.dispose()
            raise

    # ---- plumbing -------------------------------------------------------------------------

    def _read(self, fn, snapshot: bool = True):
        return run_transaction(self._engine, self._location, fn, write=False, snapshot=snapshot)

    def _write(self, fn):
        return run_transaction(self._engine, self._location, fn, write=True)

    def _insert(self, table):
        return (sqlite_insert if self.backend == "sqlite" else pg_insert)(table)

    @property
    def in_memory(self) -> bool:
        """An in-memory SQLite database: one connection, visible to this process only."""
        return self.backend == "sqlite" and self._path is None

    def describe(self) -> str:
        """The SQLite file path, or the URL with its password masked."""
        return self._location

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SQLStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLStore({self._location!r})"

    # ---- the Store protocol ---------------------------------------------------------------

    def fetch_existing(self, conn: Connection, keys: Iterable[BenchKey]
                       ) -> dict[BenchKey, Measurement]:
        """get_many inside the caller's transaction (see :mod:`.lookup`)."""
        return fetch_figures(conn, list(keys))

    def get_many(self, keys: Iterable[BenchKey]) -> dict[BenchKey, Measurement]:
        """The stored measurements among `keys`; a batch from one environment is one query."""
        keys = list(keys)
        if not keys:
            return {}
        return self._read(lambda conn: self.fetch_existing(conn, keys), snapshot=False)

    def measured_ms(self, env_hash: str, k: int, n: int, bias: bool, dtype: str) -> set[int]:
        """Every M with a measurement of the shape (K, N, bias, dtype) in `env_hash` (any candidate)."""
        stmt = (select(M.c.m).distinct().join(E, E.c.id == M.c.env_id)
                .where(E.c.hash == env_hash, M.c.k == k, M.c.n == n, M.c.bias == bias, M.c.dtype == dtype))
        return {int(r[0]) for r in self._read(lambda conn: conn.execute(stmt).all(), snapshot=False)}

    def ensure_environments(self, conn: Connection, envs: Iterable[Environment],
                            hashes: Iterable[str]) -> dict[str, int]:
        """Insert missing environment rows; return {hash: id} for `hashes` that exist."""
        rows = [{"hash": e.hash, **e.to_dict()} for e in envs]
        if rows:
            stmt = self._insert(E).on_conflict_do_nothing(index_elements=["hash"])
            conn.execute(stmt, sorted(rows, key=lambda r: r["hash"]))
        wanted = sorted(set(hashes))
        return dict(conn.execute(select(E.c.hash, E.c.id).where(E.c.hash.in_(wanted))).all())

    def upsert_measurements(self, conn: Connection, rows: list[tuple], *,
                            better_sampled_only: bool = False) -> None:
        """Insert or update rows made by :meth:`measurement_row` (see :mod:`.upsert`)."""
        upsert_rows(conn, rows, better_sampled_only=better_sampled_only)

    def measurement_row(self, env_id: int, key: BenchKey, m: Measurement, host: str,
                        created: Any = None) -> tuple:
        """Column values in upsert.ROW_COLUMNS order, as the driver takes them; `created` is a
        :meth:`driver_time` value, or None for the server's clock."""
        op = key.op
        row = (env_id, key.candidate, key.params, key.version, op.m, op.k, op.n, op.bias,
               op.dtype, key.timed.value, m.median_s, m.p25_s, m.p75_s, m.samples, m.load_avg,
               host)
        return row if created is None else (*row, created)

    def bind_time(self, value: datetime) -> datetime:
        """A timestamp for SQLAlchemy statements. SQLite keeps CURRENT_TIMESTAMP's naive UTC
        text, so times are compared and stored in that convention there."""
        value = as_utc(value)
        return value.replace(tzinfo=None) if self.backend == "sqlite" else value

    def driver_time(self, value: datetime) -> Any:
        """A timestamp for driver-level statements (the text SQLAlchemy's SQLite DateTime
        writes and reads; a timezone-aware datetime for psycopg)."""
        value = self.bind_time(value)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f") if self.backend == "sqlite" else value

    def put_many(self, env: Environment | None, items: Mapping[BenchKey, Measurement]) -> None:
        """Upsert `items` in one transaction. `env` must be the environment every key names
        (its row is written if new); None only when that environment is already stored."""
        if not items:
            return
        hashes = {k.env_hash for k in items}
        if env is not None and hashes != {env.hash}:
            raise ValueError(f"put_many: keys name environments {sorted(hashes)} but env is "
                             f"{env.hash}")

        def work(conn: Connection) -> None:
            ids = self.ensure_environments(conn, [env] if env else [], hashes)
            missing = hashes - ids.keys()
            if missing:
                raise ValueError(f"put_many: environments {sorted(missing)} are not stored in "
                                 f"{self._location}; pass the Environment")
            self.upsert_measurements(
                conn, [self.measurement_row(ids[k.env_hash], k, m, self._host)
                       for k, m in items.items()])

        self._write(work)

    # ---- browsing -------------------------------------------------------------------------

    def environments(self) -> list[Environment]:
        cols = [E.c[name] for name in ENVIRONMENT_FIELD_COLUMNS]
        rows = self._read(lambda c: c.execute(select(*cols).order_by(E.c.id)).all())
        return [Environment(**dict(zip(ENVIRONMENT_FIELD_COLUMNS, r))) for r in rows]

    def iter_measurement_rows(self, conn: Connection, env_hash: str | None = None,
                              env_ids: Sequence[int] | None = None):
        """Stream (env hash, key columns..., figures..., created_at, host) rows."""
        stmt = (select(E.c.hash, *_KEY_COLS, *_FIGURES, M.c.created_at, M.c.host)
                .join_from(M, E, M.c.env_id == E.c.id).order_by(M.c.id))
        if env_hash is not None:
            stmt = stmt.where(E.c.hash == env_hash)
        if env_ids is not None:
            stmt = stmt.where(M.c.env_id.in_(list(env_ids)))
        return conn.execution_options(yield_per=10_000).execute(stmt)

    @staticmethod
    def stored_from_row(row: Sequence[Any]) -> StoredMeasurement:
        return StoredMeasurement(_key_from_row(row[0], row[1:10]), _figures(row[10:15]),
                                 as_utc(row[15]), row[16])

    def measurements(self, env_hash: str | None = None) -> list[StoredMeasurement]:
        """Every stored measurement (of one environment if `env_hash` is given), oldest id first."""
        return self._read(lambda c: [self.stored_from_row(r)
                                     for r in self.iter_measurement_rows(c, env_hash)])

    def to_dataframe(self) -> pandas.DataFrame:
        """One row per measurement, environment columns included (for reports and notebooks)."""
        import pandas as pd

        cols = [E.c.hash.label("env_hash"), E.c.device_kind, E.c.sku, *_KEY_COLS, *_FIGURES,
                M.c.created_at, M.c.host]
        stmt = select(*cols).join_from(M, E, M.c.env_id == E.c.id).order_by(M.c.id)
        rows = self._read(lambda c: c.execute(stmt).all())
        names = [c.name for c in cols]
        frame = pd.DataFrame({n: [r[i] for r in rows] for i, n in enumerate(names)}, columns=names)
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        frame["bias"] = frame["bias"].astype(bool)
        return frame

    # ---- shape profiles -------------------------------------------------------------------

    def save_profile(self, name: str, model_fingerprint: str,
                     ops: Mapping[OpShape, int]) -> None:
        """Store (or replace) the named profile of a model's ops and their counts."""
        row = {"name": name, "model_fingerprint": model_fingerprint,
               "ops": transfer.profile_ops_json(ops.items())}
        ins = self._insert(P)
        stmt = ins.on_conflict_do_update(
            index_elements=["name"], set_={"model_fingerprint": ins.excluded.model_fingerprint,
                                           "ops": ins.excluded.ops, "created_at": func.now()})
        self._write(lambda c: c.execute(stmt, [row]))

    def load_profile(self, name: str) -> ShapeProfile:
        """The named profile; KeyError naming the stored ones if there is none."""
        row = self._read(lambda c: c.execute(select(P).where(P.c.name == name)).first())
        if row is None:
            known = [p.name for p in self.list_profiles()]
            raise KeyError(f"no shape profile {name!r} in {self._location}; stored: {known}")
        return transfer.profile_from_row(row)

    def list_profiles(self) -> list[ShapeProfile]:
        rows = self._read(lambda c: c.execute(select(P).order_by(P.c.name)).all())
        return [transfer.profile_from_row(r) for r in rows]

    # ---- maintenance ----------------------------------------------------------------------

    def stats(self) -> CacheStats:
        def work(conn: Connection) -> CacheStats:
            counts = conn.execute(
                select(E, func.count(M.c.id)).join_from(E, M, M.c.env_id == E.c.id, isouter=True)
                .group_by(*E.c).order_by(E.c.id)).all()
            oldest, newest = conn.execute(select(func.min(M.c.created_at),
                                                 func.max(M.c.created_at))).one()
            per_env = tuple(
                EnvironmentCount(r.hash, Environment(**{n: r._mapping[n]
                                                        for n in ENVIRONMENT_FIELD_COLUMNS}),
                                 int(r[-1])) for r in counts)
            if self.backend == "postgresql":
                size = conn.scalar(select(func.pg_database_size(func.current_database())))
            else:
                size = self._file_size()
            return CacheStats(
                self._location, self.backend, self.schema_version, len(per_env),
                sum(e.measurements for e in per_env), conn.scalar(select(func.count(P.c.id))),
                per_env, as_utc(_parse_time(oldest)), as_utc(_parse_time(newest)), size)

        return self._read(work)

    def _file_size(self) -> int | None:
        if self._path is None:
            return None
        return sum(os.path.getsize(p) for p in (self._path, f"{self._path}-wal")
                   if os.path.exists(p))

    def prune(self, older_than: timedelta | None = None,
              foreign_to: Environment | None = None) -> PruneReport:
        """Delete measurements taken more than `older_than` ago, and/or every measurement of an
        environment other than `foreign_to` (a row matching either goes); then environments left
        without measurements. Returns what was deleted."""
        if older_than is None and foreign_to is None:
            raise ValueError("prune: give older_than and/or foreign_to")
        conds = []
        if older_than is not None:
            conds.append(M.c.created_at < self.bind_time(datetime.now(timezone.utc) - older_than))
        if foreign_to is not None:
            conds.append(M.c.env_id.not_in(select(E.c.id).where(E.c.hash == foreign_to.hash)))

        def work(conn: Connection) -> PruneReport:
            gone = conn.execute(delete(M).where(or_(*conds))).rowcount
            orphan = ~exists(select(M.c.id).where(M.c.env_id == E.c.id))
            envs = conn.execute(delete(E).where(orphan)).rowcount
            return PruneReport(int(gone), int(envs))

        return self._write(work)

    # ---- exchange -------------------------------------------------------------------------

    def export_jsonl(self, fh: IO[str], sku: str | None = None) -> ExportReport:
        """Write the cache as JSON lines; `sku` keeps only environments whose SKU contains it
        (case-insensitive; shape profiles are then left out)."""
        return transfer.export_jsonl(self, fh, sku)

    def import_jsonl(self, fh: Iterable[str]) -> ImportReport:
        """Validate every line, then write all of it in one transaction (or nothing: a bad line
        raises CacheImportError with its number). On a key already stored with other figures the
        better-sampled measurement stays; conflicts are counted in the report."""
        return transfer.import_jsonl(self, fh)

    def merge(self, other: SQLStore) -> ImportReport:
        """Copy every environment, measurement and profile of `other` in, with import's rules."""
        return transfer.merge(self, other)


def _parse_time(value: Any) -> datetime | None:
    # min()/max() over a SQLite DATETIME column come back as text, not datetime.
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))
