"""Reliability with real files and a real server: concurrent writers, SIGKILL mid-write, and
every way a cache file can be unusable (each must give CacheUnavailableError naming the file and
a remedy, and leave the file exactly as it was)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoquant.cache_db import (
    CacheUnavailableError,
    SQLStore,
    open_store,
    open_store_or_memory,
)

from autoquant.store import MemoryStore
from autoquant.store import SafeStore

from .conftest import CPU_ENV, TEST_DB
from .helpers import figures, key, run_unprivileged
from .stress import (
    STRESS_ENV,
    batch_keys,
    figures_for,
    overlapping_keys,
    run_overlapping_writers,
    write_until_killed,
)

WRITERS = 8


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A cache that child processes open by URL (a fresh file, or a fresh PostgreSQL schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module")
def concurrent_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, object]:
    """One set of 8 spawned writers, run against a SQLite file and then (when a server is
    available) a PostgreSQL database: each process imports torch, which costs seconds."""
    urls = {"sqlite": f"sqlite:///{tmp_path_factory.mktemp('concurrent') / 'shared.sqlite'}"}
    try:
        server = request.getfixturevalue("postgres_server")
        urls["postgresql"] = server.create_schema(TEST_DB, "concurrent")
    except pytest.skip.Exception:
        pass  # test_concurrent_writers_lose_nothing[postgresql] reports the skip itself
    codes = run_overlapping_writers(list(urls.values()), WRITERS)
    return {"urls": urls, "codes": codes}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql",
                                                            marks=pytest.mark.postgres)])
def test_concurrent_writers_lose_nothing(request: pytest.FixtureRequest, backend: str,
                                         concurrent_run: dict) -> None:
    if backend == "postgresql":
        request.getfixturevalue("postgres_server")  # skip (or fail under CI) without a server
    assert concurrent_run["codes"] == [0] * WRITERS, "a writer failed: see its traceback above"
    writers_of: dict = {}
    for w in range(WRITERS):
        for k in overlapping_keys(w):
            writers_of.setdefault(k, set()).add(w)
    with SQLStore(concurrent_run["urls"][backend]) as store:
        rows = store.measurements()
    assert len(rows) == len(writers_of)  # no duplicate
    assert {r.key for r in rows} == set(writers_of)  # no lost row
    for r in rows:  # each row holds one writer's complete figures
        assert r.measurement in [figures_for(r.key, w) for w in writers_of[r.key]]


def test_sigkill_mid_write_keeps_every_committed_batch(shared_url: str) -> None:
    size = 400
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=write_until_killed, args=(shared_url, sender, size))
    child.start()
    sender.close()
    committed: list[int] = []
    try:
        while len(committed) < 8:
            assert receiver.poll(120), "the writer reported no commit in 120 s"
            committed.append(receiver.recv())
        time.sleep(random.uniform(0, 0.02))  # land somewhere inside a later transaction
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    while receiver.poll(0.2):  # commits reported just before the kill
        try:
            committed.append(receiver.recv())
        except EOFError:
            break
    with SQLStore(shared_url) as store:
        counts: dict[str, int] = {}
        for r in store.measurements():
            counts[r.key.candidate] = counts.get(r.key.candidate, 0) + 1
        for batch in committed:
            got = store.get_many(batch_keys(batch, size))
            assert len(got) == size, f"committed batch {batch} lost rows"
    assert all(c == size for c in counts.values()), f"a partial batch is visible: {counts}"
    if shared_url.startswith("sqlite"):
        path = shared_url.removeprefix("sqlite:///")
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()


# ---- unusable files ----------------------------------------------------------------------

def _expect_unavailable(spec: str | Path, *needles: str) -> str:
    with pytest.raises(CacheUnavailableError) as info:
        SQLStore(spec)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(random.Random(1).randbytes(20_000))
    before = path.read_bytes()
    _expect_unavailable(path, str(path), "not a readable SQLite database", "Move it aside")
    assert path.read_bytes() == before and not Path(f"{path}-wal").exists()


def test_garbage_after_a_valid_header(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + random.Random(2).randbytes(8192))
    before = path.read_bytes()
    _expect_unavailable(path, str(path), "Move it aside")
    assert path.read_bytes() == before


def test_damaged_pages_fail_at_use_and_the_tuner_carries_on(tmp_path: Path, caplog) -> None:
    path = tmp_path / "cache.sqlite"
    with SQLStore(path) as store:
        for b in range(5):
            store.put_many(STRESS_ENV, {k: figures_for(k, 0) for k in batch_keys(b, 400)})
    data = bytearray(path.read_bytes())
    noise = random.Random(3).randbytes(len(data) - 6 * 4096)
    data[6 * 4096:] = noise  # keep the schema pages, wreck the data and index pages
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    opened, warning = open_store_or_memory(path)
    assert warning is None and isinstance(opened, SQLStore)
    store = SafeStore(opened)  # what the tuner wraps every store in
    with caplog.at_level(logging.WARNING):
        assert store.get_many(batch_keys(3, 400)) == {}
    assert store.describe().endswith("(failed; in memory)") and str(path) in (store.failure or "")
    assert "damaged" in caplog.text
    k = key(CPU_ENV)
    store.put_many(CPU_ENV, {k: figures()})
    assert store.get_many([k]) == {k: figures()}
    assert path.read_bytes() == before


def test_damaged_cache_given_by_path_is_reported(tmp_path: Path, caplog) -> None:
    """The usual route (`cache=` a path): a file that opens but fails at first use. Tuning
    finishes in memory, the report's warnings say which file and why, the file is untouched."""
    path = tmp_path / "cache.sqlite"
    with SQLStore(path) as store:
        for b in range(5):
            store.put_many(STRESS_ENV, {k: figures_for(k, 0) for k in batch_keys(b, 400)})
    data = bytearray(path.read_bytes())
    data[6 * 4096:] = random.Random(4).randbytes(len(data) - 6 * 4096)
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    model, rep = _tuned_model_with(str(path), _int8_cheap, caplog)
    assert any("continuing in memory" in w and str(path) in w for w in rep.warnings), rep.warnings
    assert "failed" in rep.cache
    assert path.read_bytes() == before


