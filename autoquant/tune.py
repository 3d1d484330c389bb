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

import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence

import torch

from .bench import BenchJob, Timer
from .candidates import Candidate
from .config import TuneConfig
from .costmodel import fallback_parts, op_cost, timed_parts, usable_parts
from .hardware import Environment, environment
from .keys import BenchKey, Measurement, OpShape, Timed
from .opbench import (DeviceFault, OpBench, Trial, _by_part, bench_key, check_fatal, copies_per_candidate,
                      measure_jobs, return_freed_memory)
from .opbench import _clones, _jobs_for, _read_bytes, _state_bytes  # noqa: F401 - tests and benchmarks import them here
from .screening import Screen, best_known, probe_keys, skip_reason, skipped_by_cache
from .store import Store

__all__ = [
    "ON_MISS",
    "CacheMissError",
    "CudaFaultError",
    "Trial",
    "bench_key",
    "copies_per_candidate",
    "estimate_op_seconds",
    "tune_ops",
]

ON_MISS = ("bench", "error", "baseline", "nearest")

log = logging.getLogger("autoquant")
# A set-aside candidate whose first full-size call took at most this long gets a second call
# before it keeps its rough figure (cheap to repeat, unlike the multi-second calls of large ops).
_SECOND_CALL_BELOW_S = 0.05
# the names api.py and the benchmarks import from here
_return_freed_memory = return_freed_memory
_OpBench = OpBench


class CacheMissError(RuntimeError):
    """Raised with on_miss="error" when the tuning cache lacks measurements this run needs."""


class CudaFaultError(RuntimeError):
    """Tuning stopped on a CUDA error that leaves the process's CUDA context unusable (an illegal
    memory access, a device-side assert, ...): every kernel timed after it would fail too, and
    the layers would be "kept float" for reasons not their own. Measurements of the ops tuned
    before it are in the cache; restart the process to carry on from there."""


def _budget_left(started: float, config: TuneConfig, share: float) -> float | None:
    """Seconds left of `share` of the op's budget (None: no budget)."""
    if config.op_budget_s is None:
        return None
    return max(0.0, config.op_budget_s * share - (time.perf_counter() - started))


