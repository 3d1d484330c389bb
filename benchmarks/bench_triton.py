"""Benchmark the autoquant Triton kernels against torch's built-ins and against bf16 F.linear.

For each scheme, M in {1, 16, 64, 256, 1024} and (K, N) in {(4096, 4096), (4096, 14336),
(14336, 4096)} it times, side by side in one run:

    scheme          autoquant (Triton)                     the comparison ("builtin" column)
    int8_wo         int8_wo_mm                             the fastest OTHER int8 path: the fused
                                                           Triton int8 dynamic kernel, and (M > 16
                                                           on CUDA) torch._int_mm + rescale
    int8_dyn        int8_dynamic_linear (quantize + mm)    per-token quantize in torch ops +
                                                           torch._int_mm + rescale
    int8_dyn_mm     int8_dyn_mm (activation pre-quantized) torch._int_mm + rescale
    int4_wo (G=128) int4_wo_mm                             tinygemm torch._weight_int4pack_mm, own
                                                           packing (_convert_weight_to_int4pack)
    fp8_rowwise     fp8_rowwise_mm (pre-quantized)         torch._scaled_mm with row-wise scales

and reports speedups: ``vs_bf16`` = t(bf16 F.linear) / t(impl), ``vs_builtin`` = t(builtin) /
t(triton). The bf16 baseline is timed once per (M, K, N) and shared by all schemes. int8
weight-only is not compared with ``torch._weight_int8pack_mm``: on CUDA that is a naive kernel
(one thread per output, float32 upcast) any kernel beats, so the fair references are bf16 F.linear
(the ``vs_bf16`` column: what int8 weight-only must beat) and the best other int8 path (the
``builtin`` column, named in the note).

Timing (CUDA): warm-up calls first (Triton autotuning happens there), then one call is captured in
a CUDA graph and its replays are timed with CUDA events, with the L2 cache flushed (a 256 MiB
buffer is overwritten) before every sample; the median of the samples is reported.

Targets on an H100 (for reference): int8_wo at M=1 >= 1.6x bf16; int4_wo at M=1 >= 2.5x bf16;
int8_dyn (fused, full op) at M=1024 >= 1.5x bf16.

Usage::

    python benchmarks/bench_triton.py --out benchmarks/results/triton_h100.csv   # needs a GPU
    python benchmarks/bench_triton.py --dry-run    # tiny shapes, CPU, Triton interpreter

Without a GPU (and without --dry-run) the script says so and exits 0.
"""

import argparse
import csv
import functools
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("bench_triton")

MS = (1, 16, 64, 256, 1024)
KNS = ((4096, 4096), (4096, 14336), (14336, 4096))
DRY_MS = (1, 16)
DRY_KNS = ((256, 96),)
INT4_GROUP = 128
TARGETS = {("int8_wo", 1): 1.6, ("int4_wo", 1): 2.5, ("int8_dyn", 1024): 1.5}

Fn = Callable[[], torch.Tensor]
Timer = Callable[[Fn], float]


@dataclass(frozen=True)
class Row:
    scheme: str
    m: int
    k: int
    n: int
    bf16_us: float
    builtin_us: float | None
    triton_us: float | None
    vs_bf16: float | None
    vs_builtin: float | None
    note: str


# ------------------------------------------------------------------------------------ timers
class CudaGraphTimer:
    """Median device time of one call: CUDA graph replay, event timing, L2 flushed per sample."""

    def __init__(self, samples: int, warmup: int, flush_bytes: int = 256 << 20) -> None:
        self.samples = samples
        self.warmup = warmup
        self.flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Fn) -> float:
        for _ in range(self.warmup):  # compilation and autotuning happen here, never in a sample
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # capture-safe warm call on a side stream, as torch.cuda.graphs recommends
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.samples)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.samples)]
        for start, end in zip(starts, ends):
            self.flush.zero_()  # evict the weights from L2 so every sample streams them from HBM
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


class CpuTimer:
    """Median wall time of one call (used by --dry-run, where the interpreter dominates)."""

    def __init__(self, samples: int, warmup: int) -> None:
        self.samples = samples
        self.warmup = warmup

    def __call__(self, fn: Fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.samples):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6