def test_directory_in_place_of_the_file(tmp_path: Path) -> None:
    # As root, chmod 000 does not stop us from reading: a directory at the path is the
    # "cannot be read" case that holds for every user.
    path = tmp_path / "cache.sqlite"
    path.mkdir()
    (path / "keep").write_text("x")
    _expect_unavailable(path, str(path), "is a directory")
    assert (path / "keep").read_text() == "x"


def test_path_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    _expect_unavailable(blocker / "cache.sqlite", str(blocker / "cache.sqlite"),
                        "cannot create its directory")
    assert blocker.read_text() == "x"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="autoquant-cache-test-"))
    path.chmod(0o777)
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path)


def _try_open(path: str) -> str:
    SQLStore(path).close()
    return "opened"


def _file_with_data(directory: Path) -> Path:
    path = directory / "cache.sqlite"
    with SQLStore(path) as store:
        store.put_many(CPU_ENV, {key(CPU_ENV): figures()})
    for p in directory.iterdir():
        p.chmod(0o666)
    return path


@pytest.mark.parametrize("mode,needle", [(0o444, "is read-only"), (0o000, "cannot be read")],
                         ids=["read-only", "unreadable"])
def test_permissions_of_the_file(shared_dir: Path, mode: int, needle: str) -> None:
    path = _file_with_data(shared_dir)
    before = path.read_bytes()
    path.chmod(mode)
    result = run_unprivileged(_try_open, str(path))
    assert result[:2] == ("error", "CacheUnavailableError"), result
    assert str(path) in result[2] and needle in result[2] and "AUTOQUANT_CACHE_URL" in result[2]
    assert path.read_bytes() == before


