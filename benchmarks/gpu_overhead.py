"""Host time of one eager call of each finalized layer, and where it goes (cProfile), at M=1.

Why: the first H200 run (benchmarks/results/gpu/h200-2026-11-30/report.md) measured synchronized
eager calls of the Triton-backed layers at 8-25x their CUDA-graph replay (int8_weight_only/triton,
4096x4096, M=1: 205 us eager vs 13 us graph; bf16 F.linear 43 vs 18), so a model run eagerly pays
mostly host time. This prints, per default candidate on a small layer (the GPU finishes each call
before the host issues the next, so the loop measures the host):

- ``host us``: median over 5 blocks of unsynchronized calls of the finalized layer;
- ``vs F.linear``: over plain ``F.linear`` on the same tensors, timed the same way;
- for the slowest ``--profile`` candidates, the top functions by own time from cProfile over 300
  calls (file:line and function, calls per layer call, microseconds per layer call).

Prints only (scripts/gpu_check.sh keeps it in log.txt); no result file.

    python benchmarks/gpu_overhead.py                        # CUDA, bf16, K=N=512
    python benchmarks/gpu_overhead.py --device cpu --dtype float32   # the dry run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def host_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Median over 5 blocks of `calls` back-to-back calls, microseconds per call (host clock)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(10):
        fn()
    sync()
    blocks = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return statistics.median(blocks)


def profile_lines(fn: Callable[[], object], calls: int, top: int) -> list[str]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # own time
    out = []
    for (path, line, name), (_cc, ncalls, tottime, cumtime, _callers) in rows:
        short = "/".join(path.split("/")[-2:])
        out.append(f"    {tottime / calls * 1e6:8.2f} us own {cumtime / calls * 1e6:8.2f} us cum "
                   f"{ncalls / calls:5.1f}x  {short}:{line} {name}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--size", type=int, default=512, help="K = N of the layer")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile", type=int, default=3, help="profile this many slowest candidates")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args(argv)

    from autoquant.candidates import default_candidates
    from autoquant.keys import OpShape, dtype_name

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_overhead: no CUDA device here (use --device cpu for a dry run)")
    gen = torch.Generator().manual_seed(0)
    k = n = args.size
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=dtype)
    x = torch.randn(1, k, generator=gen).to(device=device, dtype=dtype)
    print(f"gpu_overhead: {device} {dtype}, K=N={k}, M=1, {args.calls} calls per block, torch {torch.__version__}")
    results: list[tuple[float, str, Callable[[], object]]] = []
    with torch.no_grad():
        base = host_us(lambda: F.linear(x, w), device, args.calls)
        print(f"{'F.linear':60s} {base:9.1f} us   1.00x")
        for cand in default_candidates(device, dtype):
            reason = cand.supports(device, OpShape(1, k, n, False, dtype_name(dtype)))
            if reason is not None:
                print(f"{cand.name:60s}  declined: {reason[:70]}")
                continue
            try:
                layer = cand.build(w, None, act_absmax=x.float().abs().amax(0))  # calibrated kernels read it
                call = (lambda layer=layer: layer(x))
                us = host_us(call, device, args.calls)
            except Exception as exc:  # noqa: BLE001 - one candidate's failure is a line, not the end
                print(f"{cand.name:60s}  failed: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            results.append((us, cand.name, call))
            print(f"{cand.name:60s} {us:9.1f} us {us / base:6.2f}x")
        for us, name, call in sorted(results, key=lambda r: r[0], reverse=True)[: args.profile]:
            print(f"\nprofile of {name} ({us:.1f} us per call), top {args.top} by own time:")
            print("\n".join(profile_lines(call, 300, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