def _bench_op(
    op: OpShape, cands: Sequence[Candidate], device: torch.device, env_hash: str, timer: Timer,
    config: TuneConfig, trials: dict[Candidate, Trial], known: Mapping[BenchKey, Measurement] | None = None,
) -> dict[BenchKey, Measurement]:
    """Build, check and time every candidate in `cands` on `op`; fills reasons into `trials`.
    `known`: cached measurements (this op's other candidates, probes at fewer rows).

    1. Screen (:class:`Screen`): probes at fewer rows skip the candidates predicted hopeless,
       one full-size call each sets aside those the probes under-predicted. 2. Time the rest
       together, cold, within the op's budget. 3. A set-aside or skipped candidate within reach of
       the best full timing after all (first calls can be inflated by a neighbour's load) is timed
       with the rest again; set-aside ones otherwise keep a rough one-sample figure, skipped ones
       no figure at all. 4. Time the `retime_top` cheapest again, if they are within noise of
       each other, and keep their new figures, so the decision between the closest is made from
       one more interleaved run (DESIGN.md section 5: the machine is noisy). Timing spends the
       op's `op_budget_s` (samples adapt; never below ``bench.min_samples``). Returns the new
       measurements, probes included."""
    started = time.perf_counter()
    known = known or {}
    bench = OpBench(op, env_hash, device, timer, config, trials)
    bench.build(cands)
    for cand in list(bench.uncaptured):  # its fallback (EAGER) figures are cached: nothing to time
        keys = [bench_key(env_hash, cand, op, p) for p in bench.parts(cand)]
        if cand in bench.built and all(k in known for k in keys):
            del bench.built[cand]
            for k in keys:
                bench.owners.pop(k, None)
    built_s = time.perf_counter() - started
    screen = Screen(bench, known)
    screen.run()
    screened_s = time.perf_counter() - started - built_s
    hopeless = screen.set_aside()
    live = [c for c in bench.built if c not in hopeless and c not in screen.skipped]
    return_freed_memory()  # the screening calls' temporaries: let the copies reuse those pages
    n = bench.copies_for(live)
    jobs = bench.cold_jobs(live, n)
    measured = measure_jobs(timer, jobs, device, _budget_left(started, config, 0.7))
    if hopeless or screen.skipped:
        # The best full figure as a warm cache will read it: cached rows and this run's.
        best = min(best_known(known, op, bench.primary), best_known(measured, op, bench.primary))
        late = screen.reconcile(best)
        pending = {c: screen.first.get(c) for c in [*hopeless, *late] if c in bench.built}
        for cand, t in pending.items():
            # One stall (another process, a page fault) can inflate a single call many times: a
            # set-aside candidate that is cheap to call gets a second call, and keeps the faster.
            if t is not None and config.hopeless_factor * best < t <= _SECOND_CALL_BELOW_S:
                screen.first_call(cand)
                pending[cand] = screen.first[cand] = bench.first_calls[cand] = min(t, screen.first.get(cand, t))
        recheck = [c for c, t in pending.items() if t is None or t <= config.hopeless_factor * best]
        if recheck:  # timed with the rest again, in the same conditions
            live += recheck
            jobs = _by_part(jobs + bench.cold_jobs(recheck, n))
            measured = measure_jobs(timer, jobs, device, _budget_left(started, config, 0.85))
        for cand, t in pending.items():
            if cand not in recheck and t is not None:
                _rough_figures(bench, cand, t, measured)
                trials[cand].set_aside = True
        for cand, p in screen.skipped.items():
            trials[cand].skipped = True
            trials[cand].reason = skip_reason(p, config.hopeless_factor, best)
    for cand in bench.built:
        trials[cand].prediction = screen.prediction(cand)
        trials[cand].first_call_s = screen.first.get(cand)
    for key, cand in bench.owners.items():
        if key not in measured and trials[cand].reason is None:
            trials[cand].reason = "failed while being timed"
    if config.retime_top >= 2:
        _retime(bench, live, jobs, measured, _budget_left(started, config, 1.0))
    log.debug("%s: built %d candidates in %.2fs, screened in %.2fs (%d probe rows, %d first calls, %d skipped), "
              "timed %d in %.2fs", op.label(), len(bench.built), built_s, screened_s, len(screen.fresh),
              len(screen.first), len(screen.skipped), len(live), time.perf_counter() - started - built_s - screened_s)
    out = {k: v for k, v in measured.items() if trials[bench.owners[k]].reason is None}
    out.update(screen.fresh)
    return out


# The top candidates are re-timed only when the second is within this fraction of the first: twice
# the quiet run-to-run spread of the reference machine (DESIGN.md section 5: about +-7%).
_RETIME_WITHIN = 0.15


def _retime(bench: OpBench, live: Sequence[Candidate], jobs: list[BenchJob],
            measured: dict[BenchKey, Measurement], budget_s: float | None) -> None:
    """Time the `retime_top` cheapest of `live` again, when they are close, on weight copies sized
    for them alone (so their calls stay as cold as in the full run), and keep their new figures."""
    costs = {c: v for c in live if (v := bench.cost(c, measured)) is not None}
    top = sorted(costs, key=lambda c: (costs[c], c.order, c.params_json()))[: bench.config.retime_top]
    if len(top) < 2 or costs[top[1]] > (1.0 + _RETIME_WITHIN) * costs[top[0]]:
        return  # nothing close to decide (a large op's retime costs seconds)
    # The full run's weight copies of every other candidate go before the new ones are made
    # (`jobs` is the caller's list: emptied here): with them kept, the retime's copies came on
    # top of all of them, and whether an op was retimed decided the tuning's peak memory
    # (benchmarks/bench_memory.py). The top candidates' own jobs stay, as the fallback below.
    kept = [j for j in jobs if bench.owners[j.key] in top]
    jobs.clear()
    return_freed_memory()
    try:
        again_jobs = bench.cold_jobs(top, bench.copies_for(top), strict=True)
    except Exception as exc:  # noqa: BLE001 - e.g. no memory for new copies: reuse the full run's
        check_fatal(exc, bench.device, "copying weights")
        again_jobs = kept
    again = measure_jobs(bench.timer, again_jobs, bench.device, budget_s)
    measured.update({k: v for k, v in again.items() if bench.owners.get(k) in top})


