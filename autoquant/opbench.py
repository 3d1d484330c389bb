"""One op's candidates on the timing harness: synthetic weights and inputs, each candidate built and
checked once, cold weight copies, and the jobs the timer runs (DESIGN.md section 5).

A call reads what it would read inside a model: each timed call goes to its own copy of what a
call reads (weights, prepacked handles), so the copies of all the op's candidates together evict
one another, as a model's other layers do. A CUDA error that poisons the process's context is
turned into ``DeviceFault`` wherever a candidate's call is caught, so one kernel's illegal address
never becomes every later candidate's "failure".
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .bench import BenchJob, Timer, cuda_context_broken, is_sticky_cuda_error, measure_within
from .candidates import Candidate, QuantizedLinear, is_baseline
from .candidates._cpu_ops import PREPACK_CACHE
from .config import TuneConfig
from .costmodel import Cost, Prediction, fallback_parts, op_cost, primary_part, timed_parts
from .keys import BenchKey, Measurement, OpShape, Timed

__all__ = [
    "DeviceFault",
    "OpBench",
    "Trial",
    "bench_key",
    "copies_per_candidate",
    "measure_jobs",
    "return_freed_memory",
]


class DeviceFault(Exception):
    """Carries a context-poisoning CUDA error out of one op's timing to `tune_ops`."""

    def __init__(self, what: str, error: BaseException) -> None:
        super().__init__(what)
        self.what, self.error = what, error


log = logging.getLogger("autoquant")

# Inputs smaller than this are rotated over a few copies so one buffer does not sit in cache.
_ROTATE_BELOW_BYTES = 8 << 20


@dataclass
class Trial:
    """One candidate on one op: why it was not run, or its measured parts and cost. On a large
    op, `prediction` is its cost predicted from probes at fewer rows, `first_call_s` its first
    full-size call; `skipped` says the prediction ruled it out (then it has no measurement),
    `set_aside` that its first call did (then its figure is that one call)."""

    candidate: Candidate
    reason: str | None = None
    parts: dict[Timed, Measurement] = field(default_factory=dict)
    cost: Cost | None = None
    cached: bool = False
    prediction: Prediction | None = None
    first_call_s: float | None = None
    skipped: bool = False
    set_aside: bool = False  # its first full-size call ruled it out: a one-sample figure
    from_m: int | None = None  # on_miss="nearest": its figures are the cache's at this M

    @property
    def ok(self) -> bool:
        return self.reason is None and self.cost is not None


def bench_key(env_hash: str, cand: Candidate, op: OpShape, timed: Timed) -> BenchKey:
    return BenchKey(env_hash=env_hash, candidate=cand.family, params=cand.params_json(),
                    version=cand.version, op=op, timed=timed)


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
# A pessimistic memory bandwidth (bytes/s) for bounding what a cold weight read adds to a call:
# half of what the reference machine shows (BenchConfig.cold_bytes' notes: a 1 MiB weight read
# cold adds about 0.1 ms to a call, ~10 GB/s).
_SLOW_MEMORY_BYTES_PER_S = 5e9
_PART_ORDER = {Timed.FULL: 0, Timed.EAGER: 0, Timed.RELU: 1, Timed.MATMUL: 2}


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
        if part is Timed.FULL or part is Timed.EAGER:  # the same call; the timer times it by its label
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


def _can_capture(timer: Timer, job: BenchJob, device: torch.device) -> bool:
    """Whether the timer can capture `job` in a CUDA graph (timers without the method: yes)."""
    method = getattr(timer, "can_capture", None)
    return bool(method(job, device)) if callable(method) else True


def _cold_bytes(timer: Timer, device: torch.device) -> int:
    """How many bytes of weight copies the timer wants each candidate to cycle over (0: hot).
    Timers without the method (user-supplied ones) time hot."""
    method = getattr(timer, "cold_bytes", None)
    return int(method(device)) if callable(method) else 0


# A candidate's output is checked on this many rows of the op's input at most: a full-size call
# of a slow kernel on a large op costs seconds, and shape, dtype and finiteness show on a few rows.
_CHECK_ROWS = 8


