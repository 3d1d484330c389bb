"""Timing you can trust (DESIGN.md section 5): on GPU, each job on the path its key names (CUDA-graph
replays, or synchronized eager calls for ``Timed.EAGER``); a careful timer on CPU.

The tuner hands the harness a group of :class:`BenchJob` for ONE op (every candidate of it); the
harness times them interleaved so drift and a neighbour's load hit all of them alike, and returns
one :class:`~autoquant.keys.Measurement` per job. Timers are injectable: tests pass
:class:`FakeTimer`, a deterministic function of the job's key, wrapped in :class:`CountingTimer`.

>>> import torch
>>> from autoquant.keys import BenchKey, OpShape, Timed
>>> key = BenchKey("e", "float", "{}", 1, OpShape(4, 8, 8, False, "float32"), Timed.FULL)
>>> x, w = torch.randn(4, 8), torch.randn(8, 8)
>>> [m] = CpuTimer(BenchConfig(rounds=3, min_block_s=1e-4)).measure([BenchJob(key, lambda: x @ w)], torch.device("cpu"))
>>> m.samples
3
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .keys import BenchKey, Measurement

__all__ = [
    "BenchConfig",
    "BenchJob",
    "CaptureError",
    "CountingTimer",
    "CpuTimer",
    "CudaTimer",
    "FakeTimer",
    "Timer",
    "calls_per_sample",
    "cuda_context_broken",
    "default_timer",
    "is_eager_job",
    "is_sticky_cuda_error",
    "last_level_cache_bytes",
    "measure_within",
    "paired_blocks",
    "per_call_s",
    "quantiles",
    "time_callables",
]


@dataclass(frozen=True)
class BenchConfig:
    """Harness settings. CPU: `rounds` interleaved samples per job, each a block of repetitions
    lasting at least `min_block_s`. CUDA: `cuda_samples` event-timed graph replays per job. Timed
    within a time budget (:func:`measure_within`), a job gets fewer samples, never fewer than
    `min_samples`: a large op's three samples of 200 ms calls say more than a small op's nine."""

    rounds: int = 9
    min_samples: int = 3
    min_block_s: float = 2e-3
    warmup_s: float = 5e-3
    max_reps: int = 10_000
    cpu_threads: int | None = None  # None: torch's current thread count, held fixed while timing
    cuda_samples: int = 50
    l2_flush_mb: int = 256
    # CPU: how many bytes of other weights a timed call should have read since the last call on
    # the same weight copy, so that every call reads its weights from memory as it does inside a
    # model whose other layers evict them (the CPU analogue of the L2 flush). The tuner spreads
    # this over copies of ALL the op's candidates, timed one pass each in turn, so it is what
    # tuning holds in weight copies per op, not per candidate (and only for ops whose candidates
    # together are smaller than it). None: the last-level cache. Measured on the reference
    # machine (2-core EPYC VM, 32 MiB L3), a 512x512 fp32 layer at M=1 cycling over copies of
    # its weight: 36-40 us/call up to 8 MiB of copies, 70-148 us (bimodal: sometimes hot) at
    # 11-16 MiB, 112-150 at 24 MiB, 128-168 at 32 MiB, 149-173 at 48 MiB: only the whole LLC
    # makes every call cold. 0: one copy, hot caches.
    cold_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.cuda_samples < 1 or self.min_samples < 1:
            raise ValueError("BenchConfig needs rounds >= 1, cuda_samples >= 1 and min_samples >= 1")
        if self.min_block_s <= 0:
            raise ValueError("BenchConfig.min_block_s must be > 0 seconds")
        if self.cold_bytes is not None and self.cold_bytes < 0:
            raise ValueError("BenchConfig.cold_bytes must be >= 0 (0: hot caches) or None (auto)")

    def cold_target_bytes(self) -> int:
        """Bytes of weight traffic between two calls on one weight copy (see `cold_bytes`)."""
        if self.cold_bytes is not None:
            return self.cold_bytes
        return last_level_cache_bytes()


_LLC_FALLBACK = 32 << 20


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache from Linux sysfs (e.g. 32 MiB of L3); 32 MiB where unknown.
    Read on first use, never at import."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return _LLC_FALLBACK
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(base, entry, "size"), encoding="ascii") as fh:
                text = fh.read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or _LLC_FALLBACK


@dataclass(frozen=True)
class BenchJob:
    """One thing to time: `fn()` runs the op once (inputs already bound), `key` says what it is.

    `calls`: a pass is this many calls, each on a different copy of the weights (`fn` cycles over
    them). A cold CPU timer runs one pass per block, between other jobs' passes, so no call finds
    its copy still in cache; it never repeats a pass back to back."""

    key: BenchKey
    fn: Callable[[], Any] = field(compare=False)
    calls: int = field(default=1, compare=False)


class Timer(Protocol):
    """What the tuner needs from a harness. A timer may also define ``cold_bytes(device) -> int``:
    how many bytes of weight traffic should separate two calls on one weight copy (CpuTimer: the
    last-level cache); without it, one hot copy is timed. And ``can_capture(job, device) -> bool``
    (CudaTimer): whether a job can be captured in a CUDA graph; the tuner then labels a candidate
    that cannot ``Timed.EAGER`` where graph replays are wanted. Without it, every job can.

    A timer times a job the way its key's ``timed`` says (on CUDA: EAGER as synchronized eager
    calls, the other parts as graph replays; on a CPU every part is an eager call)."""

    def quick(self, job: BenchJob, device: torch.device) -> float:
        """A rough seconds-per-call from a couple of calls, to screen out hopeless candidates."""
        ...

    def measure(self, jobs: Sequence[BenchJob], device: torch.device) -> list[Measurement]:
        """One Measurement per job, in order. Jobs are all for the same op; a job whose fn raises
        propagates the exception (the tuner times candidates one by one first, so this is rare).

        A timer may also define ``measure_within(jobs, device, budget_s)``: the same, taking as
        many samples as fit in `budget_s` seconds (warm-up included), at least its minimum; the
        tuner then spends a per-op budget (see :func:`measure_within`)."""
        ...


def measure_within(timer: Timer, jobs: Sequence[BenchJob], device: torch.device,
                   budget_s: float | None, *, least: int | None = None) -> list[Measurement]:
    """`timer.measure_within(jobs, device, budget_s)` where the timer has it (the harness's own
    timers do), else `timer.measure(jobs, device)`: a user's timer keeps its own sample count.
    `budget_s` None: the timer's full sample count. `least`: at least this many samples instead
    of the timer's minimum (the harness's timers take it; others are asked without it)."""
    method = getattr(timer, "measure_within", None)
    if budget_s is None or not callable(method):
        return timer.measure(jobs, device)
    if least is not None and _takes_least(method):
        return method(jobs, device, budget_s, least=least)
    return method(jobs, device, budget_s)


def _takes_least(method: Callable[..., Any]) -> bool:
    try:
        return "least" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _samples_within(budget_s: float | None, spent_s: float, per_sample_s: float, most: int, least: int) -> int:
    """How many samples fit in what is left of `budget_s` after `spent_s` (warm-up), each costing
    `per_sample_s`: between `least` and `most` (all of `most` without a budget)."""
    if budget_s is None or per_sample_s <= 0:
        return most
    fit = int(max(0.0, budget_s - spent_s) / per_sample_s)
    return max(min(least, most), min(most, fit))


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(p25, median, p75) with linear interpolation; a single sample gives it three times."""
    if not samples:
        raise ValueError("no samples to summarise")
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[1], q[2]


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _summary(samples: Sequence[float], load: float | None) -> Measurement:
    p25, med, p75 = quantiles(samples)
    return Measurement(median_s=med, p25_s=p25, p75_s=p75, samples=len(samples), load_avg=load)