def _rough_figures(bench: OpBench, cand: Candidate, rough: float, measured: dict[BenchKey, Measurement]) -> None:
    """A set-aside candidate's parts get one-sample figures: its first full-size call for each. For
    the matmul part of a dynamic candidate that is an upper bound (the matmul is part of the op),
    taken instead of one more full-size call of a kernel already ruled out: that call could cost
    seconds and would not change the decision."""
    for part in bench.parts(cand):
        measured[bench_key(bench.env_hash, cand, bench.op, part)] = Measurement(rough, rough, rough, 1, None)


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
    nothing cached stays float); "nearest" times nothing and uses the figures of the same layer
    shape at the nearest M the cache holds (``Trial.from_m`` says which; the report shows it)."""
    if on_miss not in ON_MISS:
        raise ValueError(f"on_miss={on_miss!r}: use one of {ON_MISS}")
    env = env or environment(device)
    env_hash = env.hash
    path = {"device": device.type, "deployment": config.deployment}
    results: dict[OpShape, dict[Candidate, Trial]] = {}
    wanted: dict[BenchKey, tuple[OpShape, Candidate]] = {}
    alternates: list[BenchKey] = []  # what an uncapturable candidate has instead (fallback_parts)
    for op, cands in ops.items():
        trials = results.setdefault(op, {})
        for cand in cands:
            trials[cand] = trial = Trial(cand)
            reason = _supports(cand, device, op)
            if reason is not None:
                trial.reason = reason
                continue
            for part in timed_parts(config.cost_model, cand.dynamic_activation, **path):
                wanted[bench_key(env_hash, cand, op, part)] = (op, cand)
            alternates += [bench_key(env_hash, cand, op, part) for part in fallback_parts(**path)]
    found = store.get_many(list(wanted) + alternates + probe_keys(ops, results, env_hash, config, device.type))
    todo: dict[OpShape, list[Candidate]] = {}
    for op, cand in wanted.values():
        if cand in todo.get(op, []) or _parts_found(found, env_hash, op, cand, config, path, False) is not None:
            continue
        if not skipped_by_cache(op, results[op][cand], found, env_hash, config, device.type):
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
    if todo and on_miss == "nearest":
        _from_nearest_m(todo, results, store, env_hash, config, device.type)
        todo = {}
    if todo:
        return_freed_memory()  # the warm run's and the cache lookup's leftovers, before any build
    bar = _progress(todo, config, device, progress)
    for i, (op, cands) in enumerate(sorted(todo.items())):
        try:
            fresh = _bench_op(op, cands, device, env_hash, timer, config, results[op], found)
        except DeviceFault as fault:
            bar.close()
            raise CudaFaultError(_fault_message(fault, op, i, len(todo), store)) from fault.error
        return_freed_memory()
        if fresh:
            store.put_many(env, fresh)
        found.update(fresh)
        bar.done(op, len(todo))
    bar.close()
    for op, trials in results.items():
        for cand, trial in trials.items():
            if trial.reason is not None or trial.from_m is not None:
                continue
            parts = _parts_found(found, env_hash, op, cand, config, path, True)
            if parts is not None:
                trial.parts = parts
                trial.cost = op_cost(config.cost_model, cand.dynamic_activation, trial.parts)
                trial.cached = cand not in todo.get(op, [])
            else:
                trial.reason = trial.reason or "no measurement (timing failed)"
    return results


def _parts_found(found: Mapping[BenchKey, Measurement], env_hash: str, op: OpShape, cand: Candidate,
                 config: TuneConfig, path: Mapping[str, str], fallback: bool) -> dict[Timed, Measurement] | None:
    """`cand`'s measured parts on `op` among `found`, the ones its cost comes from: its timed
    parts, else (`fallback`) the parts an uncapturable candidate is timed as instead
    (``usable_parts``); None when no such set is complete.

    A cache lookup passes ``fallback=False``: an EAGER row may come from a run deployed eagerly,
    so under "graphs" only the capture check (made when the op is built, timing nothing) tells
    that a candidate without graph rows cannot be captured."""
    have = {p: m for p in Timed if (m := found.get(bench_key(env_hash, cand, op, p))) is not None}
    if fallback:
        parts = usable_parts(config.cost_model, cand.dynamic_activation, have, **path)
    else:
        wanted = timed_parts(config.cost_model, cand.dynamic_activation, **path)
        parts = wanted if all(p in have for p in wanted) else None
    return None if parts is None else {p: have[p] for p in parts}


def _from_nearest_m(todo: Mapping[OpShape, Sequence[Candidate]], results: dict[OpShape, dict[Candidate, Trial]],
                    store: Store, env_hash: str, config: TuneConfig, device: str = "cpu") -> None:
    """on_miss="nearest": give each missing (op, candidate) the figures measured for the same
    layer shape at the nearest M the cache has (nearest on a log scale, the larger on a tie),
    recorded in ``Trial.from_m``; where no M has them, the candidate is out with a reason. Times
    nothing."""
    for op, cands in todo.items():
        ms = sorted(store.measured_ms(env_hash, op.k, op.n, op.bias, op.dtype) - {op.m},
                    key=lambda m: (abs(math.log(m / op.m)), -m)) if op.m > 0 else []
        path = {"device": device, "deployment": config.deployment}
        parts = {c: timed_parts(config.cost_model, c.dynamic_activation, **path) for c in cands}
        left = list(cands)
        for m in ms[:8]:
            near = OpShape(m, op.k, op.n, op.bias, op.dtype)
            keys = {c: [bench_key(env_hash, c, near, p) for p in parts[c]] for c in left}
            got = store.get_many([k for ks in keys.values() for k in ks])
            for c in list(left):
                if (have := _parts_found(got, env_hash, near, c, config, path, False)) is not None:
                    trial = results[op][c]
                    trial.parts = have
                    trial.cost = op_cost(config.cost_model, c.dynamic_activation, trial.parts)
                    trial.cached, trial.from_m = True, m
                    left.remove(c)
            if not left:
                break
        for c in left:
            results[op][c].reason = "not in the tuning cache at this or any other M (on_miss='nearest')"


def _fault_message(fault: DeviceFault, op: OpShape, index: int, total: int, store: Store) -> str:
    return (f"CUDA error while {fault.what} on op {op.label()}: {type(fault.error).__name__}: {fault.error}\n"
            f"An error of this kind leaves this process's CUDA context unusable: every kernel timed after it "
            f"would fail too, so autoquant stopped tuning at op {index + 1} of {total}. The measurements of the "
            f"ops tuned before it are kept in the tuning cache {store.describe()}; this op's are dropped (CUDA "
            "reports errors late, so they may be wrong). Restart the Python process and run autoquant again: "
            "cached ops are not timed again. To find the kernel at fault, rerun with CUDA_LAUNCH_BLOCKING=1; to "
            "leave it out, pass candidates= without it.")


def _supports(cand: Candidate, device: torch.device, op: OpShape) -> str | None:
    try:
        return cand.supports(device, op)
    except ImportError as exc:
        # A broken install of a required package (Triton on Linux x86_64): the candidate is out,
        # but said loudly, once per message, not only as a report reason.
        reason = f"supports() raised {type(exc).__name__}: {exc}"
        if reason not in _IMPORT_ERRORS_LOGGED:
            _IMPORT_ERRORS_LOGGED.add(reason)
            log.error("autoquant: %s is out because a required package failed to import: %s", cand.name, exc)
        return reason
    except Exception as exc:  # supports() must not raise; if it does, that is the reason
        return f"supports() raised {type(exc).__name__}: {exc}"


_IMPORT_ERRORS_LOGGED: set[str] = set()


# A prior for the progress bar's ETA, before any op has been timed: seconds per candidate for
# building and screening, and an assumed throughput for the full-size calls (tqdm's own rate then
# corrects both as ops finish: the bar counts these estimated seconds, not kernels).
_PER_CANDIDATE_S = {"cpu": 0.05, "cuda": 0.2}
_BUILD_S_PER_WEIGHT = 2e-8  # quantizing and prepacking: seconds per weight element per candidate
_FLOPS_PER_S = {"cpu": 2e10, "cuda": 2e13}
_CALLS_PER_CANDIDATE = 12  # warm-up, samples and screening: full-size calls per candidate


def estimate_op_seconds(op: OpShape, n_candidates: int, config: TuneConfig, device: torch.device) -> float:
    """A rough prior for how long tuning `op` with `n_candidates` takes: a cost per candidate
    (fixed, and building it over the weight), plus its full-size calls at an assumed throughput,
    which the op's time budget caps. It weighs
    ops against each other for the progress bar: a 4096-row op is not one small op's worth."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    calls = n_candidates * _CALLS_PER_CANDIDATE * op.flops / _FLOPS_PER_S[kind]
    if config.op_budget_s is not None:
        calls = min(calls, config.op_budget_s)
    return n_candidates * (_PER_CANDIDATE_S[kind] + op.k * op.n * _BUILD_S_PER_WEIGHT) + calls


