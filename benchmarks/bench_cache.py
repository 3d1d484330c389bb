"""Tuning-cache benchmark: SQLite file and PostgreSQL on loopback, side by side, in one run.

    python benchmarks/bench_cache.py              # 1,000,000 stored measurements
    python benchmarks/bench_cache.py --quick      # 100,000
    python benchmarks/bench_cache.py --rows 300000 --backend sqlite

Targets (with the cache already holding --rows measurements):
  get_many of one model's 200 keys   median <= 20 ms
  get_many of one key                median <= 1 ms
  put_many of 10,000 new rows        <= 2 s
  import of 100,000 JSON lines       <= 10 s
The PostgreSQL server is started the same way as the test suite's (tests/cache_store/pgserver.py),
with fsync on. The machine's load average is printed: other processes distort every figure.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from autoquant.cache_db import SQLStore
from autoquant.cache_db.jsonl import environment_line, header_line, measurement_line
from autoquant.cache_db.records import StoredMeasurement

from autoquant.hardware import Environment
from autoquant.keys import BenchKey, Measurement, OpShape, Timed, canonical_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the suite's server fixture
from cache_store.pgserver import find_pg_bin, start_postgres  # noqa: E402

ENVS = [Environment("cuda" if i % 2 else "cpu", f"bench device {i}", "9.0", 132, 81559, "550",
                    "12.4", "2.13.0", "3.3.0", "0.1.0") for i in range(10)]
CANDIDATES = [(name, canonical_json(params)) for name, params in [
    ("float", {"kernel": "aten"}), ("float", {"kernel": "onednn"}),
    ("int8_weight_only", {"kernel": "aten"}), ("int8_weight_only", {"kernel": "triton"}),
    ("int8_dynamic", {"kernel": "aten"}), ("int8_dynamic", {"kernel": "triton"}),
    ("int4_weight_only", {"group_size": 32}), ("int4_weight_only", {"group_size": 64}),
    ("int4_weight_only", {"group_size": 128}), ("fp8_weight_only", {}),
    ("fp8_dynamic", {}), ("bf16_cast", {})]]
MS = (1, 2, 4, 8, 16, 32, 50, 64, 96, 128, 256, 512, 4097)
KNS = [(k, n) for k in range(256, 256 * 41, 256) for n in (768, 1024, 3072, 4096, 4097, 11008,
                                                           14336, 50257, 128256, 2048)]
COLUMNS = ("env_id", "candidate", "params", "version", "m", "k", "n", "bias", "dtype", "timed",
           "median_s", "p25_s", "p75_s", "samples", "load_avg", "host")


def key_stream(env: Environment) -> Iterator[BenchKey]:
    """Plausible keys of one environment: shapes x candidates x what was timed."""
    for (k, n), m, (cand, params), timed in itertools.product(KNS, MS, CANDIDATES, Timed):
        yield BenchKey(env.hash, cand, params, 1, OpShape(m, k, n, k % 512 == 0, "bfloat16"),
                       timed)


def row_stream(total: int, env_ids: dict[str, int]) -> Iterator[tuple]:
    per_env = -(-total // 8)  # 8 environments hold the stored rows; 2 stay free for writes
    produced = 0
    for env in ENVS[:8]:
        env_id = env_ids[env.hash]
        for key in itertools.islice(key_stream(env), per_env):
            if produced == total:
                return
            t = 1e-6 * (1 + key.op.m * key.op.k * key.op.n / 1e9)
            yield (env_id, key.candidate, key.params, 1, key.op.m, key.op.k, key.op.n,
                   key.op.bias, key.op.dtype, key.timed.value, t, t * 0.95, t * 1.05, 25, 0.5,
                   "bench")
            produced += 1


def model_keys(count: int = 200) -> list[BenchKey]:
    """One model's lookups: its few (K, N) shapes x its M values x every candidate, FULL."""
    keys = []
    for (k, n), m, (cand, params) in itertools.product(KNS[:4], MS[:5], CANDIDATES[:10]):
        keys.append(BenchKey(ENVS[0].hash, cand, params, 1, OpShape(m, k, n, k % 512 == 0,
                                                                    "bfloat16"), Timed.FULL))
    return keys[:count]