@contextlib.contextmanager
def fixed_threads(n: int | None) -> Iterator[int]:
    """Hold torch's intra-op thread count at `n` (or the current one) and restore it after."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class CpuTimer:
    """Interleaved timing with perf_counter, hot or cold.

    Hot (``cold_bytes`` 0): each job is warmed up, then calibrated to a repetition count whose
    block lasts at least `min_block_s` (well above the timer's resolution). Then `rounds` rounds
    run every job's block once, in an order rotated each round; a sample is block time / reps.

    Cold (the default on a CPU): a block is one pass of the job (``BenchJob.calls`` calls, each on
    its own weight copy) and never repeats back to back: a step runs one pass of every job, in an
    order rotated each step, so the other jobs' copies evict a copy before it is read again, as
    the other layers of a model do. A round is as many steps as give the jobs about
    `min_block_s` each on average; a sample is the round's mean seconds per call.

    Garbage collection is paused while timing so a collection never lands inside one block.
    """

    def __init__(self, config: BenchConfig | None = None) -> None:
        self.config = config or BenchConfig()

    def cold_bytes(self, device: torch.device) -> int:
        return self.config.cold_target_bytes() if device.type == "cpu" else 0

    def _calibrate(self, fn: Callable[[], Any]) -> tuple[int, float]:
        """(repetitions per block, seconds of the last block of that many)."""
        cfg = self.config
        deadline = time.perf_counter() + cfg.warmup_s
        fn()
        while time.perf_counter() < deadline:
            fn()
        reps = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg.min_block_s or reps >= cfg.max_reps:
                return reps, elapsed
            # Aim a little above the target so the next try usually suffices.
            grow = 2 if elapsed <= 0 else min(100.0, 1.3 * cfg.min_block_s / elapsed)
            reps = min(cfg.max_reps, max(reps + 1, int(reps * grow)))

    def quick(self, job: BenchJob, device: torch.device) -> float:
        with fixed_threads(self.config.cpu_threads), torch.no_grad():
            best, spent = math.inf, 0.0
            for _ in range(3):
                t0 = time.perf_counter()
                job.fn()
                elapsed = time.perf_counter() - t0
                best, spent = min(best, elapsed), spent + elapsed
                if spent > 0.25:  # a very slow kernel (fp8 on a CPU): one or two calls tell enough
                    break
        return best

    def measure(self, jobs: Sequence[BenchJob], device: torch.device) -> list[Measurement]:
        return self.measure_within(jobs, device, None)

    def measure_within(self, jobs: Sequence[BenchJob], device: torch.device,
                       budget_s: float | None, *, least: int | None = None) -> list[Measurement]:
        """As `measure`, with as many rounds as fit in `budget_s` (between `least`, default
        `min_samples`, and `rounds`); the warm-up tells what one round costs."""
        if not jobs:
            return []
        gc_was_enabled = gc.isenabled()
        started = time.perf_counter()
        fewest = self.config.min_samples if least is None else least
        with fixed_threads(self.config.cpu_threads), torch.no_grad():
            try:
                if self.cold_bytes(device) > 0:
                    samples = self._cold_rounds(jobs, budget_s, started, fewest)
                else:
                    samples = self._hot_rounds(jobs, budget_s, started, fewest)
            finally:
                if gc_was_enabled:
                    gc.enable()
        load = _load_avg()
        return [_summary(s, load) for s in samples]

    def _rounds(self, budget_s: float | None, started: float, per_round_s: float, fewest: int) -> int:
        return _samples_within(budget_s, time.perf_counter() - started, per_round_s, self.config.rounds, fewest)

    def _hot_rounds(self, jobs: Sequence[BenchJob], budget_s: float | None, started: float,
                    fewest: int) -> list[list[float]]:
        calibrated = [self._calibrate(job.fn) for job in jobs]
        reps = [n for n, _ in calibrated]
        rounds = self._rounds(budget_s, started, sum(t for _, t in calibrated), fewest)
        samples: list[list[float]] = [[] for _ in jobs]
        gc.disable()
        for r in range(rounds):
            for i in _rotated(len(jobs), r):
                samples[i].append(_block(jobs[i].fn, reps[i]))
        return samples

    def _cold_rounds(self, jobs: Sequence[BenchJob], budget_s: float | None, started: float,
                     fewest: int) -> list[list[float]]:
        cfg = self.config
        calls = [max(1, job.calls) for job in jobs]
        per_pass = []
        for job, n in zip(jobs, calls):  # warm-up: lazy state, first-touch page faults of every copy
            deadline = time.perf_counter() + cfg.warmup_s
            t = _block(job.fn, n)
            while time.perf_counter() < deadline:
                t = _block(job.fn, n)
            per_pass.append(t * n)
        steps = max(1, min(cfg.max_reps, math.ceil(cfg.min_block_s * len(jobs) / max(sum(per_pass), 1e-9))))
        rounds = self._rounds(budget_s, started, steps * sum(per_pass), fewest)
        samples: list[list[float]] = [[] for _ in jobs]
        gc.disable()
        for r in range(rounds):
            acc = [0.0] * len(jobs)
            for s in range(steps):
                for i in _rotated(len(jobs), r * steps + s):
                    acc[i] += _block(jobs[i].fn, calls[i])
            for i, total in enumerate(acc):
                samples[i].append(total / steps)
        return samples


def _rotated(n: int, r: int) -> list[int]:
    start = r % n
    return list(range(start, n)) + list(range(start))


class CaptureError(RuntimeError):
    """A job labelled as a CUDA-graph replay (FULL, MATMUL, RELU) could not be captured. The
    harness never times such a job another way under the same label: the tuner asks
    ``can_capture`` first and labels a job that cannot be captured ``Timed.EAGER``."""


# A graph replay of one 3-10 us kernel is dominated by the replay's own launch latency, so a graph
# holds several calls: as many as make one replay last about this long (between 1 and
# _GRAPH_MOST_CALLS, and never more than the job's distinct weight copies, so each call in a replay
# still reads its weights cold after the L2 flush). Eager samples hold a few calls for the same
# reason (the final synchronize is paid once per sample).
_REPLAY_TARGET_S = 75e-6
_GRAPH_MOST_CALLS = 32
_EAGER_MOST_CALLS = 8


def calls_per_sample(one_call_s: float, distinct: int, *, most: int = _GRAPH_MOST_CALLS,
                     target_s: float = _REPLAY_TARGET_S) -> int:
    """How many calls one timed sample (a graph replay, or a block of eager calls) holds, given
    one call's seconds: enough that the sample lasts about `target_s`, at least 1, at most `most`
    and at most `distinct` (the job's weight copies: a call never re-reads a copy read earlier in
    the same sample).

    >>> calls_per_sample(5e-6, 32), calls_per_sample(5e-6, 4), calls_per_sample(1e-3, 32)
    (15, 4, 1)
    """
    cap = max(1, min(most, distinct))
    if not one_call_s > 0:
        return cap
    return max(1, min(cap, round(target_s / one_call_s)))


def per_call_s(elapsed_s: float, calls: int) -> float:
    """Seconds per call of a sample that ran `calls` calls in `elapsed_s` seconds.

    >>> per_call_s(60e-6, 12)
    5e-06
    """
    if calls < 1:
        raise ValueError(f"a sample holds at least one call, got {calls}")
    return elapsed_s / calls


def is_eager_job(job: BenchJob) -> bool:
    """Whether `job` is timed as synchronized eager calls (its key says ``Timed.EAGER``)."""
    from .keys import Timed  # noqa: PLC0415 - keys is light; a local import keeps the header short

    return job.key.timed is Timed.EAGER


class CudaTimer:
    """Times each job the way its key says it will run, on `device` (events, streams, capture
    and the L2 flush buffer pinned to it, whichever device is current), L2 flushed before each
    sample.

    - ``Timed.EAGER``: synchronized eager calls, host time included (what a finalized layer costs
      in a model that runs eagerly): per sample, flush, synchronize, then the host clock around a
      few calls and a final synchronize, divided by the calls.
    - ``FULL`` / ``MATMUL`` / ``RELU``: CUDA-graph replays, GPU time only (what a layer costs in a
      captured or compiled model): several calls captured in one graph (``calls_per_sample``),
      timed with events, divided by the calls. A job that cannot be captured raises
      :class:`CaptureError`: it is never timed eagerly under a graph label.

    Warm-up (compilation, autotuning, lazy init) runs before any timed call, on a side stream for
    graphs as capture requires.
    """

    def __init__(self, config: BenchConfig | None = None) -> None:
        self.config = config or BenchConfig()

    def cold_bytes(self, device: torch.device) -> int:
        """The device's L2 size: the tuner gives each candidate enough weight copies that the
        calls of one sample read distinct copies, each cold after the flush."""
        if device.type != "cuda":
            return 0
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or (self.config.l2_flush_mb << 20))

    def can_capture(self, job: BenchJob, device: torch.device) -> bool:
        """Whether `job` can be captured in a CUDA graph (a kernel that syncs or allocates on
        the host cannot)."""
        with torch.no_grad():
            return capture_graph(job.fn, device)[1]

    def quick(self, job: BenchJob, device: torch.device) -> float:
        """The faster of two flushed one-call samples, on the job's own path (a graph replay, or
        a synchronized eager call), after warm-up: screening compares like with like."""
        with torch.no_grad(), torch.cuda.device(device):
            flush = torch.empty(self.config.l2_flush_mb << 20, dtype=torch.uint8, device=device)
            sample = self._sampler(job, device, flush, calls=1)
            best = min(sample() for _ in range(2))
            del flush
        return best

    def measure(self, jobs: Sequence[BenchJob], device: torch.device) -> list[Measurement]:
        return self.measure_within(jobs, device, None)

    def measure_within(self, jobs: Sequence[BenchJob], device: torch.device,
                       budget_s: float | None, *, least: int | None = None) -> list[Measurement]:
        """As `measure`, with as many samples as fit in `budget_s` (between `least`, default
        `min_samples`, and `cuda_samples`); one sample of each job, after warm-up and capture,
        tells what a round costs."""
        if not jobs:
            return []
        cfg = self.config
        started = time.perf_counter()
        with torch.no_grad(), torch.cuda.device(device):
            flush = torch.empty(cfg.l2_flush_mb << 20, dtype=torch.uint8, device=device)
            samplers = [self._sampler(job, device, flush) for job in jobs]
            t0 = time.perf_counter()
            for sample in samplers:
                sample()
            per_round = time.perf_counter() - t0
            n = _samples_within(budget_s, time.perf_counter() - started, per_round, cfg.cuda_samples,
                                cfg.min_samples if least is None else least)
            samples: list[list[float]] = [[] for _ in jobs]
            for r in range(n):
                for i in _rotated(len(jobs), r):
                    samples[i].append(samplers[i]())
            del samplers, flush
        return [_summary(s, None) for s in samples]

    def _sampler(self, job: BenchJob, device: torch.device, flush: torch.Tensor,
                 calls: int | None = None) -> Callable[[], float]:
        """A function taking one flushed sample of `job` (seconds per call), warmed up and, for a
        graph job, captured; `calls` per sample, or as many as ``calls_per_sample`` says."""
        if is_eager_job(job):
            for _ in range(3):  # compilation, autotuning, lazy init
                job.fn()
            n = calls or calls_per_sample(_eager_sample(job.fn, 1, flush, device), job.calls,
                                          most=_EAGER_MOST_CALLS)
            return lambda: _eager_sample(job.fn, n, flush, device)
        run, ok = capture_graph(job.fn, device)
        if not ok:
            raise CaptureError(
                f"{job.key.candidate} {job.key.params} could not be captured in a CUDA graph, so it "
                f"cannot be timed as a '{job.key.timed.value}' graph replay; time it as Timed.EAGER")
        n = calls or calls_per_sample(_event_time(run, flush), job.calls)
        if n > 1:
            del run
            run, ok = capture_graph(job.fn, device, calls=n, warmup=1)
            if not ok:
                raise CaptureError(f"{job.key.candidate} {job.key.params}: a graph of {n} calls failed to "
                                   "capture where one call did")
        return lambda: per_call_s(_event_time(run, flush), n)


def capture_graph(fn: Callable[[], Any], device: torch.device, *, calls: int = 1,
                  warmup: int = 3) -> tuple[Callable[[], Any], bool]:
    """``(graph.replay, True)`` for `calls` calls of `fn` captured in one CUDA graph on `device`,
    after `warmup` calls on a side stream (compilation, autotuning and lazy init must not happen
    inside a capture); ``(fn, False)`` where capture fails (a kernel that syncs or allocates on
    the host): the caller decides what to time instead, and says so."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            torch.cuda.synchronize(device)
            return graph.replay, True
        except Exception:  # noqa: BLE001 - capture unsupported for this kernel
            torch.cuda.synchronize(device)
            return fn, False