def test_read_only_directory(shared_dir: Path) -> None:
    path = _file_with_data(shared_dir)
    before = path.read_bytes()
    shared_dir.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH
                     | stat.S_IXOTH)
    result = run_unprivileged(_try_open, str(path))
    assert result[:2] == ("error", "CacheUnavailableError"), result
    assert "is not writable" in result[2] and str(path) in result[2]
    assert path.read_bytes() == before


def test_open_store_or_memory_falls_back_with_the_reason(tmp_path: Path, caplog) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"definitely not sqlite")
    with caplog.at_level(logging.WARNING):
        store, warning = open_store_or_memory(str(path))
    assert isinstance(store, MemoryStore) and warning and str(path) in warning
    assert str(path) in caplog.text
    assert path.read_bytes() == b"definitely not sqlite"


def test_unreachable_server_is_unavailable_not_a_crash() -> None:
    with pytest.raises(CacheUnavailableError, match=r"\*\*\*"):
        open_store("postgresql+psycopg://u:secret@127.0.0.1:9/db")  # port 9: nothing listens


def _tuned_model_with(cache, cost, caplog):
    """A 6-layer MLP (6 distinct ops) tuned against `cache` with a fake timer `cost(key)`."""
    import torch
    from torch import nn

    import autoquant as aq
    from autoquant import FakeTimer

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64 + 16 * i, 64 + 16 * (i + 1)) for i in range(6)])
    x = torch.randn(3, 64)
    ref = model(x)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        aq.autoquant(model, x, cache=cache, timer=FakeTimer(cost), progress=False)
    torch.testing.assert_close(model(x), ref, atol=0.1, rtol=0.1)
    return model, aq.get_report(model)


def _int8_cheap(k) -> float:
    return 1e-6 if k.candidate == "int8_dynamic" and '"fbgemm"' in k.params else 1e-3


@pytest.mark.postgres
def test_postgres_down_mid_run_tuning_finishes_in_memory(caplog) -> None:
    """A real server, stopped (pg_ctl stop -m fast) after the first op's figures are written: the
    remaining ops are tuned and kept in memory, the report says so, nothing raises."""
    from .pgserver import find_pg_bin, start_postgres
    from autoquant.candidates import QuantizedLinear

    from .conftest import _no_server

    if find_pg_bin() is None:
        _no_server("no PostgreSQL server binaries")
    server = start_postgres(fsync=False)
    try:
        server.create_database("aq_down")
        store = SQLStore(server.url("aq_down"))
        first_op = []

        def cost(k) -> float:
            if not first_op:
                first_op.append(k.op)
            elif k.op != first_op[0] and not server._stopped:
                server.stop()  # the first op's measurements are committed; the server goes away
            return _int8_cheap(k)

        started = time.monotonic()
        model, rep = _tuned_model_with(store, cost, caplog)
        assert server._stopped
        assert time.monotonic() - started < 60  # a dead server is not retried like a lock
        assert any("continuing in memory" in w for w in rep.warnings), rep.warnings
        assert "failed" in rep.cache
        assert all(isinstance(m, QuantizedLinear) for m in model)
        assert "continuing in memory" in caplog.text
    finally:
        server.stop()


def test_sqlite_locked_for_long_tuning_finishes_in_memory(tmp_path: Path, monkeypatch, caplog) -> None:
    """Another process holds the write lock for the whole run: reads still work (WAL), writes give
    up after the retry budget, and tuning finishes in memory and says so; the file is intact."""
    from autoquant.cache_db import engine
    from autoquant.candidates import QuantizedLinear

    monkeypatch.setattr(engine, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(engine, "RETRY_BUDGET_S", 1.0)
    path = tmp_path / "locked.sqlite"
    store = SQLStore(path)  # opened (schema made) before the lock is taken
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        model, rep = _tuned_model_with(store, _int8_cheap, caplog)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert any("continuing in memory" in w and "locked" in w for w in rep.warnings), rep.warnings
    assert any("Another process" in w and "damaged" not in w for w in rep.warnings), rep.warnings
    assert all(isinstance(m, QuantizedLinear) for m in model)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