def bulk_load(store: SQLStore, rows: int) -> float:
    """Fill the cache fast: one executemany (SQLite) or COPY (PostgreSQL), one transaction."""
    start = time.perf_counter()
    with store._engine.begin() as conn:
        env_ids = store.ensure_environments(conn, ENVS, [e.hash for e in ENVS])
    raw = store._engine.raw_connection()
    try:
        if store.backend == "postgresql":
            with raw.cursor() as cur, cur.copy(
                    f"COPY measurements ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in row_stream(rows, env_ids):
                    copy.write_row(row)
            raw.commit()
            with raw.cursor() as cur:
                cur.execute("ANALYZE")
            raw.commit()
        else:
            cur = raw.cursor()
            cur.execute("BEGIN")
            cur.executemany(f"INSERT OR IGNORE INTO measurements ({', '.join(COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(COLUMNS))})", row_stream(rows, env_ids))
            cur.execute("COMMIT")
            cur.execute("ANALYZE")
    finally:
        raw.close()
    return time.perf_counter() - start


def timed_runs(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def fresh_items(env: Environment, start: int, count: int) -> dict[BenchKey, Measurement]:
    keys = itertools.islice(key_stream(env), start, start + count)
    return {k: Measurement(2e-5, 1.9e-5, 2.1e-5, 30, 0.4) for k in keys}


def jsonl_text(env: Environment, count: int) -> str:
    buf = io.StringIO()
    buf.write(header_line())
    buf.write(environment_line(env))
    for k, m in fresh_items(env, 0, count).items():
        buf.write(measurement_line(StoredMeasurement(k, m, None, "elsewhere")))
    return buf.getvalue()


@dataclass
class Figures:
    load_s: float
    get200: list[float]
    get1: list[float]
    put10k: list[float]
    put10k_update: float
    import100k: float
    import100k_cpu: float  # this process's CPU time: what contention cannot inflate
    reimport100k: float


def run_backend(url: str, rows: int, repeat: int) -> Figures:
    store = SQLStore(url)
    load = bulk_load(store, rows)
    count = store.stats().measurements
    print(f"  {store.backend}: {count:,} rows loaded in {load:.1f} s", flush=True)
    keys200, key1 = model_keys(200), model_keys(1)
    assert len(store.get_many(keys200)) == 200, "the model's keys should all be stored"
    get200 = timed_runs(lambda: store.get_many(keys200), repeat)
    get1 = timed_runs(lambda: store.get_many(key1), repeat * 5)
    puts = []
    for i in range(3):  # new rows each time, in an environment with no rows yet
        items = fresh_items(ENVS[8], i * 10_000, 10_000)
        puts.append(timed_runs(lambda items=items: store.put_many(ENVS[8], items), 1)[0])
    update = timed_runs(lambda: store.put_many(ENVS[8], items), 1)[0]  # the last 10,000 again
    text = jsonl_text(ENVS[9], 100_000)
    cpu = time.process_time()
    imp = timed_runs(lambda: store.import_jsonl(io.StringIO(text)), 1)[0]
    imp_cpu = time.process_time() - cpu
    reimp = timed_runs(lambda: store.import_jsonl(io.StringIO(text)), 1)[0]
    store.close()
    return Figures(load, get200, get1, puts, update, imp, imp_cpu, reimp)


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:8.2f} ms"


def print_table(results: dict[str, Figures], rows: int) -> bool:
    checks: list[tuple[str, str, Callable[[Figures], str], Callable[[Figures], bool]]] = [
        (f"bulk load {rows:,} rows", "(setup)", lambda f: f"{f.load_s:8.1f} s ", lambda f: True),
        ("get_many 200 keys, median", "<= 20 ms", lambda f: _ms(f.get200),
         lambda f: statistics.median(f.get200) <= 0.020),
        ("get_many 200 keys, p90", "", lambda f: _ms(sorted(f.get200)[int(len(f.get200) * .9)
                                                        :][:1]), lambda f: True),
        ("get_many 1 key, median", "<= 1 ms", lambda f: _ms(f.get1),
         lambda f: statistics.median(f.get1) <= 0.001),
        ("put_many 10,000 new rows", "<= 2 s", lambda f: f"{max(f.put10k):8.2f} s ",
         lambda f: max(f.put10k) <= 2.0),
        ("put_many 10,000 updates", "<= 2 s", lambda f: f"{f.put10k_update:8.2f} s ",
         lambda f: f.put10k_update <= 2.0),
        ("import 100,000 JSON lines", "<= 10 s", lambda f: f"{f.import100k:8.2f} s ",
         lambda f: f.import100k <= 10.0),
        ("  of which client CPU", "", lambda f: f"{f.import100k_cpu:8.2f} s ", lambda f: True),
        ("re-import (all identical)", "<= 10 s", lambda f: f"{f.reimport100k:8.2f} s ",
         lambda f: f.reimport100k <= 10.0),
    ]
    names = list(results)
    print(f"\n{'':28}{'target':>10}  " + "  ".join(f"{n:>15}" for n in names))
    ok = True
    for label, target, show, passed in checks:
        cells = []
        for n in names:
            good = passed(results[n])
            ok &= good
            cells.append(f"{show(results[n])}{'' if good else ' FAIL'}".rjust(15))
        print(f"{label:28}{target:>10}  " + "  ".join(cells))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=1e6, help="stored measurements (1e6)")
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=100, help="lookups timed per figure")
    args = parser.parse_args(argv)
    rows = 100_000 if args.quick else int(args.rows)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="autoquant-bench-cache-") as tmp:
        if args.backend in ("sqlite", "both"):
            results["sqlite"] = run_backend(str(Path(tmp) / "bench.sqlite"), rows, args.repeat)
        if args.backend in ("postgresql", "both"):
            if find_pg_bin() is None:
                print("  postgresql: skipped (no server binaries; run scripts/ensure_postgres.sh)")
            else:
                with start_postgres(fsync=True) as server:
                    url = server.create_database("bench")
                    results["postgresql"] = run_backend(url, rows, args.repeat)
    ok = print_table(results, rows)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
