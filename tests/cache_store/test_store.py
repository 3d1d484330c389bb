"""The SQL store's API on both backends: the Store protocol, browsing, profiles, stats, prune."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from autoquant.cache_db import SQLStore, StoredMeasurement
from autoquant.cache_db.migrations import SCHEMA_VERSION
from autoquant.cache_db.models import ENVIRONMENT_FIELD_COLUMNS, EnvironmentRow, MeasurementRow
from sqlalchemy import event, text, update

from autoquant.hardware import Environment
from autoquant.keys import Measurement, OpShape, Timed
from autoquant.store import Store

from .conftest import CPU_ENV, GPU_ENV
from .helpers import figures, key, model_keys


def test_environment_columns_cover_every_field() -> None:
    # A new Environment field needs a column and a migration: this trips when it has neither.
    fields = tuple(f.name for f in dataclasses.fields(Environment))
    assert set(ENVIRONMENT_FIELD_COLUMNS) == set(fields)
    assert set(fields) <= set(EnvironmentRow.__table__.c.keys())


def test_implements_the_store_protocol(store: SQLStore) -> None:
    assert isinstance(store, Store)


def test_round_trip_returns_equal_dataclasses(store: SQLStore) -> None:
    items = model_keys(CPU_ENV, 200)
    store.put_many(CPU_ENV, items)
    got = store.get_many(list(items))
    assert got == items
    assert all(type(k).__name__ == "BenchKey" and type(m) is Measurement for k, m in got.items())


def test_missing_keys_are_absent(store: SQLStore) -> None:
    present, absent = key(CPU_ENV, 1), key(CPU_ENV, 2)
    store.put_many(CPU_ENV, {present: figures()})
    assert set(store.get_many([present, absent, key(GPU_ENV, 1)])) == {present}
    assert store.get_many([]) == {}


@pytest.mark.parametrize("field,value", [
    ("candidate", "fp8"), ("params", '{"kernel":"triton"}'), ("version", 2),
    ("timed", Timed.MATMUL), ("m", 17), ("k", 97), ("n", 4096), ("bias", False),
    ("dtype", "float16"),
], ids=lambda v: str(v))
def test_every_key_part_distinguishes_rows(store: SQLStore, field: str, value: object) -> None:
    base = key(CPU_ENV, 16)
    if field in ("m", "k", "n", "bias", "dtype"):
        other = dataclasses.replace(base, op=dataclasses.replace(base.op, **{field: value}))
    else:
        other = dataclasses.replace(base, **{field: value})
    store.put_many(CPU_ENV, {base: figures(1e-5), other: figures(2e-5)})
    got = store.get_many([base, other])
    assert got[base].median_s == 1e-5 and got[other].median_s == 2e-5


def test_put_many_upserts(store: SQLStore) -> None:
    k = key(CPU_ENV)
    store.put_many(CPU_ENV, {k: figures(1e-5, samples=5)})
    store.put_many(CPU_ENV, {k: figures(3e-5, samples=9, load=None)})
    assert store.get_many([k])[k] == figures(3e-5, samples=9, load=None)
    assert len(store.measurements()) == 1


def test_environments_are_kept_apart(store: SQLStore) -> None:
    a, b = key(CPU_ENV), key(GPU_ENV)
    store.put_many(CPU_ENV, {a: figures(1e-5)})
    store.put_many(GPU_ENV, {b: figures(2e-5)})
    assert store.environments() == [CPU_ENV, GPU_ENV]
    assert [s.key for s in store.measurements(GPU_ENV.hash)] == [b]
    assert store.get_many([a, b]) == {a: figures(1e-5), b: figures(2e-5)}


def test_put_many_checks_the_environment(store: SQLStore) -> None:
    with pytest.raises(ValueError, match="env is"):
        store.put_many(GPU_ENV, {key(CPU_ENV): figures()})
    with pytest.raises(ValueError, match="not stored"):
        store.put_many(None, {key(CPU_ENV): figures()})
    store.put_many(CPU_ENV, {key(CPU_ENV, 1): figures()})
    store.put_many(None, {key(CPU_ENV, 2): figures()})  # known environment: fine
    assert len(store.measurements()) == 2


def test_get_many_is_one_query_and_put_many_one_transaction(store: SQLStore) -> None:
    items = model_keys(CPU_ENV, 200)
    statements: list[str] = []
    engine = store._engine

    def listener(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(engine, "before_cursor_execute", listener)
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    try:
        store.put_many(CPU_ENV, items)
        assert len(commits) == 1
        statements.clear()
        store.get_many(list(items))
        assert [s for s in statements if s not in ("BEGIN",)] == ["WITH" if
                store.backend == "sqlite" else "SELECT"]
    finally:
        event.remove(engine, "before_cursor_execute", listener)


def test_measurements_carry_host_and_server_time(store: SQLStore) -> None:
    store.put_many(CPU_ENV, {key(CPU_ENV): figures()})
    (row,) = store.measurements()
    assert isinstance(row, StoredMeasurement)
    assert row.host and row.created_at is not None and row.created_at.tzinfo is not None


def test_to_dataframe(store: SQLStore) -> None:
    store.put_many(CPU_ENV, model_keys(CPU_ENV, 30))
    frame = store.to_dataframe()
    assert len(frame) == 30
    assert {"env_hash", "sku", "candidate", "m", "k", "n", "bias", "timed", "median_s",
            "samples", "created_at", "host"} <= set(frame.columns)
    assert frame["bias"].dtype == bool and str(frame["created_at"].dt.tz) == "UTC"


def test_shape_profiles(store: SQLStore) -> None:
    ops = {OpShape(50, 384, 1536, True, "float32"): 12, OpShape(1, 384, 384, False, "float32"): 2}
    store.save_profile("minilm", "sha256:abc", ops)
    prof = store.load_profile("minilm")
    assert prof.counts() == ops and prof.model_fingerprint == "sha256:abc"
    store.save_profile("minilm", "sha256:def", {OpShape(4097, 8, 8, True, "float16"): 1})
    assert store.load_profile("minilm").model_fingerprint == "sha256:def"
    assert [p.name for p in store.list_profiles()] == ["minilm"]
    with pytest.raises(KeyError, match="minilm"):
        store.load_profile("nope")


def test_stats(store: SQLStore) -> None:
    store.put_many(CPU_ENV, model_keys(CPU_ENV, 20))
    store.put_many(GPU_ENV, {key(GPU_ENV): figures()})
    s = store.stats()
    assert (s.environments, s.measurements, s.profiles) == (2, 21, 0)
    assert {e.hash: e.measurements for e in s.per_environment} == {CPU_ENV.hash: 20,
                                                                   GPU_ENV.hash: 1}
    assert s.oldest is not None and s.size_bytes and s.schema_version == SCHEMA_VERSION


def _age_rows(store: SQLStore, days: int) -> None:
    with store._engine.begin() as conn:
        old = store.bind_time(store.measurements()[0].created_at - timedelta(days=days))
        conn.execute(update(MeasurementRow).where(MeasurementRow.m == 1).values(created_at=old))


def test_prune_by_age_and_environment(store: SQLStore) -> None:
    store.put_many(CPU_ENV, {key(CPU_ENV, 1): figures(), key(CPU_ENV, 2): figures()})
    store.put_many(GPU_ENV, {key(GPU_ENV, 2): figures()})
    _age_rows(store, 40)
    with pytest.raises(ValueError):
        store.prune()
    r = store.prune(older_than=timedelta(days=30))
    assert (r.measurements, r.environments) == (1, 0)
    assert [s.key.op.m for s in store.measurements(CPU_ENV.hash)] == [2]
    r = store.prune(foreign_to=CPU_ENV)
    assert (r.measurements, r.environments) == (1, 1)
    assert store.environments() == [CPU_ENV]


def test_prune_foreign_to_an_unknown_environment_drops_everything(store: SQLStore) -> None:
    store.put_many(CPU_ENV, {key(CPU_ENV): figures()})
    assert store.prune(foreign_to=GPU_ENV).measurements == 1


def test_describe_masks_the_password(store_url: str, store: SQLStore) -> None:
    if store.backend == "sqlite":
        assert store.describe() == store_url.removeprefix("sqlite:///")
    else:
        password = store_url.split(":")[2].split("@")[0]
        assert password not in store.describe() and "***" in store.describe()


def test_foreign_keys_are_enforced(store: SQLStore) -> None:
    # IntegrityError, wrapped differently per driver
    with pytest.raises(Exception), store._engine.begin() as conn:  # noqa: B017
        conn.execute(text("INSERT INTO measurements (env_id, candidate, params, version, m, k, "
                          "n, bias, dtype, timed, median_s, p25_s, p75_s, samples, host) VALUES "
                          "(999, 'x', '{}', 1, 1, 1, 1, false, 'float32', 'full', 1, 1, 1, 1, "
                          "'')"))


@pytest.mark.postgres
def test_postgres_lookups_probe_the_unique_index_whatever_the_statistics(postgres_url: str
                                                                          ) -> None:
    # A plan made (and prepared) while the table is empty must still probe the index per key
    # once the table is large, or a lookup scans a whole environment per key.
    import psycopg
    from autoquant.cache_db.lookup import _PG_SQL
    from autoquant.cache_db.records import key_values

    store = SQLStore(postgres_url)
    store.close()
    keys = list(model_keys(CPU_ENV, 50))
    columns = list(zip(*(key_values(k) for k in keys)))
    params = (list(range(len(keys))), *(list(c) for c in columns), CPU_ENV.hash)
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + _PG_SQL, params))
    assert "Index Scan using uq_measurements_key" in plan and "Hash Join" not in plan, plan