def _event_time(run: Callable[[], Any], flush: torch.Tensor) -> float:
    """Seconds of one call of `run` between CUDA events, after flushing L2 with `flush`."""
    flush.zero_()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _eager_sample(fn: Callable[[], Any], calls: int, flush: torch.Tensor, device: torch.device) -> float:
    """Seconds per call of `calls` eager calls of `fn`, host time included: flush L2, wait for
    the device, then the host clock around the calls and a final synchronize."""
    flush.zero_()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return per_call_s(time.perf_counter() - t0, calls)


# CUDA errors after which the process's CUDA context is unusable: every later launch fails with
# the same error, so the candidates timed after one would all fail for a reason not their own.
# (Out of memory, invalid argument or a launch configuration a device rejects are not sticky.)
_STICKY_CUDA = ("illegal memory access", "illegal address", "illegal instruction", "misaligned address",
                "unspecified launch failure", "device-side assert", "launch timed out", "launch timeout",
                "hardware stack error", "uncorrectable ecc", "ecc error")


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a CUDA error that poisons the
    process's CUDA context, such as "CUDA error: an illegal memory access was encountered" (torch
    raises it as ``torch.AcceleratorError``, a RuntimeError). Reads the error text only, so it
    answers the same on a machine without a GPU."""
    accel = getattr(torch, "AcceleratorError", ())
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).lower()
        if ("cuda" in text or isinstance(cur, accel)) and any(p in text for p in _STICKY_CUDA):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def cuda_context_broken(device: torch.device) -> bool:
    """On a CUDA device: whether a synchronize now raises (the context is poisoned); False elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - any failure here means the context cannot run kernels
        return True
    return False