# ------------------------------------------------------------------------------------ schemes
# Each scheme builder gets (x, weights) and returns (triton_fn, builtin_fn or None, reference
# output for a sanity check, note). Weights are random quantized data: speed does not depend on it.
def _int8_weight(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    return w, torch.rand(n, device=device) * 0.01 + 1e-3


def scheme_int8_wo(x: torch.Tensor, n: int):
    """int8_wo_mm against the fastest other int8 path for the same weight (timed, see _run_scheme)."""
    from autoquant import kernels as K

    w, s = _int8_weight(n, x.shape[1], x.device.type)
    others: dict[str, Fn] = {"int8_dyn triton": lambda: K.int8_dynamic_linear(x, w, s)}
    if not _int_mm_note(x.shape[0], x.device.type):
        w_t = w.T
        others["quantize+_int_mm"] = lambda: _torch_int8_dynamic(x, w_t, s)
    # The others quantize the activation too: checked against their own reference, not this one.
    return (lambda: K.int8_wo_mm(x, w, s)), others, K.int8_wo_mm_reference(x, w, s), "builtin=best other int8"


def _torch_int8_dynamic(x: torch.Tensor, w_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    from autoquant import kernels as K

    xq, xs = K.quantize_per_token_int8_reference(x)
    return (torch._int_mm(xq, w_t).float() * xs[:, None] * s[None, :]).to(x.dtype)


def _int_mm_note(m: int, device: str) -> str | None:
    # torch._int_mm on CUDA needs M > 16 (and K, N multiples of 8).
    return (
        "builtin n/a: torch._int_mm needs M > 16 on CUDA" if device == "cuda" and m <= 16 else None
    )


def scheme_int8_dyn(x: torch.Tensor, n: int):
    from autoquant import kernels as K

    w, s = _int8_weight(n, x.shape[1], x.device.type)
    w_t = w.T  # column-major [K, N] view, the layout _int_mm wants for its second operand
    note = _int_mm_note(x.shape[0], x.device.type)
    builtin = None if note else (lambda: _torch_int8_dynamic(x, w_t, s))
    ref = K.int8_dynamic_linear_reference(x, w, s)
    return (
        (lambda: K.int8_dynamic_linear(x, w, s)),
        builtin,
        ref,
        note or "builtin=quantize+_int_mm",
    )


def scheme_int8_dyn_mm(x: torch.Tensor, n: int):
    from autoquant import kernels as K

    w, s = _int8_weight(n, x.shape[1], x.device.type)
    xq, xs = K.quantize_per_token_int8_reference(x)
    w_t = w.T
    note = _int_mm_note(x.shape[0], x.device.type)

    def builtin() -> torch.Tensor:
        return (torch._int_mm(xq, w_t).float() * xs[:, None] * s[None, :]).to(x.dtype)

    ref = K.int8_dyn_mm_reference(xq, xs, w, s, None, x.dtype)
    triton_fn = lambda: K.int8_dyn_mm(xq, xs, w, s, out_dtype=x.dtype)
    return triton_fn, (None if note else builtin), ref, note or "builtin=_int_mm+rescale"


def _tinygemm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Fn:
    """torch's tinygemm int4 path for the same weights: w = (q - 8) * scale + zero', so our
    w = (q - zeros) * scales maps to zero' = (8 - zeros) * scales."""
    scale_and_zero = torch.stack([scales, (8 - zeros.float()) * scales.float()], dim=-1)
    scale_and_zero = scale_and_zero.to(torch.bfloat16).contiguous()  # [K // G, N, 2]
    if x.device.type == "cuda":
        # tinygemm's input packing: uint8 [N, K // 2] with the even k in the HIGH nibble.
        q_u8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(q_u8.contiguous(), 8)
        return lambda: torch._weight_int4pack_mm(x, packed, INT4_GROUP, scale_and_zero)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    return lambda: torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scale_and_zero)


def scheme_int4_wo(x: torch.Tensor, n: int):
    from autoquant import kernels as K

    k, device = x.shape[1], x.device.type
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(k // INT4_GROUP, n, device=device) * 0.01 + 1e-3).to(x.dtype)
    zeros = torch.full((k // INT4_GROUP, n), 8.0, device=device).to(x.dtype)
    packed = K.pack_int4(q)
    ref = K.int4_wo_mm_reference(x, packed, scales, zeros, INT4_GROUP)
    note = f"G={INT4_GROUP}, builtin=tinygemm"
    try:
        builtin: Fn | None = _tinygemm(x, q, scales, zeros)
        builtin()
    except (RuntimeError, NotImplementedError) as exc:
        builtin, note = None, f"G={INT4_GROUP}, builtin n/a: {str(exc).splitlines()[0][:80]}"
    triton_fn = lambda: K.int4_wo_mm(x, packed, scales, zeros, INT4_GROUP)
    return triton_fn, builtin, ref, note


def scheme_fp8_rowwise(x: torch.Tensor, n: int):
    from autoquant import kernels as K

    if x.device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        return None, None, None, "n/a: fp8 needs compute capability >= 8.9"
    xq, xs = K.quantize_rowwise_fp8_reference(x)
    wq, ws = K.quantize_rowwise_fp8_reference(torch.randn(n, x.shape[1], device=x.device))
    ref = K.fp8_rowwise_mm_reference(xq, xs, wq, ws, None, torch.bfloat16)

    def builtin() -> torch.Tensor:
        return torch._scaled_mm(
            xq, wq.T, scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16
        )

    note = "builtin=_scaled_mm rowwise"
    try:
        builtin()
    except (RuntimeError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0][:80]
        builtin, note = None, f"builtin n/a: {reason}"  # type: ignore[assignment]
    triton_fn = lambda: K.fp8_rowwise_mm(xq, xs, wq, ws, out_dtype=torch.bfloat16)
    return triton_fn, builtin, ref, note


SCHEMES = {
    "int8_wo": scheme_int8_wo,
    "int8_dyn": scheme_int8_dyn,
    "int8_dyn_mm": scheme_int8_dyn_mm,
    "int4_wo": scheme_int4_wo,
    "fp8_rowwise": scheme_fp8_rowwise,
}


# ------------------------------------------------------------------------------------ driver
def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den


def _check(name: str, y: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(ref.float().abs().max().item(), 1e-3)
    err = (y.float() - ref.float()).abs().max().item() / scale
    if err > 2e-2:
        log.warning("%s: output differs from the reference by %.3g of its scale", name, err)


def _fastest(builtins: dict[str, Fn], timer: Timer) -> tuple[float | None, str]:
    """(time, name) of the fastest of several comparison paths; a path that fails is left out."""
    best: tuple[float | None, str] = (None, "none ran")
    for label, fn in builtins.items():
        try:
            t = timer(fn)
        except (RuntimeError, NotImplementedError) as exc:
            log.info("%s unavailable: %s", label, str(exc).splitlines()[0][:80])
            continue
        if best[0] is None or t < best[0]:
            best = (t, label)
    return best


def _run_scheme(name: str, x: torch.Tensor, n: int, t_bf16: float, timer: Timer) -> Row:
    m, k = x.shape
    log.info("%s M=%d K=%d N=%d", name, m, k, n)
    triton_fn, builtin, ref, note = SCHEMES[name](x, n)
    t_tri = t_bi = None
    if triton_fn is not None:
        _check(f"{name} triton M={m} K={k} N={n}", triton_fn(), ref)
        t_tri = timer(triton_fn)
    if isinstance(builtin, dict):  # several comparison paths: the fastest one is the reference
        t_bi, label = _fastest(builtin, timer)
        note = f"{note}: {label}"
    elif builtin is not None:
        _check(f"{name} builtin M={m} K={k} N={n}", builtin(), ref)
        t_bi = timer(builtin)
    return Row(name, m, k, n, t_bf16, t_bi, t_tri, _ratio(t_bf16, t_tri), _ratio(t_bi, t_tri), note)


def run(schemes: list[str], ms: tuple, kns: tuple, device: str, timer: Timer,
        rows: list[Row] | None = None) -> list[Row]:
    """Measure every scheme at every (M, K, N), appending to `rows` (a list the caller keeps, so
    an interrupted run still has what it measured)."""
    rows = [] if rows is None else rows
    for k, n in kns:
        w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            t_bf16 = timer(functools.partial(F.linear, x, w_bf16))
            for name in schemes:
                rows.append(_run_scheme(name, x, n, t_bf16, timer))
        if device == "cuda":  # the next shape's weights should not wait on this one's
            torch.cuda.empty_cache()
    return rows


# (header, width, Row attribute, number format; "x" marks a ratio)
_COLUMNS = (
    ("scheme", 12, "scheme", "s"),
    ("M", 5, "m", "d"),
    ("K", 6, "k", "d"),
    ("N", 6, "n", "d"),
    ("bf16 us", 9, "bf16_us", ".1f"),
    ("builtin us", 10, "builtin_us", ".1f"),
    ("triton us", 9, "triton_us", ".1f"),
    ("vs bf16", 8, "vs_bf16", ".2fx"),
    ("vs builtin", 10, "vs_builtin", ".2fx"),
)


def _cell(value: object, width: int, spec: str) -> str:
    if value is None:
        return "-".rjust(width)
    if spec.endswith("x"):
        return (format(value, spec[:-1]) + "x").rjust(width)
    return format(value, spec).ljust(width) if spec == "s" else format(value, spec).rjust(width)


def print_table(rows: list[Row]) -> None:
    header = " ".join(h.ljust(w) if s == "s" else h.rjust(w) for h, w, _, s in _COLUMNS) + "  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [_cell(getattr(r, attr), w, s) for _, w, attr, s in _COLUMNS]
        print(" ".join(cells) + "  " + r.note)
    for (scheme, m), target in TARGETS.items():
        got = [r.vs_bf16 for r in rows if r.scheme == scheme and r.m == m and r.vs_bf16 is not None]
        if got:
            measured = ", ".join(f"{g:.2f}x" for g in got)
            print(f"target {scheme} M={m}: >= {target}x bf16; measured {measured}")


def write_results(rows: list[Row], path: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        with open(path + ".meta.json", "w") as f:
            json.dump(meta, f, indent=2)
    log.info("wrote %s", path)


def _meta(device: str, dry_run: bool) -> dict:
    import triton

    meta = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dry_run": dry_run,
        "device": device,
    }
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write results here (.json, else CSV plus a .meta.json)")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on CPU via the Triton interpreter"
    )
    parser.add_argument(
        "--schemes",
        default=",".join(SCHEMES),
        help="comma-separated subset of " + ",".join(SCHEMES),
    )
    parser.add_argument("--samples", type=int, default=100, help="timed samples per measurement")
    parser.add_argument(
        "--m", default=None, help="comma-separated M values (default 1,16,64,256,1024)"
    )
    parser.add_argument(
        "--kn", default=None, help="comma-separated KxN shapes, e.g. 4096x4096,4096x14336"
    )
    args = parser.parse_args(argv)

    schemes = [s for s in args.schemes.split(",") if s]
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        parser.error(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    if args.dry_run:
        # Kernels are decorated on first launch, so setting this before any launch is enough.
        os.environ["TRITON_INTERPRET"] = "1"
        device, ms, kns, timer = "cpu", DRY_MS, DRY_KNS, CpuTimer(samples=2, warmup=1)
    elif not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA GPU to time the kernels; none is available here.")
        print("Run with --dry-run to exercise the script on tiny shapes (Triton interpreter, CPU).")
        return 0
    else:
        device, ms, kns, timer = "cuda", MS, KNS, CudaGraphTimer(samples=args.samples, warmup=3)
    if args.m:
        ms = tuple(int(v) for v in args.m.split(","))
    if args.kn:
        kns = tuple(tuple(int(d) for d in kn.lower().split("x")) for kn in args.kn.split(","))

    from autoquant import kernels as K

    if not K.HAS_TRITON:
        print("bench_triton.py needs Triton (pip install triton); it is not importable here.")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: list[Row] = []
    try:
        run(schemes, ms, kns, device, timer, rows)
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep and write what was measured
        print(f"interrupted: writing the {len(rows)} rows measured so far")
    if not rows:
        print("no rows were measured")
        return 1
    print_table(rows)
    if args.dry_run:
        print("dry run: CPU interpreter timings only show that the script works, not performance.")
    if args.out:
        write_results(rows, args.out, _meta(device, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