def _check_output(module: torch.nn.Module, x: Tensor, op: OpShape) -> None:
    x = x[:_CHECK_ROWS]
    y = module(x)
    if tuple(y.shape) != (x.shape[0], op.n):
        raise RuntimeError(f"output shape {tuple(y.shape)} != expected {(x.shape[0], op.n)}")
    if y.dtype != x.dtype:
        raise RuntimeError(f"output dtype {y.dtype} != activation dtype {x.dtype}")
    if op.m and not bool(torch.isfinite(y).all()):
        raise RuntimeError("output has NaN or Inf on finite inputs")


def check_fatal(exc: BaseException, device: torch.device, what: str) -> None:
    """Raise DeviceFault when `exc` left the CUDA context unusable (see CudaFaultError)."""
    if isinstance(exc, DeviceFault):
        raise exc
    if is_sticky_cuda_error(exc) or (isinstance(exc, RuntimeError) and cuda_context_broken(device)):
        raise DeviceFault(what, exc) from exc


def measure_jobs(timer: Timer, jobs: list[BenchJob], device: torch.device,
                 budget_s: float | None = None, least: int | None = None) -> dict[BenchKey, Measurement]:
    """Time `jobs` interleaved within `budget_s` (at least `least` samples, if given); if the
    group fails, time each alone so one bad job stays alone. A CUDA error that poisons the context
    stops tuning instead."""
    if not jobs:
        return {}
    try:
        return dict(zip((j.key for j in jobs), measure_within(timer, jobs, device, budget_s, least=least)))
    except Exception as exc:
        check_fatal(exc, device, f"timing {jobs[0].key.op.label()}")
        out: dict[BenchKey, Measurement] = {}
        share = None if budget_s is None else budget_s / len(jobs)
        for job in jobs:
            try:
                out[job.key] = measure_within(timer, [job], device, share, least=least)[0]
            except Exception as exc:  # recorded by the caller as this candidate's reason
                check_fatal(exc, device, f"timing {job.key.candidate} {job.key.params}")
                log.debug("timing %s failed: %s", job.key, exc)
        return out


def _by_part(jobs: list[BenchJob]) -> list[BenchJob]:
    """All FULL jobs, then RELU, then MATMUL (stable): a candidate's own jobs far apart."""
    return sorted(jobs, key=lambda j: _PART_ORDER[j.key.timed])


def _inputs(op: OpShape, device: torch.device) -> list[Tensor]:
    """Activations of `op`'s shape for probing at its row count (seeded by the shape)."""
    gen = torch.Generator().manual_seed(op.m * 1_000_003 + op.k * 1009 + op.n + 7)
    return [torch.randn(op.m, op.k, generator=gen).to(device=device, dtype=op.torch_dtype)]


