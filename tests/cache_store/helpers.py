"""Small builders shared by the cache tests."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

from autoquant.hardware import Environment
from autoquant.keys import BenchKey, Measurement, OpShape, Timed, canonical_json

NOBODY = 65534


def key(env: Environment, m: int = 16, *, candidate: str = "int8_dynamic", k: int = 96,
        n: int = 4097, bias: bool = True, dtype: str = "bfloat16", timed: Timed = Timed.FULL,
        params: dict | None = None, version: int = 1) -> BenchKey:
    return BenchKey(env.hash, candidate, canonical_json(params or {"kernel": "aten"}), version,
                    OpShape(m, k, n, bias, dtype), timed)


def figures(median: float = 2e-5, samples: int = 25, spread: float = 0.05,
            load: float | None = 0.5) -> Measurement:
    return Measurement(median, median * (1 - spread), median * (1 + spread), samples, load)


def model_keys(env: Environment, count: int = 200) -> dict[BenchKey, Measurement]:
    """`count` keys like one model's tuning: candidates x shapes x what was timed."""
    out = {}
    cands = [("float", {"kernel": "aten"}), ("int8_weight_only", {"kernel": "aten"}),
             ("int8_dynamic", {"kernel": "fbgemm"}), ("int4_weight_only", {"group_size": 128})]
    i = 0
    while len(out) < count:
        cand, params = cands[i % len(cands)]
        timed = (Timed.FULL, Timed.MATMUL, Timed.RELU)[(i // len(cands)) % 3]
        m = (1, 16, 50, 96, 4097)[(i // 12) % 5]
        out[key(env, m, candidate=cand, params=params, timed=timed, k=96 * (1 + i // 60))] = \
            figures(1e-6 * (i + 1), samples=10 + i % 7)
        i += 1
    return out


def _child(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        conn.send(("ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001 - the parent reports whatever happened here
        conn.send(("error", type(err).__name__, str(err)))


def run_unprivileged(fn: Callable[..., Any], *args: Any) -> tuple:
    """Run fn(*args) as user `nobody` in a forked child (permissions do not stop root, so the
    read-only / unreadable cases must be checked as someone else). Returns ("ok", result) or
    ("error", exception class name, message). Runs in-process when not root."""
    if os.geteuid() != 0:
        try:
            return ("ok", fn(*args))
        except Exception as err:  # noqa: BLE001 - returned to the caller, as from the child
            return ("error", type(err).__name__, str(err))
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    ready = parent.poll(60)
    result = parent.recv() if ready else ("error", "Timeout", "child did not answer")
    proc.join(30)
    return result
