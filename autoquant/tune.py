"""The tuning loop: unique ops x candidates -> cache lookup -> harness times what is missing -> cache.

Timing is per unique op (shape, dtype, device), never per layer, on synthetic weights of the op's
shape: 32 identical transformer blocks cost one benchmark per shape. A candidate that cannot run
says why (``supports``), and one that raises while being built, run or timed is recorded with its
reason and never stops the others.

>>> import torch
>>> from autoquant.bench import FakeTimer
>>> from autoquant.candidates import get_family
>>> from autoquant.keys import OpShape
>>> from autoquant.store import MemoryStore
>>> op = OpShape(4, 32, 16, False, "float32")
>>> base = get_family("float")(kernel="aten")
>>> res = tune_ops({op: [base]}, torch.device("cpu"), MemoryStore(), FakeTimer(lambda k: 1e-5),
...                TuneConfig(), progress=False)
>>> res[op][base].cost.value
1e-05
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .bench import BenchJob, Timer
from .candidates import Candidate, QuantizedLinear
from .config import TuneConfig
from .costmodel import Cost, op_cost, timed_parts
from .hardware import Environment, environment
from .keys import BenchKey, Measurement, OpShape, Timed
from .store import MemoryStore, Store

__all__ = ["Trial", "tune_ops", "SafeStore", "bench_key", "CacheMissError", "ON_MISS"]

ON_MISS = ("bench", "error", "baseline")


class CacheMissError(RuntimeError):
    """Raised with on_miss="error" when the tuning cache lacks measurements this run needs."""

log = logging.getLogger("autoquant")

# Inputs smaller than this are rotated over a few copies so one buffer does not sit in cache.
_ROTATE_BELOW_BYTES = 8 << 20


@dataclass
class Trial:
    """One candidate on one op: why it was not run, or its measured parts and cost."""

    candidate: Candidate
    reason: str | None = None
    parts: dict[Timed, Measurement] = field(default_factory=dict)
    cost: Cost | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None and self.cost is not None


def bench_key(env_hash: str, cand: Candidate, op: OpShape, timed: Timed) -> BenchKey:
    return BenchKey(env_hash=env_hash, candidate=cand.family, params=cand.params_json(),
                    version=cand.version, op=op, timed=timed)


class SafeStore:
    """Wraps a store so that a fault in it (locked for long, disk full, server gone) never stops
    tuning: the failure is logged once, and from then on measurements live in memory."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.memory = MemoryStore()
        self.failure: str | None = None

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = f"tuning cache {self.inner.describe()} failed during {what} ({type(exc).__name__}: {exc}); continuing in memory"
            log.warning("%s", self.failure)

    def get_many(self, keys: Iterable[BenchKey]) -> dict[BenchKey, Measurement]:
        keys = list(keys)
        found = self.memory.get_many(keys)
        if self.failure is None:
            try:
                found.update(self.inner.get_many([k for k in keys if k not in found]))
            except Exception as exc:  # any store fault: degrade, never abort tuning
                self._fail("lookup", exc)
        return found

    def put_many(self, env: Environment | None, items: Mapping[BenchKey, Measurement]) -> None:
        self.memory.put_many(env, items)
        if self.failure is None:
            try:
                self.inner.put_many(env, items)
            except Exception as exc:  # any store fault: degrade, never abort tuning
                self._fail("write", exc)

    def describe(self) -> str:
        return self.inner.describe() + (" (failed; in memory)" if self.failure else "")


