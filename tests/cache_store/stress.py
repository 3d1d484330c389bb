"""Writers for concurrency and crash checks: run in child processes by the tests (and usable by
hand against a team server: `python tests/cache_store/stress.py URL...` runs 8 overlapping writers
on each URL).

Every writer writes figures of its own in every field (median, quartiles, samples, load average),
so a row that mixed two writers' upserts matches no writer: the reader checks each row is one
writer's whole row. Module-level functions only, so `multiprocessing` can start them with the
spawn method (the children find this module through the parent's sys.path).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Sequence
from typing import Any

from autoquant.cache_db.sql_store import SQLStore
from autoquant.hardware import Environment
from autoquant.keys import BenchKey, Measurement, OpShape, Timed

__all__ = [
    "STRESS_ENV",
    "batch_keys",
    "figures_for",
    "overlapping_keys",
    "run_overlapping_writers",
    "write_overlapping",
    "write_until_killed",
]

STRESS_ENV = Environment(device_kind="cpu", sku="stress-test cpu", capability="avx2", units=2,
                         memory_mb=1024, driver="", cuda="", torch="0", triton="", autoquant="0")


def _key(i: int, candidate: str = "stress") -> BenchKey:
    return BenchKey(STRESS_ENV.hash, candidate, f'{{"i":{i % 7}}}', 1,
                    OpShape(i, 64 + i % 5, 128, i % 2 == 0, "float32"), Timed.FULL)


def overlapping_keys(worker: int, per_worker: int = 240, stride: int = 80) -> list[BenchKey]:
    """Worker w writes keys [w*stride, w*stride + per_worker): each key is shared by up to
    per_worker/stride writers."""
    start = worker * stride
    return [_key(i) for i in range(start, start + per_worker)]


def figures_for(key: BenchKey, worker: int) -> Measurement:
    """Deterministic figures that differ between writers in EVERY field, so a row holding fields
    of two writers equals neither writer's figures."""
    base = 1e-6 * (key.op.m + 1)
    return Measurement(base * (1 + worker / 64), base * (0.9 - worker / 256), base * (1.1 + worker / 128),
                       worker + 1, 0.25 + worker)


def write_overlapping(urls: Sequence[str], worker: int, barrier: Any, batch: int = 40) -> None:
    """For each URL in turn: open the store, wait for every writer, then put_many this worker's
    keys in batches. (One set of processes serves several databases: starting a Python process
    that imports torch costs seconds.)"""
    keys = overlapping_keys(worker)
    for url in urls:
        store = SQLStore(url)
        barrier.wait(timeout=300)
        for start in range(0, len(keys), batch):
            chunk = keys[start:start + batch]
            store.put_many(STRESS_ENV, {k: figures_for(k, worker) for k in chunk})
        store.close()


def batch_keys(batch: int, size: int) -> list[BenchKey]:
    return [_key(i, candidate=f"batch{batch}") for i in range(size)]


def write_until_killed(url: str, conn: Any, size: int = 400) -> None:
    """Commit batch after batch; after each commit, report its number through `conn` (a Pipe
    end). The parent kills this process with SIGKILL at some point mid-write."""
    store = SQLStore(url)
    batch = 0
    while True:
        store.put_many(STRESS_ENV, {k: figures_for(k, 0) for k in batch_keys(batch, size)})
        conn.send(batch)
        batch += 1


def run_overlapping_writers(urls: Sequence[str], writers: int = 8) -> list[int]:
    """Start `writers` spawn processes that write overlapping keys into each of `urls`, all at
    once (a barrier before each database); return their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(writers)
    procs = [ctx.Process(target=write_overlapping, args=(list(urls), w, barrier))
             for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode if p.exitcode is not None else -1 for p in procs]


if __name__ == "__main__":
    codes = run_overlapping_writers(sys.argv[1:])
    print("exit codes:", codes)
    sys.exit(0 if all(c == 0 for c in codes) else 1)
