"""A pre-tuning worker in a child process, for the worker tests: ``autoquant.worker.Worker`` on a
cache URL with a fake timer that sleeps per timed job and appends "pid key" to a log file, so the
parent can count how often, and by whom, every key was timed.

    python tests/cache_store/workers.py URL LOG --delay 0.05 --lease 3 --until-idle
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("log")
    p.add_argument("--delay", type=float, default=0.0, help="seconds each timed job takes")
    p.add_argument("--lease", type=float, default=30.0)
    p.add_argument("--poll", type=float, default=0.2)
    p.add_argument("--until-idle", action="store_true")
    p.add_argument("--once", action="store_true")
    args = p.parse_args(argv)

    from autoquant.bench import FakeTimer
    from autoquant.cache_db import SQLStore
    from autoquant.worker import Worker

    class LoggingTimer(FakeTimer):
        def measure(self, jobs, device):
            out = super().measure(jobs, device)
            with open(args.log, "a", encoding="utf-8") as fh:
                for job in jobs:
                    time.sleep(args.delay)
                    fh.write(f"{os.getpid()} {job.key}\n")
                    fh.flush()
            return out

    timer = LoggingTimer(lambda key: 1e-6 * (1 + key.op.n / 100), run=False)
    with SQLStore(args.url) as store:
        summary = Worker(store, device="cpu", timer=timer, lease=timedelta(seconds=args.lease),
                         poll_s=args.poll, candidates=["int8_dynamic", "int8_weight_only"]).run(
            once=args.once, until_idle=args.until_idle)
    print(f"SUMMARY {os.getpid()} done={summary.units_done} taken_over={summary.taken_over} "
          f"timed={summary.timed} signal={summary.stopped_by_signal}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