def _synthetic(op: OpShape, device: torch.device) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Weight, bias and rotated inputs for timing `op`; seeded by the shape so reruns agree."""
    gen = torch.Generator().manual_seed(op.m * 1_000_003 + op.k * 1009 + op.n)
    dtype = op.torch_dtype
    weight = (torch.randn(op.n, op.k, generator=gen) * op.k ** -0.5).to(device=device, dtype=dtype)
    bias = (torch.randn(op.n, generator=gen) * 0.1).to(device=device, dtype=dtype) if op.bias else None
    nbytes = op.m * op.k * torch.finfo(dtype).bits // 8
    copies = 1 if nbytes >= _ROTATE_BELOW_BYTES or device.type == "cuda" else 3
    xs = [torch.randn(op.m, op.k, generator=gen).to(device=device, dtype=dtype) for _ in range(copies)]
    return weight, bias, xs


def _cycling(fn: Callable[[Tensor], Tensor], xs: Sequence[Tensor]) -> Callable[[], Tensor]:
    if len(xs) == 1:
        x = xs[0]
        return lambda: fn(x)
    it = itertools.cycle(xs)
    return lambda: fn(next(it))


def _rotating(fns: Sequence[Callable[[Tensor], Tensor]], xs: Sequence[Tensor]) -> Callable[[], Tensor]:
    """One call per invocation, cycling over weight copies (`fns`) and inputs (`xs`) together."""
    if len(fns) == 1:
        return _cycling(fns[0], xs)
    pairs = itertools.cycle([(fns[i % len(fns)], xs[i % len(xs)]) for i in range(len(fns) * len(xs))])

    def call() -> Tensor:
        fn, x = next(pairs)
        return fn(x)

    return call


_MAX_COPIES = 256


def _cold_copies(module: QuantizedLinear, target_bytes: int) -> list[QuantizedLinear]:
    """`module` plus clones of its weight state, enough that cycling over them reads about
    `target_bytes` (beyond the CPU's last-level cache): inside a model, the other layers evict a
    layer's weights between two of its calls, and timing one hot copy would favour big float
    weights that fit in cache here but not there (measured: a 512x512 fp32 layer at M=1 ties
    fbgemm int8 with hot caches and is 2x slower than it with cold ones)."""
    if not isinstance(module, QuantizedLinear):
        return [module]
    state = sum(t.nbytes for t in module.buffers())
    if target_bytes <= 0 or state <= 0 or state >= target_bytes:
        return [module]
    n = min(_MAX_COPIES, -(-target_bytes // state))
    copies = [module]
    for _ in range(n - 1):
        packed = {name: t.clone() for name, t in module.packed().items()}
        bias = None if module.bias is None else module.bias.clone()
        copies.append(QuantizedLinear(module.candidate, packed, bias, module.in_features, module.out_features))
    return copies


def _jobs_for(
    cand: Candidate, op: OpShape, env_hash: str, parts: Sequence[Timed], modules: Sequence[QuantizedLinear],
    xs: Sequence[Tensor],
) -> list[BenchJob]:
    jobs = []
    for part in parts:
        key = bench_key(env_hash, cand, op, part)
        if part is Timed.FULL:
            fn = _rotating(modules, xs)
        elif part is Timed.RELU:
            fn = _rotating([lambda x, m=m: torch.relu(m(torch.relu(x))) for m in modules], xs)
        else:
            x0 = xs[0].contiguous()
            mms = [cand.matmul_part(x0, m.packed(), m._runtime, m.bias) for m in modules]
            if any(mm is None for mm in mms):
                raise RuntimeError(f"{cand.name} is dynamic but gives no matmul part to time")
            fn = _rotating([lambda _x, mm=mm: mm() for mm in mms], [x0])
        jobs.append(BenchJob(key, fn))
    return jobs


def _cold_bytes(timer: Timer, device: torch.device) -> int:
    """How many bytes of weight copies the timer wants each candidate to cycle over (0: hot).
    Timers without the method (user-supplied ones) time hot."""
    method = getattr(timer, "cold_bytes", None)
    return int(method(device)) if callable(method) else 0


def _check_output(module: torch.nn.Module, x: Tensor, op: OpShape) -> None:
    y = module(x)
    if tuple(y.shape) != (op.m, op.n):
        raise RuntimeError(f"output shape {tuple(y.shape)} != expected {(op.m, op.n)}")
    if y.dtype != x.dtype:
        raise RuntimeError(f"output dtype {y.dtype} != activation dtype {x.dtype}")
    if op.m and not bool(torch.isfinite(y).all()):
        raise RuntimeError("output has NaN or Inf on finite inputs")


def _measure(timer: Timer, jobs: list[BenchJob], device: torch.device) -> dict[BenchKey, Measurement]:
    """Time `jobs` interleaved; if the group fails, time each alone so one bad job stays alone."""
    try:
        return dict(zip((j.key for j in jobs), timer.measure(jobs, device)))
    except Exception:
        out: dict[BenchKey, Measurement] = {}
        for job in jobs:
            try:
                out[job.key] = timer.measure([job], device)[0]
            except Exception as exc:  # recorded by the caller as this candidate's reason
                log.debug("timing %s failed: %s", job.key, exc)
        return out


def _bench_op(
    op: OpShape, cands: Sequence[Candidate], device: torch.device, env_hash: str, timer: Timer,
    config: TuneConfig, trials: dict[Candidate, Trial],
) -> dict[BenchKey, Measurement]:
    """Build, check and time every candidate in `cands` on `op`; fills reasons into `trials`."""
    weight, bias, xs = _synthetic(op, device)
    cold = _cold_bytes(timer, device)
    jobs: list[BenchJob] = []
    owners: dict[BenchKey, Candidate] = {}
    modules = []
    for cand in cands:
        try:
            module = cand.build(weight, bias)
            with torch.no_grad():
                _check_output(module, xs[0], op)
            parts = timed_parts(config.cost_model, cand.dynamic_activation)
            copies = _cold_copies(module, cold)
            cand_jobs = _jobs_for(cand, op, env_hash, parts, copies, xs)
        except Exception as exc:  # a failing candidate never takes tuning down
            trials[cand].reason = f"failed: {type(exc).__name__}: {exc}"
            log.info("%s on %s: %s", cand.name, op.label(), trials[cand].reason)
            continue
        modules.append(copies)
        jobs.extend(cand_jobs)
        owners.update({j.key: cand for j in cand_jobs})
    jobs, deferred, rough = _screen(jobs, owners, device, timer, config)
    measured = _measure(timer, jobs, device)
    jobs += _settle_deferred(jobs, deferred, rough, measured, owners, device, timer, config)
    for key, cand in owners.items():
        if key not in measured and trials[cand].reason is None:
            trials[cand].reason = "failed while being timed"
    _retime_top(op, jobs, measured, owners, trials, device, timer, config)
    del modules
    return {k: v for k, v in measured.items() if trials[owners[k]].reason is None}


def _screen(
    jobs: list[BenchJob], owners: dict[BenchKey, Candidate], device: torch.device, timer: Timer,
    config: TuneConfig,
) -> tuple[list[BenchJob], list[BenchJob], dict[Candidate, float]]:
    """A few calls per candidate; returns (jobs to time now, jobs deferred as hopeless, rough
    seconds per candidate). Hopeless: `hopeless_factor` times slower than the fastest first calls
    (fp8 on a CPU can be 50x slower than fp32: timing it fully would dominate tuning)."""
    primary = [j for j in jobs if j.key.timed is not Timed.MATMUL]
    if len(primary) < 2 or config.hopeless_factor <= 0:
        return jobs, [], {}
    rough: dict[Candidate, float] = {}
    for job in primary:
        try:
            rough[owners[job.key]] = timer.quick(job, device)
        except Exception as exc:  # left to the full timing, which records the failure
            log.debug("screening %s failed: %s", job.key, exc)
    if not rough:
        return jobs, [], {}
    best = min(rough.values())
    hopeless = {c for c, t in rough.items() if t > config.hopeless_factor * best}
    keep = [j for j in jobs if owners[j.key] not in hopeless]
    deferred = [j for j in jobs if owners[j.key] in hopeless]
    return keep, deferred, rough


def _settle_deferred(
    jobs: list[BenchJob], deferred: list[BenchJob], rough: dict[Candidate, float],
    measured: dict[BenchKey, Measurement], owners: dict[BenchKey, Candidate], device: torch.device,
    timer: Timer, config: TuneConfig,
) -> list[BenchJob]:
    """Deferred candidates whose first calls were within `hopeless_factor` of the best FULL
    timing after all (the screen's first calls can be inflated by a neighbour's load) are timed
    properly; the rest keep a rough single-sample figure. Returns the jobs timed properly."""
    full = [measured[j.key].median_s for j in jobs if j.key.timed is not Timed.MATMUL and j.key in measured]
    best = min(full, default=float("inf"))
    recheck = [j for j in deferred if rough.get(owners[j.key], float("inf")) <= config.hopeless_factor * best]
    if recheck:
        measured.update(_measure(timer, recheck, device))
    for job in deferred:
        if job in recheck or job.key in measured:
            continue
        t = rough.get(owners[job.key]) if job.key.timed is not Timed.MATMUL else None
        if t is None:  # the MATMUL part of a hopeless dynamic candidate: one rough call too
            try:
                t = timer.quick(job, device)
            except Exception:  # noqa: BLE001 - recorded as "failed while being timed"
                continue
        measured[job.key] = Measurement(t, t, t, 1, None)
    return recheck


def _retime_top(
    op: OpShape, jobs: list[BenchJob], measured: dict[BenchKey, Measurement],
    owners: dict[BenchKey, Candidate], trials: dict[Candidate, Trial], device: torch.device,
    timer: Timer, config: TuneConfig,
) -> None:
    """Re-time the cheapest `retime_top` candidates together, so the decision between the two
    closest is made from one interleaved run (DESIGN.md section 5: the machine is noisy)."""
    if config.retime_top < 2:
        return
    costs = {}
    for cand in {owners[k] for k in measured}:
        parts = {k.timed: measured[k] for k in measured if owners[k] is cand}
        if trials[cand].reason is None and len(parts) == len(timed_parts(config.cost_model, cand.dynamic_activation)):
            costs[cand] = op_cost(config.cost_model, cand.dynamic_activation, parts).value
    top = sorted(costs, key=lambda c: (costs[c], c.order, c.params_json()))[: config.retime_top]
    if len(top) < 2:
        return
    again = [j for j in jobs if owners[j.key] in top]
    measured.update(_measure(timer, again, device))


def tune_ops(
    ops: Mapping[OpShape, Sequence[Candidate]], device: torch.device, store: Store, timer: Timer,
    config: TuneConfig, *, progress: bool = True, env: Environment | None = None,
    on_miss: str = "bench",
) -> dict[OpShape, dict[Candidate, Trial]]:
    """For each op, a Trial per candidate: cached or freshly measured cost, or the reason it has
    none. Measurements found in `store` are not timed again; new ones are written per op, so an
    interrupted run resumes where it stopped.

    `on_miss`: "bench" times what the cache lacks; "error" raises CacheMissError naming it, before
    timing anything; "baseline" times nothing and leaves missing candidates out (a layer with
    nothing cached stays float)."""
    if on_miss not in ON_MISS:
        raise ValueError(f"on_miss={on_miss!r}: use one of {ON_MISS}")
    env = env or environment(device)
    env_hash = env.hash
    results: dict[OpShape, dict[Candidate, Trial]] = {}
    wanted: dict[BenchKey, tuple[OpShape, Candidate]] = {}
    for op, cands in ops.items():
        trials = results.setdefault(op, {})
        for cand in cands:
            trials[cand] = trial = Trial(cand)
            reason = _supports(cand, device, op)
            if reason is not None:
                trial.reason = reason
                continue
            for part in timed_parts(config.cost_model, cand.dynamic_activation):
                wanted[bench_key(env_hash, cand, op, part)] = (op, cand)
    found = store.get_many(wanted)
    todo: dict[OpShape, list[Candidate]] = {}
    for key, (op, cand) in wanted.items():
        if key not in found and cand not in todo.get(op, []):
            todo.setdefault(op, []).append(cand)
    if todo and on_miss == "error":
        pairs = [(op, c) for op, cs in todo.items() for c in cs]
        shown = "; ".join(f"{op.label()} {c.name}" for op, c in pairs[:5])
        raise CacheMissError(
            f"{len(pairs)} (op, kernel) measurements are missing from the tuning cache "
            f"{store.describe()} for {env.short()} (e.g. {shown}). Pre-tune this SKU with "
            "`autoquant pretune PROFILE --cache URL`, or pass on_miss='bench' (time them now) or "
            "on_miss='baseline' (keep those layers float)")
    if todo and on_miss == "baseline":
        for op, cs in todo.items():
            for c in cs:
                results[op][c].reason = "not in the tuning cache (on_miss='baseline')"
        todo = {}
    bar = _progress(sum(len(c) for c in todo.values()), progress)
    started = time.perf_counter()
    for i, (op, cands) in enumerate(sorted(todo.items())):
        fresh = _bench_op(op, cands, device, env_hash, timer, config, results[op])
        if fresh:
            store.put_many(env, fresh)
        found.update(fresh)
        bar.update(len(cands), op)
        if not bar.tty:
            log.info("tuned op %d/%d %s: %d candidates in %.1fs", i + 1, len(todo), op.label(),
                     len(cands), time.perf_counter() - started)
    bar.close()
    for op, trials in results.items():
        for cand, trial in trials.items():
            if trial.reason is not None:
                continue
            parts_needed = timed_parts(config.cost_model, cand.dynamic_activation)
            keys = [bench_key(env_hash, cand, op, p) for p in parts_needed]
            if all(k in found for k in keys):
                trial.parts = {p: found[k] for p, k in zip(parts_needed, keys)}
                trial.cost = op_cost(config.cost_model, cand.dynamic_activation, trial.parts)
                trial.cached = cand not in todo.get(op, [])
            else:
                trial.reason = trial.reason or "no measurement (timing failed)"
    return results


def _supports(cand: Candidate, device: torch.device, op: OpShape) -> str | None:
    try:
        return cand.supports(device, op)
    except Exception as exc:  # supports() must not raise; if it does, that is the reason
        return f"supports() raised {type(exc).__name__}: {exc}"


class _Bar:
    """tqdm with an ETA on a terminal; plain log lines (from the caller) elsewhere."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.tty = bool(enabled and total and sys.stderr.isatty())
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm  # noqa: PLC0415 - only when a bar is shown

            self._bar = tqdm(total=total, desc="autoquant tuning", unit="kernel", leave=False)

    def update(self, n: int, op: OpShape) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(op.label(), refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress(total: int, enabled: bool) -> _Bar:
    if enabled and total:
        log.info("autoquant: timing %d (op, kernel) pairs", total)
    return _Bar(total, enabled)