def default_timer(device: torch.device, config: BenchConfig | None = None) -> Timer:
    """The real harness for `device`."""
    if device.type == "cuda":
        return CudaTimer(config)
    return CpuTimer(config)


class FakeTimer:
    """Deterministic timer for tests: `cost(key) -> seconds`; runs each fn once so a failing
    candidate still fails as it would under the real harness (set `run=False` to skip that)."""

    def __init__(self, cost: Callable[[BenchKey], float], *, spread: float = 0.0, run: bool = True,
                 capture: Callable[[BenchKey], bool] | None = None) -> None:
        self.cost = cost
        self.spread = spread
        self.run = run
        self.capture = capture

    def can_capture(self, job: BenchJob, device: torch.device) -> bool:
        """`capture(key)` where given (a fake CUDA graph capture that fails for some), else True."""
        return True if self.capture is None else bool(self.capture(job.key))

    def quick(self, job: BenchJob, device: torch.device) -> float:
        if self.run:
            job.fn()
        return float(self.cost(job.key))

    def measure_within(self, jobs: Sequence[BenchJob], device: torch.device,
                       budget_s: float | None, *, least: int | None = None) -> list[Measurement]:
        """The same figures whatever the budget: a fake's cost does not depend on samples."""
        return self.measure(jobs, device)

    def measure(self, jobs: Sequence[BenchJob], device: torch.device) -> list[Measurement]:
        out = []
        for job in jobs:
            if self.run:
                job.fn()
            t = float(self.cost(job.key))
            half = t * self.spread
            out.append(Measurement(median_s=t, p25_s=t - half, p75_s=t + half, samples=1))
        return out


