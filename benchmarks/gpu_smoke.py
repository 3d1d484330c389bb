"""GPU smoke test: every default CUDA candidate on the Llama-3-8B linear shapes, one row per case.

For each candidate of ``default_candidates(cuda, dtype)``, each Llama-3-8B shape written as
nn.Linear(in_features=K, out_features=N) (weight [N, K]: q/o 4096x4096, k/v 4096->1024,
gate/up 4096->14336, down 14336->4096) and each M in {1, 17, 128}, it records:

- ``supports``: None or the reason the candidate declines (declined cases stop there);
- ``build_s``: quantizing and building the layer (once per candidate and shape);
- ``sqnr_ref_db`` (the layer's output against ``candidate.reference``, the plain-PyTorch statement
  of what the kernel computes) and ``sqnr_float_db`` (against float32 F.linear on the same float
  weight): the first finds kernel bugs, the second measures the scheme's accuracy;
- ``graph_us``: one call captured in a CUDA graph, replays timed with events after an L2 flush
  (median); ``graph`` says whether capture worked (else the value is eager launches between events);
- ``eager_us``: synchronized eager calls of the finalized layer, host clock, L2 warm (what an
  eager model pays per call, Python and launch included);
- ``lib``: the library's own harness (``autoquant.bench.default_timer``) on the same call, as its
  Measurement records it (which path it ran, where it says).

Rows are appended to ``<out>/smoke.jsonl`` as they are made, so a run cut short (``timeout -s INT``,
``--max-seconds``) keeps every finished row; a summary table is printed at the end. A CUDA error
that poisons the context (illegal address) stops the run with a row saying so.

    python benchmarks/gpu_smoke.py --out results/            # on a GPU
    python benchmarks/gpu_smoke.py --dry-run --out /tmp/x    # CPU, tiny shapes, CPU candidates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# (label, K, N): in_features, out_features.
LLAMA3_8B_SHAPES = (("qo", 4096, 4096), ("kv", 4096, 1024), ("gate_up", 4096, 14336), ("down", 14336, 4096))
MS = (1, 17, 128)
DRY_SHAPES = (("qo", 256, 256), ("kv", 256, 64), ("gate_up", 256, 896), ("down", 896, 256))
DRY_MS = (1, 17)
STICKY = ("illegal memory access", "illegal address", "unspecified launch failure", "device-side assert",
          "misaligned address", "an illegal instruction")


class StopRun(Exception):
    """The CUDA context is unusable (a sticky error): every later case would fail."""


# ------------------------------------------------------------------------------------ timing
def eager_us(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Median over 5 blocks of `calls` synchronized calls, microseconds per call (host clock)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    blocks = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
            sync()
        blocks.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(blocks)


def graph_us(fn: Callable[[], Any], device: torch.device, samples: int,
             flush: torch.Tensor) -> tuple[float, bool]:
    """(median microseconds of one call, captured?): a CUDA graph of one call replayed after an L2
    flush and timed with events (the library's own capture); eager launches between events where
    capture fails."""
    from autoquant.bench import capture_graph

    run, captured = capture_graph(fn, device)
    times = []
    for _ in range(samples):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times), captured


def library_measurement(fn: Callable[[], Any], device: torch.device, label: str, op: Any) -> dict:
    """The library harness's Measurements of `fn`, every field each has, per timed path: "full"
    (a CUDA-graph replay of several calls; absent where `fn` cannot be captured) and "eager"
    (synchronized eager calls, host time included), timed interleaved."""
    from autoquant.bench import BenchConfig, BenchJob, default_timer
    from autoquant.keys import BenchKey, Timed

    timer = default_timer(device, BenchConfig(cuda_samples=20, rounds=3))
    jobs = [BenchJob(BenchKey("smoke", label, "{}", 0, op, Timed.EAGER), fn)]
    full = BenchJob(BenchKey("smoke", label, "{}", 0, op, Timed.FULL), fn)
    if getattr(timer, "can_capture", lambda job, dev: True)(full, device):
        jobs.insert(0, full)
    out = {}
    for job, m in zip(jobs, timer.measure(jobs, device)):
        fields = dataclasses.asdict(m) if dataclasses.is_dataclass(m) else {"median_s": m.median_s}
        out[job.key.timed.value] = {k: (v.value if hasattr(v, "value") else v) for k, v in fields.items()}
    return out


# ------------------------------------------------------------------------------------ checks
def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float | None:
    from autoquant.primitives import sqnr

    value = sqnr(ref, y)  # inf: bit-identical (written as Infinity in the JSON lines)
    return None if math.isnan(value) else round(value, 2)


def _is_sticky(exc: BaseException, device: torch.device) -> bool:
    text = str(exc).lower()
    if device.type != "cuda":
        return False
    if any(s in text for s in STICKY):
        return True
    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - the context is gone
        return True
    return False


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


# ------------------------------------------------------------------------------------ driver
@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    shapes: tuple
    ms: tuple
    samples: int
    eager_calls: int
    deadline: float
    library: bool


def run_shape(cands: list, label: str, k: int, n: int, s: Settings, write: Callable[[dict], None],
              flush: torch.Tensor | None) -> None:
    from autoquant.keys import OpShape, dtype_name

    gen = torch.Generator(device="cpu").manual_seed(k * 31 + n)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device=s.device, dtype=s.dtype)
    xs = {m: torch.randn(m, k, generator=gen).to(device=s.device, dtype=s.dtype) for m in s.ms}
    floats = {m: F.linear(xs[m].float(), w.float()) for m in s.ms}
    for cand in cands:
        if time.monotonic() > s.deadline:
            write({"stopped": "time budget (--max-seconds) spent", "shape": label})
            raise StopRun("time budget spent")
        base = {"candidate": cand.name, "shape": label, "k": k, "n": n, "dtype": dtype_name(s.dtype)}
        reasons = {m: cand.supports(s.device, OpShape(m, k, n, False, dtype_name(s.dtype))) for m in s.ms}
        runs = [m for m in s.ms if reasons[m] is None]
        for m in s.ms:
            if reasons[m] is not None:
                write({**base, "m": m, "supports": reasons[m]})
        if not runs:
            continue
        t0 = time.perf_counter()
        try:
            # calibrated kernels (int8_smooth) read the activations' per-channel absmax
            layer = cand.build(w, None, act_absmax=torch.cat(list(xs.values())).float().abs().amax(0))
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
        except Exception as exc:  # noqa: BLE001 - one candidate's failure is a result, not the end
            for m in runs:
                write({**base, "m": m, "supports": None, "error": "build: " + _error(exc)})
            if _is_sticky(exc, s.device):
                raise StopRun(_error(exc)) from exc
            continue
        build_s = round(time.perf_counter() - t0, 3)
        for m in runs:
            row = run_case(cand, layer, xs[m], floats[m], {**base, "m": m, "supports": None, "build_s": build_s},
                           s, flush)
            write(row)
            if row.get("sticky"):
                raise StopRun(f"sticky CUDA error in {cand.name} {label} M={m}: every later case would fail")
        del layer
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(cand: Any, layer: Any, x: torch.Tensor, y_float: torch.Tensor, row: dict, s: Settings,
             flush: torch.Tensor | None) -> dict:
    from autoquant.keys import OpShape, dtype_name

    stage = "call"
    try:
        with torch.no_grad():
            y = layer(x)
            stage = "reference"
            ref = cand.reference(x, layer.packed(), None)
            row["sqnr_ref_db"] = sqnr_db(ref, y)
            row["sqnr_float_db"] = sqnr_db(y_float, y)
            row["finite"] = bool(torch.isfinite(y).all().item())
            stage = "eager timing"
            row["eager_us"] = round(eager_us(lambda: layer(x), s.device, s.eager_calls), 2)
            if flush is not None:
                stage = "graph timing"
                t, captured = graph_us(lambda: layer(x), s.device, s.samples, flush)
                row["graph_us"], row["graph"] = round(t, 2), captured
    except Exception as exc:  # noqa: BLE001 - recorded per case
        row["error"] = f"{stage}: {_error(exc)}"
        row["traceback"] = traceback.format_exc(limit=6)[-2000:]
        if _is_sticky(exc, s.device):
            row["sticky"] = True
        return row
    if s.library:
        # The library harness is compared, not tested, here: its failure is noted apart.
        try:
            op = OpShape(x.shape[0], x.shape[1], row["n"], False, dtype_name(s.dtype))
            with torch.no_grad():
                row["lib"] = library_measurement(lambda: layer(x), s.device, cand.name, op)
        except Exception as exc:  # noqa: BLE001
            row["lib_error"] = _error(exc)
            if _is_sticky(exc, s.device):
                row["sticky"] = True
    return row


def summarize(rows: list[dict]) -> str:
    lines = [f"{'candidate':58s} {'shape':8s} {'M':>4s} {'ref dB':>7s} {'flt dB':>7s} {'graph us':>9s} "
             f"{'eager us':>9s}  note"]
    for r in rows:
        if "candidate" not in r:
            lines.append(f"-- {r}")
            continue
        def f(key: str, spec: str) -> str:
            v = r.get(key)
            return "-" if v is None else format(v, spec)
        note = r.get("error") or (f"declined: {r['supports'][:60]}" if r.get("supports") else "")
        if r.get("graph") is False:
            note = ("graph capture failed; " + note).strip("; ")
        lines.append(f"{r['candidate'][:58]:58s} {r['shape']:8s} {r['m']:4d} {f('sqnr_ref_db', '7.1f')} "
                     f"{f('sqnr_float_db', '7.1f')} {f('graph_us', '9.1f')} {f('eager_us', '9.1f')}  {note}")
    bad = [r for r in rows if r.get("error")]
    lines.append(f"{len(rows)} rows, {len(bad)} with errors")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="folder for smoke.jsonl (default: here)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, shapes / 16, M in {1, 17}, the CPU candidates: proves the script runs")
    parser.add_argument("--max-seconds", type=float, default=math.inf,
                        help="stop starting new candidates after this many seconds")
    parser.add_argument("--samples", type=int, default=30, help="graph replays timed per case")
    parser.add_argument("--no-library", action="store_true", help="skip the library harness's timing")
    args = parser.parse_args(argv)

    from autoquant.candidates import default_candidates
    from autoquant.keys import parse_dtype

    dtype = parse_dtype(args.dtype)
    if args.dry_run:
        device, shapes, ms = torch.device("cpu"), DRY_SHAPES, DRY_MS
    elif not torch.cuda.is_available():
        print("gpu_smoke.py needs a CUDA GPU; none is available here (use --dry-run on a CPU).")
        return 0
    else:
        device, shapes, ms = torch.device("cuda", torch.cuda.current_device()), LLAMA3_8B_SHAPES, MS
    s = Settings(device, dtype, shapes, ms, args.samples if device.type == "cuda" else 3,
                 20 if device.type == "cuda" else 2, time.monotonic() + args.max_seconds,
                 not args.no_library)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "smoke.jsonl")
    rows: list[dict] = []

    with open(path, "w", encoding="utf-8") as fh:
        def write(row: dict) -> None:
            rows.append(row)
            fh.write(json.dumps(row, default=str) + "\n")
            fh.flush()

        cands = default_candidates(device, dtype)
        write({"device": str(device), "dtype": str(dtype), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "candidates": [c.name for c in cands], "shapes": [list(x) for x in shapes], "ms": list(ms)})
        flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
        try:
            for label, k, n in shapes:
                run_shape(cands, label, k, n, s, write, flush)
        except StopRun as exc:
            write({"stopped": str(exc)})
        except KeyboardInterrupt:  # timeout -s INT: keep what was written, print the summary
            write({"stopped": "interrupted (SIGINT)"})
    print(summarize(rows[1:]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
