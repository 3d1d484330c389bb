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

import ctypes
import functools
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .bench import BenchJob, Timer
from .candidates import Candidate, QuantizedLinear, is_baseline
from .candidates._cpu_ops import PREPACK_CACHE
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
    weight = torch.randn(op.n, op.k, generator=gen).mul_(op.k ** -0.5).to(device=device, dtype=dtype)
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
_PART_ORDER = {Timed.FULL: 0, Timed.RELU: 1, Timed.MATMUL: 2}


def _plain_linear(weight: Tensor, bias: Tensor | None) -> torch.nn.Linear:
    """An nn.Linear over `weight` and `bias` themselves (no copy, no initialisation): how a layer
    the float baseline wins runs after finalize, and so how the baseline is timed (nn.Module's
    own call path costs microseconds per call at M=1 that a QuantizedLinear's shortcut does not)."""
    n, k = weight.shape
    lin = torch.nn.Linear(k, n, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias, requires_grad=False)
    return lin


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes `module` holds: its tensors plus the prepacked handles held for them."""
    if isinstance(module, torch.nn.Linear):
        return sum(t.nbytes for t in module.parameters())
    if not isinstance(module, QuantizedLinear):
        return 0
    buffers = list(module.buffers())
    return sum(t.nbytes for t in buffers) + PREPACK_CACHE.held_for(buffers)


def _handle_sources(module: QuantizedLinear, tensors: Iterable[Tensor]) -> set[int]:
    """ids of those of `tensors` that `module`'s prepacked handle is built from: its kernel reads
    the handle, never them."""
    kind = module.candidate.prepack_kind
    return {id(t) for t in PREPACK_CACHE.anchors(tensors, kind)} if kind else set()


def _read_bytes(module: torch.nn.Module) -> int:
    """Bytes one call of `module` reads: its prepacked handle instead of the plain weight buffer
    the handle is built from, and its other tensors."""
    if not isinstance(module, QuantizedLinear):
        return _state_bytes(module)
    buffers = list(module.buffers())
    kind = module.candidate.prepack_kind
    sources = _handle_sources(module, buffers)
    held = PREPACK_CACHE.held_for(buffers, kind) if kind else 0
    return sum(t.nbytes for t in buffers if id(t) not in sources) + held


def copies_per_candidate(read_bytes: Sequence[int], target_bytes: int) -> int:
    """How many weight copies each candidate of an op gets, so that one pass of every candidate
    (each call on its next copy; `read_bytes`: what one call of each reads) reads about
    `target_bytes`: then a copy is read again only after
    that many bytes of other weights, beyond the CPU's last-level cache, as inside a model whose
    other layers evict it (measured: a 512x512 fp32 layer at M=1 ties fbgemm int8 with hot caches
    and is 2x slower than it with cold ones). The budget is for the op, not per candidate."""
    total = sum(read_bytes)
    if target_bytes <= 0 or total <= 0 or total >= target_bytes:
        return 1
    return min(_MAX_COPIES, -(-target_bytes // total))


def _clones(module: torch.nn.Module, n: int) -> list[torch.nn.Module]:
    """`module` and n - 1 copies of what its calls read, each a layer of its own (same kernel,
    same call path: a QuantizedLinear or the baseline's plain nn.Linear). A buffer a prepacked
    handle is built from is not read by the kernel: the copies get views of it (new tensor
    objects, so each builds its own handle, on the same bytes). Every other tensor is copied;
    each one's copies are views of one block, so freeing them hands one allocation back instead
    of leaving n small holes in the heap."""
    if n <= 1 or not isinstance(module, (QuantizedLinear, torch.nn.Linear)):
        return [module]
    if isinstance(module, QuantizedLinear):
        state = dict(module.packed())
        anchored = _handle_sources(module, state.values())
    else:
        state, anchored = {"weight": module.weight.detach()}, set()
    if module.bias is not None:
        state["bias"] = module.bias.detach()
    blocks = {}
    for name, t in state.items():
        if id(t) in anchored:
            continue
        block = torch.empty((n - 1, *t.shape), dtype=t.dtype, device=t.device)
        block.copy_(t.unsqueeze(0).expand_as(block))
        blocks[name] = block
    copies = [module]
    for i in range(n - 1):
        own = {name: blocks[name][i] if name in blocks else t.view_as(t) for name, t in state.items()}
        bias = own.pop("bias", None)
        if isinstance(module, QuantizedLinear):
            copies.append(QuantizedLinear(module.candidate, own, bias, module.in_features, module.out_features,
                                          act_dtype=module.act_dtype))
        else:
            copies.append(_plain_linear(own["weight"], bias))
    return copies


def _jobs_for(
    cand: Candidate, op: OpShape, env_hash: str, parts: Sequence[Timed], modules: Sequence[torch.nn.Module],
    xs: Sequence[Tensor],
) -> list[BenchJob]:
    """One job per timed part; each call goes to the next of `modules` (a pass: one call each)."""
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
        jobs.append(BenchJob(key, fn, calls=len(modules)))
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


def _by_part(jobs: list[BenchJob]) -> list[BenchJob]:
    """All FULL jobs, then RELU, then MATMUL (stable): a candidate's own jobs far apart."""
    return sorted(jobs, key=lambda j: _PART_ORDER[j.key.timed])


class _OpBench:
    """The candidates of one op, built once and checked; `cold_jobs` gives them weight copies."""

    def __init__(self, op: OpShape, env_hash: str, device: torch.device, timer: Timer, config: TuneConfig,
                 trials: dict[Candidate, Trial]) -> None:
        self.op, self.env_hash, self.device, self.timer, self.config = op, env_hash, device, timer, config
        self.trials = trials
        self.weight, self.bias, self.xs = _synthetic(op, device)
        self.target = _cold_bytes(timer, device)
        self.built: dict[Candidate, torch.nn.Module] = {}
        self.owners: dict[BenchKey, Candidate] = {}

    def parts(self, cand: Candidate) -> list[Timed]:
        return list(timed_parts(self.config.cost_model, cand.dynamic_activation))

    def fail(self, cand: Candidate, exc: BaseException) -> None:
        self.trials[cand].reason = f"failed: {type(exc).__name__}: {exc}"
        log.info("%s on %s: %s", cand.name, self.op.label(), self.trials[cand].reason)
        self.built.pop(cand, None)

    def build(self, cands: Sequence[Candidate]) -> None:
        """Build and check each candidate. Candidates of one ``weight_format`` (int8 fbgemm, oneDNN
        and int8pack; fp8 weight-only and dynamic) share one quantized copy of the weight: each
        still has its own prepacked handle, which is what its kernel reads."""
        shared: dict[str, dict[str, Tensor]] = {}
        for cand in cands:
            fmt = cand.weight_format
            try:
                if is_baseline(cand):
                    module: torch.nn.Module = _plain_linear(self.weight, self.bias)
                else:
                    module = cand.build(self.weight, self.bias, packed=shared.get(fmt) if fmt else None)
                with torch.no_grad():
                    _check_output(module, self.xs[0], self.op)
                jobs = _jobs_for(cand, self.op, self.env_hash, self.parts(cand), [module], self.xs)
            except Exception as exc:  # a failing candidate never takes tuning down
                self.fail(cand, exc)
                continue
            if fmt and fmt not in shared and isinstance(module, QuantizedLinear):
                shared[fmt] = module.packed()
            self.built[cand] = module
            self.owners.update({j.key: cand for j in jobs})
            # The build's temporaries (float copies made while quantizing: up to ~3x the weight)
            # go back to the OS now, so the next candidate's state does not pile up beside them.
            _return_freed_memory()

    def copies_for(self, cands: Sequence[Candidate]) -> int:
        return copies_per_candidate([_read_bytes(self.built[c]) for c in cands if c in self.built], self.target)

    def cold_jobs(self, cands: Sequence[Candidate], n: int) -> list[BenchJob]:
        """Jobs for `cands`, each over `n` weight copies; ordered by part so that a candidate's
        own jobs are far apart in the timer's rotation."""
        jobs: list[BenchJob] = []
        for cand in [c for c in cands if c in self.built]:
            try:
                copies = _clones(self.built[cand], n)  # type: ignore[arg-type]
                jobs += _jobs_for(cand, self.op, self.env_hash, self.parts(cand), copies, self.xs)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the copies
                self.fail(cand, exc)
        return _by_part(jobs)

    def first_job(self, cand: Candidate) -> BenchJob:
        parts = [p for p in self.parts(cand) if p is not Timed.MATMUL] or self.parts(cand)
        return _jobs_for(cand, self.op, self.env_hash, parts[:1], [self.built[cand]], self.xs)[0]  # type: ignore[list-item]

    def screen(self) -> dict[Candidate, float]:
        """A few calls of each candidate on its one copy: rough seconds per call."""
        rough: dict[Candidate, float] = {}
        if len(self.built) < 2 or self.config.hopeless_factor <= 0:
            return rough
        for cand in self.built:
            try:
                rough[cand] = self.timer.quick(self.first_job(cand), self.device)
            except Exception as exc:  # left to the full timing, which records the failure
                log.debug("screening %s on %s failed: %s", cand.name, self.op.label(), exc)
        return rough

    def cost(self, cand: Candidate, measured: dict[BenchKey, Measurement]) -> float | None:
        parts = {k.timed: v for k, v in measured.items() if self.owners.get(k) is cand}
        if self.trials[cand].reason is not None or len(parts) != len(self.parts(cand)):
            return None
        return op_cost(self.config.cost_model, cand.dynamic_activation, parts).value


def _bench_op(
    op: OpShape, cands: Sequence[Candidate], device: torch.device, env_hash: str, timer: Timer,
    config: TuneConfig, trials: dict[Candidate, Trial],
) -> dict[BenchKey, Measurement]:
    """Build, check and time every candidate in `cands` on `op`; fills reasons into `trials`.

    1. Screen: a few calls each; a candidate `hopeless_factor` times slower than the fastest first
       calls is set aside (fp8 on a CPU can be 50x slower than fp32: timing it fully would
       dominate tuning). 2. Time the rest together, cold. 3. A set-aside candidate within reach of
       the best full timing after all (first calls can be inflated by a neighbour's load) is timed
       with the rest again; the others keep a rough one-sample figure. 4. Run it all again and
       keep the new figures of the `retime_top` cheapest, so the decision between the closest is
       made from one more interleaved run (DESIGN.md section 5: the machine is noisy). The weight
       copies are built once per op and freed with it."""
    bench = _OpBench(op, env_hash, device, timer, config, trials)
    bench.build(cands)
    rough = bench.screen()
    best_rough = min(rough.values(), default=float("inf"))
    hopeless = [c for c, t in rough.items() if t > config.hopeless_factor * best_rough]
    live = [c for c in bench.built if c not in hopeless]
    _return_freed_memory()  # the screening calls' temporaries: let the copies reuse those pages
    n = bench.copies_for(live)
    jobs = bench.cold_jobs(live, n)
    measured = _measure(timer, jobs, device)
    if hopeless:
        full = [v.median_s for k, v in measured.items() if k.timed is not Timed.MATMUL]
        reach = config.hopeless_factor * min(full, default=float("inf"))
        recheck = [c for c in hopeless if rough[c] <= reach]
        if recheck:  # timed with the rest again, in the same conditions
            live += recheck
            jobs = _by_part(jobs + bench.cold_jobs(recheck, n))
            measured = _measure(timer, jobs, device)
        for cand in hopeless:
            if cand not in recheck:
                _rough_figures(bench, cand, rough[cand], measured)
    for key, cand in bench.owners.items():
        if key not in measured and trials[cand].reason is None:
            trials[cand].reason = "failed while being timed"
    if config.retime_top >= 2:
        costs = {c: v for c in live if (v := bench.cost(c, measured)) is not None}
        top = set(sorted(costs, key=lambda c: (costs[c], c.order, c.params_json()))[: config.retime_top])
        if len(top) >= 2:
            # All jobs run again (same copies, same cache traffic); only the top ones are updated.
            again = _measure(timer, [j for j in jobs if bench.owners[j.key] in costs], device)
            measured.update({k: v for k, v in again.items() if bench.owners[k] in top})
    return {k: v for k, v in measured.items() if trials[bench.owners[k]].reason is None}


def _rough_figures(bench: _OpBench, cand: Candidate, rough: float, measured: dict[BenchKey, Measurement]) -> None:
    """A hopeless candidate's parts get one-sample figures: its screening time for the primary
    part, one quick call for the matmul part of a dynamic candidate."""
    for part in bench.parts(cand):
        t: float | None = rough
        if part is Timed.MATMUL:
            try:
                job = _jobs_for(cand, bench.op, bench.env_hash, [part], [bench.built[cand]], bench.xs)[0]  # type: ignore[list-item]
                t = bench.timer.quick(job, bench.device)
            except Exception:  # noqa: BLE001 - recorded as "failed while being timed"
                t = None
        if t is not None:
            measured[bench_key(bench.env_hash, cand, bench.op, part)] = Measurement(t, t, t, 1, None)


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
    if todo:
        _return_freed_memory()  # the warm run's and the cache lookup's leftovers, before any build
    bar = _progress(sum(len(c) for c in todo.values()), progress)
    started = time.perf_counter()
    for i, (op, cands) in enumerate(sorted(todo.items())):
        fresh = _bench_op(op, cands, device, env_hash, timer, config, results[op])
        _return_freed_memory()
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


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only; other libcs have no such call
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Hand the heap pages freed by one op's candidates and weight copies back to the OS. glibc
    keeps freed small and mid-size blocks for reuse, so without this the next op's allocations
    land beside them and the process's peak grows op by op (measured with DemoMLP(512): +75 MiB
    instead of +55 MiB over the start)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