class OpBench:
    """The candidates of one op, built once and checked; `cold_jobs` gives them weight copies.

    What each candidate is timed as follows the timing path (``costmodel.timing_path``): on CUDA
    deployed in graphs, a candidate whose call cannot be captured (``Timer.can_capture``) is in
    `uncaptured` and is timed as ``Timed.EAGER`` instead, so its rows say which path ran."""

    def __init__(self, op: OpShape, env_hash: str, device: torch.device, timer: Timer, config: TuneConfig,
                 trials: dict[Candidate, Trial]) -> None:
        self.op, self.env_hash, self.device, self.timer, self.config = op, env_hash, device, timer, config
        self.trials = trials
        self.weight, self.bias, self.xs = _synthetic(op, device)
        self.target = _cold_bytes(timer, device)
        self.built: dict[Candidate, torch.nn.Module] = {}
        self.owners: dict[BenchKey, Candidate] = {}
        self.first_calls: dict[Candidate, float] = {}  # seconds of each one's first full-size call
        self.probe_s: dict[Candidate, float] = {}  # seconds per call at each one's largest probe so far
        self.path = {"device": device.type, "deployment": config.deployment}
        self.uncaptured: set[Candidate] = set()

    def parts(self, cand: Candidate) -> list[Timed]:
        if cand in self.uncaptured:
            return list(fallback_parts(**self.path))
        return list(timed_parts(self.config.cost_model, cand.dynamic_activation, **self.path))

    @property
    def primary(self) -> Timed:
        """The part the op's candidates are compared on (a candidate in `uncaptured` has its
        fallback instead: see `primary_of`)."""
        return primary_part(self.config.cost_model, **self.path)

    def primary_of(self, cand: Candidate) -> Timed:
        return self.parts(cand)[0] if cand in self.uncaptured else self.primary

    def fail(self, cand: Candidate, exc: BaseException) -> None:
        check_fatal(exc, self.device, f"running {cand.name}")
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
                    # Calibrated candidates (int8_smooth) get the synthetic input's own statistics:
                    # timing does not depend on their values.
                    module = cand.build(self.weight, self.bias, packed=shared.get(fmt) if fmt else None,
                                        act_absmax=self.xs[0].abs().amax(dim=0).float() if cand.calibrated else None)
                with torch.no_grad():
                    _check_output(module, self.xs[0], self.op)
                jobs = _jobs_for(cand, self.op, self.env_hash, self.parts(cand), [module], self.xs)
                if fallback_parts(**self.path) and not all(_can_capture(self.timer, j, self.device) for j in jobs):
                    self.uncaptured.add(cand)  # timed eagerly, and labelled so
                    log.info("%s on %s cannot be captured in a CUDA graph: timed as eager calls",
                             cand.name, self.op.label())
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
            return_freed_memory()

    def copies_for(self, cands: Sequence[Candidate]) -> int:
        return copies_per_candidate([_read_bytes(self.built[c]) for c in cands if c in self.built], self.target)

    def copies_of(self, cand: Candidate, n: int) -> int:
        """`n`, or 1 where `cand`'s first full-size call lasts so long that reading its weights
        from memory instead of cache would change it by under 2%: copies then only multiply the
        cost of each timed pass (a slow kernel over a small weight made 100-call passes)."""
        return self._copies(cand, n, self.first_calls.get(cand))

    def _copies(self, cand: Candidate, n: int, t: float | None) -> int:
        if n <= 1 or t is None:
            return n
        cold_penalty = _read_bytes(self.built[cand]) / _SLOW_MEMORY_BYTES_PER_S
        return 1 if cold_penalty < 0.02 * t else n

    def cold_jobs(self, cands: Sequence[Candidate], n: int, *, rows: int | None = None,
                  strict: bool = False) -> list[BenchJob]:
        """Jobs for `cands`, each over `n` weight copies; ordered by part so that a candidate's
        own jobs are far apart in the timer's rotation. `rows`: the primary part only, at that
        many rows (a probe). `strict`: a candidate whose copies fail raises instead of failing."""
        op = self.op if rows is None else replace(self.op, m=rows)
        xs = self.xs if rows is None else _inputs(op, self.device)
        jobs: list[BenchJob] = []
        for cand in [c for c in cands if c in self.built]:
            parts = self.parts(cand) if rows is None else [self.primary_of(cand)]
            try:
                # a probe's copies follow the candidate's time at the probe below (a lower bound)
                k = self.copies_of(cand, n) if rows is None else self._copies(cand, n, self.probe_s.get(cand))
                copies = _clones(self.built[cand], k)  # type: ignore[arg-type]
                jobs += _jobs_for(cand, op, self.env_hash, parts, copies, xs)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the copies
                if strict:
                    raise
                self.fail(cand, exc)
        return _by_part(jobs)

    def first_job(self, cand: Candidate) -> BenchJob:
        return _jobs_for(cand, self.op, self.env_hash, [self.primary_of(cand)], [self.built[cand]], self.xs)[0]  # type: ignore[list-item]

    def key(self, cand: Candidate, rows: int) -> BenchKey:
        return bench_key(self.env_hash, cand, replace(self.op, m=rows), self.primary_of(cand))

    def cost(self, cand: Candidate, measured: dict[BenchKey, Measurement]) -> float | None:
        parts = {k.timed: v for k, v in measured.items() if self.owners.get(k) is cand}
        if self.trials[cand].reason is not None or len(parts) != len(self.parts(cand)):
            return None
        return op_cost(self.config.cost_model, cand.dynamic_activation, parts).value


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only; other libcs have no such call
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the heap pages freed by one op's candidates and weight copies back to the OS. glibc
    keeps freed small and mid-size blocks for reuse, so without this the next op's allocations
    land beside them and the process's peak grows op by op (measured with DemoMLP(512): +75 MiB
    instead of +55 MiB over the start)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