class CountingTimer:
    """Wraps a timer and counts what it was asked to time: `calls` (measure calls), `quick_calls`
    (screening calls), `keys` (every key measured), `quick_keys` (every key screened) and
    `budgets` (per measure call: its first job's key and its time budget, None for none). A warm
    cache leaves all of them empty or zero."""

    def __init__(self, inner: Timer) -> None:
        self.inner = inner
        self.calls = 0
        self.quick_calls = 0
        self.keys: list[BenchKey] = []
        self.quick_keys: list[BenchKey] = []
        self.budgets: list[tuple[BenchKey, float | None]] = []

    def cold_bytes(self, device: torch.device) -> int:
        method = getattr(self.inner, "cold_bytes", None)
        return int(method(device)) if callable(method) else 0

    def can_capture(self, job: BenchJob, device: torch.device) -> bool:
        method = getattr(self.inner, "can_capture", None)
        return bool(method(job, device)) if callable(method) else True

    def quick(self, job: BenchJob, device: torch.device) -> float:
        self.quick_calls += 1
        self.quick_keys.append(job.key)
        return self.inner.quick(job, device)

    def measure(self, jobs: Sequence[BenchJob], device: torch.device) -> list[Measurement]:
        return self.measure_within(jobs, device, None)

    def measure_within(self, jobs: Sequence[BenchJob], device: torch.device,
                       budget_s: float | None, *, least: int | None = None) -> list[Measurement]:
        self.calls += 1
        self.keys.extend(job.key for job in jobs)
        if jobs:
            self.budgets.append((jobs[0].key, budget_s))
        return measure_within(self.inner, jobs, device, budget_s, least=least)


