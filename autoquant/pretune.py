"""Pre-tuning: time every candidate for every op of a shape profile on this device, into a cache.

Run once per GPU SKU before deployment; every deployment on that SKU then benchmarks nothing
(``autoquant(model, cache=URL, on_miss="error")`` proves it). Resumable: measurements are written
per op, so a killed run goes on where it stopped.

>>> import torch
>>> from autoquant.bench import FakeTimer
>>> from autoquant.profile import record_shapes
>>> from autoquant.store import MemoryStore
>>> prof = record_shapes(torch.nn.Sequential(torch.nn.Linear(8, 4)), torch.randn(2, 8))
>>> s = pretune(prof, MemoryStore(), timer=FakeTimer(lambda k: 1e-6), progress=False)
>>> s.ops, s.cached
(1, 0)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .bench import BenchConfig, Timer, default_timer
from .config import CostModel, TuneConfig
from .hardware import environment
from .profile import ShapeProfile
from .store import SafeStore, Store
from .tune import tune_ops

__all__ = ["PretuneSummary", "pretune"]

log = logging.getLogger("autoquant")


@dataclass(frozen=True)
class PretuneSummary:
    """What a pretune run did: (op, candidate) pairs timed now, found cached, or not runnable."""

    profile: str
    environment: str
    ops: int
    timed: int
    cached: int
    unsupported: int
    failed: int
    seconds: float
    cache: str

    def lines(self) -> list[str]:
        return [
            f"pretune {self.profile!r} on {self.environment}",
            f"  ops: {self.ops}; (op, kernel) pairs timed now: {self.timed}, already cached: {self.cached}, "
            f"not supported here: {self.unsupported}, failed: {self.failed}",
            f"  {self.seconds:.1f}s; cache: {self.cache}",
        ]


def pretune(
    profile: ShapeProfile, store: Store, *, candidates: Sequence[Any] | None = None,
    device: torch.device | str | None = None, mode: Any = ("interpolate", 0.85),
    timer: Timer | None = None, bench: BenchConfig | None = None, progress: bool = True,
    deployment: str = "eager",
) -> PretuneSummary:
    """Time every candidate on every op of `profile` on `device` (default: cuda if present)
    with synthetic weights, writing the measurements to `store`. `deployment`: what a GPU times,
    for models run eagerly ("eager") or in CUDA graphs ("graphs"); see TuneConfig.deployment."""
    from .session import _candidates_for, parse_candidates  # noqa: PLC0415

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TuneConfig(cost_model=CostModel.parse(mode), bench=bench or BenchConfig(), deployment=deployment)
    chosen = parse_candidates(candidates)
    ops = {op: _candidates_for(op, dev, chosen) for op, _ in profile.ops if op.m > 0}
    env = environment(dev)
    safe = SafeStore(store)
    started = time.perf_counter()
    results = tune_ops(ops, dev, safe, timer or default_timer(dev, config.bench), config,
                       progress=progress, env=env)
    trials = [t for per in results.values() for t in per.values()]
    unsupported = sum(1 for t in trials if t.reason is not None and not t.reason.startswith(("failed", "no measurement")))
    failed = sum(1 for t in trials if t.reason is not None and t.reason.startswith(("failed", "no measurement")))
    summary = PretuneSummary(
        profile=profile.name, environment=env.short(), ops=len(ops),
        timed=sum(1 for t in trials if t.ok and not t.cached), cached=sum(1 for t in trials if t.ok and t.cached),
        unsupported=unsupported, failed=failed, seconds=time.perf_counter() - started, cache=safe.describe(),
    )
    if safe.failure:
        log.warning("%s", safe.failure)
    return summary
