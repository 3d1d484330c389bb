"""Pre-tuning workers: throughput of 2 workers vs 1, the claim overhead per unit, duplicates.

One cache per run (a fresh SQLite file, or a fresh schema on a PostgreSQL server), one stored
profile of `--ops` distinct CPU float32 ops (M=4, K=64, N=16..), the default CPU candidates; each
worker is a child process whose timer is a fake of fixed cost (`--cost-ms` per timed job, a sleep:
the point is coordination, not kernels; the layers are still built, which is CPU work). Per backend
and run: seconds from the first worker's start to the last one's end (imports excluded) for 1
worker and for 2 side by side, the throughput ratio, milliseconds spent claiming and completing per
unit, and keys timed by more than one worker (must be 0).

    python benchmarks/bench_worker.py                         # SQLite, 3 runs
    python benchmarks/bench_worker.py --postgres --runs 5 --dup-runs 15   # also PostgreSQL (starts a server)

Each worker gets its share of the cores (``--threads`` of ``autoquant worker``; ``--shared-threads``:
all cores each, the oversubscribed way).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def worker_main(url: str, log: str, cost_ms: float, threads: int) -> int:
    """The child: one Worker until idle on `threads` CPU threads, logging "pid key" per timed job."""
    import torch

    from autoquant.bench import FakeTimer
    from autoquant.cache_db import SQLStore
    from autoquant.worker import Worker

    class FixedCost(FakeTimer):
        def measure(self, jobs, device):
            out = super().measure(jobs, device)
            with open(log, "a", encoding="utf-8") as fh:
                for job in jobs:
                    time.sleep(cost_ms / 1e3)
                    fh.write(f"{os.getpid()} {job.key}\n")
            return out

        def quick(self, job, device):
            time.sleep(cost_ms / 1e3)
            return super().quick(job, device)

    torch.set_num_threads(threads)  # as `autoquant worker --threads` does
    with SQLStore(url) as store:
        worker = Worker(store, device="cpu", timer=FixedCost(lambda k: 1e-5, run=False), poll_s=0.1,
                        lease=timedelta(minutes=5))
        start = time.time()  # after the imports: a worker's start-up is not coordination
        s = worker.run(until_idle=True)
    print(f"SUMMARY units={s.units_done} claim_s={s.claim_seconds:.4f} start={start:.4f} end={time.time():.4f}",
          flush=True)
    return 0


def _fill(url: str, ops: int) -> None:
    from autoquant.cache_db import SQLStore
    from autoquant.keys import OpShape

    with SQLStore(url) as store:
        store.save_profile("bench", "sha256:bench", {OpShape(4, 64, 16 * (i + 1), False, "float32"): 1
                                                     for i in range(ops)})


def _run_workers(url: str, n: int, cost_ms: float, log: Path, threads: int) -> tuple[float, int, float]:
    """(seconds from the first worker's start to the last one's end, imports excluded; units done;
    claim seconds) for `n` workers started together, `threads` CPU threads each."""
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, str(log), str(cost_ms), str(threads)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(n)]
    units, claim_s, starts, ends = 0, 0.0, [], []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"a worker failed:\n{err[-3000:]}")
        m = re.search(r"SUMMARY units=(\d+) claim_s=([\d.]+) start=([\d.]+) end=([\d.]+)", out)
        units += int(m.group(1))
        claim_s += float(m.group(2))
        starts.append(float(m.group(3)))
        ends.append(float(m.group(4)))
    return max(ends) - min(starts), units, claim_s


def _duplicates(log: Path) -> int:
    who = collections.defaultdict(set)
    for line in log.read_text().splitlines():
        pid, key = line.split(" ", 1)
        who[key].add(pid)
    return sum(1 for pids in who.values() if len(pids) > 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--cost-ms", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--postgres", action="store_true", help="also on a PostgreSQL server started here")
    ap.add_argument("--dup-runs", type=int, default=0,
                    help="more runs of 2 workers only, counting keys timed twice (the duplicate check)")
    ap.add_argument("--shared-threads", action="store_true",
                    help="every worker uses all cores (default: the cores split between the workers, "
                         "as `autoquant worker --threads` is meant to be used on one host)")
    ap.add_argument("--threads", type=int, default=None,
                    help="every worker this many threads (1: the coordination cost alone, no thread effects)")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1

    def threads_for(n: int) -> int:
        if args.threads is not None:
            return args.threads
        return cores if args.shared_threads else max(1, cores // n)

    backends: list[tuple[str, object]] = [("sqlite", None)]
    server = None
    if args.postgres:
        sys.path.insert(0, str(ROOT))
        from tests.cache_store.pgserver import start_postgres

        server = start_postgres(fsync=False)
        server.create_database("bench_worker")
        backends.append(("postgresql", server))
    import torch

    print(f"bench_worker: {args.ops} ops, {args.cost_ms} ms per timed job, {args.runs} runs "
          f"(+{args.dup_runs} duplicate-check runs of 2 workers), torch {torch.__version__}, {cores} cores, "
          f"threads per worker: 1 worker {threads_for(1)}, 2 workers {threads_for(2)}")
    print(f"{'backend':11s} {'run':>3s} {'1 worker s':>10s} {'2 workers s':>11s} {'ratio':>6s} "
          f"{'claim ms/unit':>13s} {'dup keys':>8s}")
    def one_run(name: str, srv: Any, tag: str, n: int) -> tuple[float, float, int]:
        """`n` workers on a fresh cache: (seconds, claim ms per unit, keys timed by two workers)."""
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'cache.sqlite'}" if srv is None else srv.create_schema("bench_worker", tag)
            _fill(url, args.ops)
            log = Path(tmp) / "timings.log"
            secs, units, claim_s = _run_workers(url, n, args.cost_ms, log, threads_for(n))
            if units != args.ops:
                raise SystemExit(f"{name}: {units} units done, expected {args.ops}")
            if srv is not None:
                srv.drop_schema("bench_worker", tag)
            return secs, claim_s / units * 1e3, _duplicates(log)

    try:
        for name, srv in backends:
            ratios, claim_ms, dups = [], [], 0
            for run in range(args.runs):
                times = []
                for n in (1, 2):
                    secs, ms, d = one_run(name, srv, f"r{run}_{n}", n)
                    times.append(secs)
                    claim_ms.append(ms)
                    dups += d
                ratios.append(times[0] / times[1])
                print(f"{name:11s} {run:3d} {times[0]:10.2f} {times[1]:11.2f} {ratios[-1]:6.2f} "
                      f"{claim_ms[-1]:13.2f} {dups:8d}")
            for run in range(args.dup_runs):
                _secs, ms, d = one_run(name, srv, f"d{run}", 2)
                claim_ms.append(ms)
                dups += d
            runs = args.runs + args.dup_runs
            print(f"{name:11s} median throughput 2 vs 1 worker: {statistics.median(ratios):.2f}x "
                  f"({args.runs} runs); claim overhead per unit median {statistics.median(claim_ms):.2f} ms "
                  f"(max {max(claim_ms):.2f}); keys timed by two workers in {runs} runs of 2 workers: {dups}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        raise SystemExit(worker_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])))
    raise SystemExit(main())