def _block(fn: Callable[[], Any], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def paired_blocks(a: Callable[[], Any], b: Callable[[], Any], rounds: int, block_s: float, *,
                  calibration_calls: int = 3) -> tuple[list[float], list[float]]:
    """Seconds per call of `a` and of `b`, one sample each per round: each round times a block of
    each back to back, in alternating order, with gc paused, so drift and a neighbour's bursts hit
    both sides of a round alike (take per-round differences or ratios). Both are warmed up with
    `calibration_calls` calls; the block length is calibrated on `b`."""
    for fn in (a, b):
        _block(fn, calibration_calls)
    reps = max(1, int(block_s / max(_block(b, calibration_calls), 1e-9)))
    sa: list[float] = []
    sb: list[float] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            if r % 2:
                ta, tb = _block(a, reps), _block(b, reps)
            else:
                tb, ta = _block(b, reps), _block(a, reps)
            sa.append(ta)
            sb.append(tb)
    finally:
        if gc_was:
            gc.enable()
    return sa, sb


def time_callables(fns: dict[str, Callable[[], Any]], device: torch.device,
                   config: BenchConfig | None = None, *, deployment: str = "eager") -> dict[str, Measurement]:
    """Time named zero-argument callables side by side (interleaved) with the real harness:
    e.g. a float model against its autoquantized copy, for an end-to-end speedup. On CUDA,
    `deployment` "eager" times synchronized eager calls (how the models run unless captured),
    "graphs" CUDA-graph replays (raises CaptureError where one cannot be captured)."""
    from .keys import OpShape, Timed  # noqa: PLC0415 - local: keys only label the jobs here

    from .config import check_deployment  # noqa: PLC0415 - config imports this module

    check_deployment(deployment)
    op = OpShape(1, 1, 1, False, "float32")
    path = Timed.EAGER if device.type == "cuda" and deployment == "eager" else Timed.FULL
    jobs = [BenchJob(BenchKey("adhoc", name, "{}", 0, op, path), fn) for name, fn in fns.items()]
    timed = default_timer(device, config).measure(jobs, device)
    return dict(zip(fns, timed))