class _Bar:
    """tqdm on a terminal, in estimated seconds of work (so its ETA weighs a large op as such);
    plain log lines with the same estimate elsewhere."""

    def __init__(self, weights: Mapping[OpShape, float], enabled: bool) -> None:
        self.weights = dict(weights)
        self.total = sum(self.weights.values())
        self.done_weight = 0.0
        self.count = 0
        self.started = time.perf_counter()
        self.tty = bool(enabled and self.weights and sys.stderr.isatty())
        self.enabled = enabled
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm  # noqa: PLC0415 - only when a bar is shown

            self._bar = tqdm(total=round(self.total, 3), desc="autoquant tuning", leave=False,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} ops-work [{elapsed}<{remaining}] {postfix}")

    def eta_s(self) -> float | None:
        """Seconds left: the estimated work left at the rate observed so far (None before any op)."""
        if self.done_weight <= 0:
            return None
        rate = (time.perf_counter() - self.started) / self.done_weight
        return rate * (self.total - self.done_weight)

    def done(self, op: OpShape, n_ops: int) -> None:
        w = self.weights.get(op, 0.0)
        self.done_weight += w
        self.count += 1
        if self._bar is not None:
            self._bar.set_postfix_str(op.label(), refresh=False)
            self._bar.update(round(w, 3))
        elif self.enabled:
            eta = self.eta_s()
            log.info("tuned op %d/%d %s in %.1fs so far; about %.0fs left", self.count, n_ops, op.label(),
                     time.perf_counter() - self.started, eta if eta is not None else float("nan"))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress(todo: Mapping[OpShape, Sequence[Candidate]], config: TuneConfig, device: torch.device,
              enabled: bool) -> _Bar:
    weights = {op: estimate_op_seconds(op, len(c), config, device) for op, c in todo.items()}
    if enabled and todo:
        log.info("autoquant: timing %d (op, kernel) pairs on %d ops, about %.0fs at first guess",
                 sum(len(c) for c in todo.values()), len(todo), sum(weights.values()))
    return _Bar(weights, enabled)
