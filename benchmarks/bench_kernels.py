"""Every candidate kernel against float32 and bf16 F.linear, side by side, from one run.

For each weight shape (K, N) and batch M, on the best device present (CUDA if available, else CPU):
the two baselines (F.linear with float32 weights and activations, and with bf16 ones) and every
candidate of ``default_candidates`` for float32 activations and for bf16 activations (plus the
kernels left out of the defaults) are timed interleaved by ``autoquant.bench.time_callables``
(fixed threads, warm-up, median of interleaved rounds). A candidate that cannot run the op says so
(``supports()``); one that is hopelessly slow is cut off after a single call instead of being timed
for minutes, and stays cut off for larger M and shapes.

    python benchmarks/bench_kernels.py --quick
    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_cpu.csv

Cells read ``time  xF32 xBF16``: the candidate's median time and its speedup over the float32 and
the bf16 F.linear (above 1 is faster). Quantized kernels also differ in accuracy; see
``Candidate.min_sqnr_db``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autoquant.bench import BenchConfig, time_callables
from autoquant.candidates import Candidate, Int8WeightOnly, default_candidates
from autoquant.keys import OpShape, dtype_name

log = logging.getLogger("bench_kernels")

FULL_M = (1, 16, 128, 512)
FULL_SHAPES = ((1024, 1024), (4096, 4096), (4096, 11008))
QUICK_M = (1, 16, 128)
QUICK_SHAPES = ((1024, 1024), (4096, 4096))
ACT_DTYPES = (torch.float32, torch.bfloat16)
# A candidate whose single call takes this many times the float32 baseline's is not timed further.
CUTOFF_RATIO = 12.0


@dataclass
class Row:
    k: int
    n: int
    m: int
    act: str
    name: str
    status: str  # "ok", "n/a: <reason>", "cut: >Nx", "error: ..."
    median_s: float | None = None
    p25_s: float | None = None
    p75_s: float | None = None
    vs_f32: float | None = None
    vs_bf16: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_call_s(fn: Callable[[], Any], device: torch.device, tries: int = 3) -> float:
    """Best of a few single calls (fewer when a call is slow): robust to a neighbour's burst."""
    best = float("inf")
    for _ in range(tries):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if best > 0.5:
            break
    return best


def _candidates(device: torch.device, act: torch.dtype) -> list[Candidate]:
    cands = default_candidates(device, act)
    extra = [Int8WeightOnly("dequant")]
    return list(dict.fromkeys([*cands, *extra]))


def _label(c: Candidate, act: torch.dtype) -> str:
    return f"[{dtype_name(act)}] {c.name}"


