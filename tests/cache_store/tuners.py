"""A whole tuner in a child process, for the concurrent-tuners test: `autoquant()` with a SQL cache
URL (so writes go through the tuner's fault-tolerant store wrapper), then a look at what the cache
holds once every tuner has finished.

Each tuner has one op of its own and one op shared with the others, and a fake timer whose figures
name the tuner: the parent can tell whose measurement every row is. Module-level functions only,
so `multiprocessing` can start them with the spawn method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SHARED_N = 64
M, K = 4, 64


def own_n(worker: int) -> int:
    """The output width only `worker`'s model has."""
    return 80 + 16 * worker


def cost_s(worker: int, n: int, params: str) -> float:
    """The fake timer's figure: distinct per tuner, op and kernel."""
    return 1e-6 * (1 + worker) * (1 + n / 1000) * (1 + len(params) / 100)


def tune_then_look(urls: Sequence[str], worker: int, barrier: Any, conn: Any) -> None:
    """For each URL: wait for every tuner, tune a two-layer model into that cache, wait until
    every tuner has finished, then report through `conn` what the cache and the report hold."""
    import torch
    from torch import nn

    import autoquant as aq
    from autoquant.cache_db import SQLStore

    timer = aq.FakeTimer(lambda key: cost_s(worker, key.op.n, key.params), run=False)
    for url in urls:
        torch.manual_seed(worker)
        model = nn.Sequential(nn.Linear(K, SHARED_N), nn.Linear(SHARED_N, own_n(worker))).eval()
        barrier.wait(timeout=300)
        aq.autoquant(model, torch.randn(M, K), cache=url, progress=False, timer=timer,
                     candidates=["int8_dynamic", "int8_weight_only"])
        report = aq.get_report(model)
        barrier.wait(timeout=300)  # every tuner has written all it measured
        with SQLStore(url) as store:
            rows = [(r.key.op.n, r.key.candidate, r.key.params, r.key.timed.value, r.measurement.median_s)
                    for r in store.measurements()]
        conn.send({"url": url, "cache": report.cache, "warnings": list(report.warnings), "rows": rows})
    conn.close()