def bench_shape(device: torch.device, k: int, n: int, ms: tuple[int, ...], cfg: BenchConfig,
                cut: dict[str, str]) -> list[Row]:
    """All rows for one weight shape; `cut` carries cut-off candidates across calls."""
    gen = torch.Generator(device="cpu").manual_seed(k * 7919 + n)
    w32 = torch.randn(n, k, generator=gen).to(device)
    b32 = torch.randn(n, generator=gen).to(device)
    weights = {torch.float32: (w32, b32), torch.bfloat16: (w32.bfloat16(), b32.bfloat16())}
    layers: dict[str, tuple[Candidate, torch.dtype, Any]] = {}
    errors: dict[str, str] = {}
    for act in ACT_DTYPES:
        for c in _candidates(device, act):
            label = _label(c, act)
            reasons = [c.supports(device, OpShape(m, k, n, True, dtype_name(act))) for m in ms]
            if all(r is not None for r in reasons):
                errors[label] = f"n/a: {reasons[-1]}"
            else:
                try:
                    with torch.no_grad():
                        # int8_smooth is calibrated; timing does not depend on the statistics' values
                        layers[label] = (c, act, c.build(*weights[act], act_absmax=torch.ones(k, device=device)))
                except Exception as exc:  # noqa: BLE001 - a build failure is a result, not a crash
                    errors[label] = f"error: {type(exc).__name__}: {exc}"[:160]
    rows: list[Row] = []
    for m in ms:
        xs = {act: torch.randn(m, k, generator=gen).to(device=device, dtype=act) for act in ACT_DTYPES}
        fns: dict[str, Callable[[], Any]] = {
            "F.linear float32": lambda x=xs[torch.float32]: F.linear(x, w32, b32),
            "F.linear bfloat16": lambda x=xs[torch.bfloat16], w=weights[torch.bfloat16]: F.linear(x, *w),
        }
        base_quick = _one_call_s(fns["F.linear float32"], device, tries=5)
        pending: list[Row] = []
        for label, (c, act, layer) in layers.items():
            row = Row(k, n, m, dtype_name(act), label, "ok")
            reason = c.supports(device, OpShape(m, k, n, True, dtype_name(act)))
            if reason is not None:
                row.status = f"n/a: {reason}"
            elif label in cut:
                row.status = cut[label]
            else:
                fn = (lambda layer=layer, x=xs[act]: layer(x))
                try:
                    with torch.no_grad():
                        fn()  # warm (first-call setup, Triton compile)
                        one = _one_call_s(fn, device)
                except Exception as exc:  # noqa: BLE001 - a kernel failure is a result
                    row.status = f"error: {type(exc).__name__}: {exc}"[:160]
                else:
                    if one > CUTOFF_RATIO * base_quick and one > 0.02:
                        row.status = cut[label] = f"cut: >{CUTOFF_RATIO:.0f}x slower (one call {one * 1e3:.0f} ms)"
                    else:
                        fns[label] = fn
            pending.append(row)
        for label, msg in errors.items():
            pending.append(Row(k, n, m, label.split("]")[0][1:], label, msg))
        log.info("K=%d N=%d M=%d: timing %d callables", k, n, m, len(fns))
        with torch.no_grad():
            timed = time_callables(fns, device, cfg)
        f32, bf16 = timed["F.linear float32"].median_s, timed["F.linear bfloat16"].median_s
        for name in ("F.linear float32", "F.linear bfloat16"):
            t = timed[name]
            rows.append(Row(k, n, m, name.split()[1], name, "ok", t.median_s, t.p25_s, t.p75_s, f32 / t.median_s,
                            bf16 / t.median_s))
        for row in pending:
            if row.name in timed:
                t = timed[row.name]
                row.median_s, row.p25_s, row.p75_s = t.median_s, t.p25_s, t.p75_s
                row.vs_f32, row.vs_bf16 = f32 / t.median_s, bf16 / t.median_s
            rows.append(row)
    return rows


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row.median_s is None:
        return row.status.split(":")[0]
    t = row.median_s
    tt = f"{t * 1e6:.0f}us" if t < 1e-3 else f"{t * 1e3:.1f}ms"
    return f"{tt} {row.vs_f32:.2f}x {row.vs_bf16:.2f}x"


def print_table(rows: list[Row], ms: tuple[int, ...], out: Any = sys.stdout) -> None:
    shapes = sorted({(r.k, r.n) for r in rows})
    for k, n in shapes:
        sub = [r for r in rows if (r.k, r.n) == (k, n)]
        names = list(dict.fromkeys(r.name for r in sub))
        width = max(len(x) for x in names) + 2
        print(f"\nK={k} N={n}   cell: median  speedup-vs-F.linear-float32  speedup-vs-F.linear-bf16", file=out)
        print("name".ljust(width) + "".join(f"M={m}".ljust(26) for m in ms), file=out)
        for name in names:
            by_m = {r.m: r for r in sub if r.name == name}
            print(name.ljust(width) + "".join(_cell(by_m.get(m)).ljust(26) for m in ms), file=out)
    notes = {r.name: r.status for r in rows if r.status.startswith(("n/a", "cut", "error"))}
    if notes:
        print("\nnotes (last status seen per candidate):", file=out)
        for name, status in notes.items():
            print(f"  {name}: {status}", file=out)


def write_csv(rows: list[Row], path: str, device: torch.device) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["device", "threads", "K", "N", "M", "act_dtype", "name", "status", "median_s", "p25_s",
                    "p75_s", "speedup_vs_f32", "speedup_vs_bf16"])
        for r in rows:
            w.writerow([device.type, torch.get_num_threads(), r.k, r.n, r.m, r.act, r.name, r.status,
                        r.median_s, r.p25_s, r.p75_s, r.vs_f32, r.vs_bf16])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_M}, shapes {QUICK_SHAPES}")
    ap.add_argument("--out", help="write every measurement to this CSV file")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's current count)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per op")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    ms, shapes = (QUICK_M, QUICK_SHAPES) if args.quick else (FULL_M, FULL_SHAPES)
    rounds = args.rounds or (5 if args.quick else 9)
    cfg = BenchConfig(rounds=rounds, min_block_s=0.02 if device.type == "cpu" else 2e-3,
                      cpu_threads=torch.get_num_threads())
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} rounds={rounds} "
          f"load={os.getloadavg()[0]:.2f}")
    cut: dict[str, str] = {}
    rows: list[Row] = []
    for k, n in shapes:
        rows += bench_shape(device, k, n, ms, cfg, cut)
    print_table(rows, ms)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.out:
        write_csv(rows, args.out, device)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
