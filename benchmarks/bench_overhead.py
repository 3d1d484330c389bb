"""Per-call cost of a finalized layer over its raw kernel, side by side, CPU, M=1.

For each CPU kernel: a finalized layer (``candidate.build``; the DispatchLinear row builds one
with ``autoquant.finalize.DispatchLinear``) is timed as ``layer(x)`` against the same kernel
called directly on the same tensors (the layer's buffers and its prepacked handle): the raw
callable is the shortest sequence of torch ops computing what the layer computes (activation
cast / quantization, the kernel, the bias), each op called at its C++ entry point. The
difference is what the module, the candidate's Python and the prepack-cache check add per call.
Both run in paired, interleaved rounds (fixed threads, warm-up, gc paused), under
``torch.no_grad()`` as inference does; the overhead is the median of the per-round differences.
Target: <= 5 us.

The first row is plain PyTorch's own nn.Linear over F.linear, for scale, and the last column
divides each overhead by it: every Python step costs several times its standalone time when it
runs right after a large C++ kernel (caches evicted), which is where a layer's Python always
runs, and how much depends on the machine; a row at or below 1.0x costs no more than the module
PyTorch itself ships.

    python benchmarks/bench_overhead.py            # K=N=256, 1 thread
    python benchmarks/bench_overhead.py --size 1024 --threads 2 --rounds 61
    python benchmarks/bench_overhead.py --only onednn --rounds 401   # noisy rows, more rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant.bench import fixed_threads, paired_blocks, quantiles
from autoquant.candidates import (
    Candidate,
    FloatCandidate,
    Fp8Dynamic,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    QuantizedLinear,
)
from autoquant.candidates._cpu_ops import _BUILDERS, PREPACK_CACHE, c_op
from autoquant.finalize import DispatchLinear, label
from autoquant.primitives import ACT_EPS, fp8_per_row
from autoquant.selection import Dispatch

TARGET_US = 5.0
BF16, F32 = torch.bfloat16, torch.float32


# The raw kernels are called at their C++ entry points (what ``torch.ops.ns.op.default`` wraps):
# ``torch.ops.quantized.linear_dynamic(...)`` itself walks its arguments in Python looking for fake
# TorchBind objects, which would hide that much of a layer's overhead. The fbgemm ones run with
# torch-function handling of subclasses off, as the layers call them (see ``_no_torch_function`` in
# autoquant/candidates/_cpu_ops.py: otherwise every call looks ``__torch_function__`` up on the
# TorchBind handle, a thrown exception each time).
LINEAR_POINTWISE = c_op("mkldnn::_linear_pointwise")
LINEAR_DYNAMIC_FP16 = c_op("quantized::linear_dynamic_fp16")
LINEAR_DYNAMIC = c_op("quantized::linear_dynamic")
QLINEAR_POINTWISE = c_op("onednn::qlinear_pointwise")
INT4PACK_MM = c_op("aten::_weight_int4pack_mm_for_cpu")
NO_TORCH_FUNCTION = torch._C.DisableTorchFunctionSubclass


def _handle(kind: str, *sources: Tensor) -> Any:
    """The prepacked handle the layer's op uses (the very cache entry: nothing is rebuilt)."""
    return PREPACK_CACHE.get(kind, sources, _BUILDERS[kind][0])


# ---- raw callables: what each kernel is, without the module around it ----------------------------
def _raw_float(layer: QuantizedLinear, x: Tensor) -> Callable[[], Tensor]:
    c: FloatCandidate = layer.candidate  # type: ignore[assignment]
    w, b = layer.weight, layer.bias
    cd = w.dtype if c.kernel != "fbgemm_fp16" else F32
    if c.kernel == "aten" and x.dtype == cd:
        return lambda: F.linear(x, w, b)
    # The layer casts a bias kept in the model's dtype on every call: so does the raw callable.
    if c.kernel == "aten":
        return lambda: F.linear(x.to(cd), w, b.to(cd)).to(x.dtype)
    if c.kernel == "onednn":
        h = _handle("onednn", w)
        if x.dtype == cd:
            return lambda: LINEAR_POINTWISE(x, h, b, "none", [], "")
        return lambda: LINEAR_POINTWISE(x.to(cd), h, b.to(cd), "none", [], "").to(x.dtype)
    h = _handle("fbgemm_fp16", w)
    if x.dtype == F32:
        def fp16() -> Tensor:
            with NO_TORCH_FUNCTION():
                return LINEAR_DYNAMIC_FP16(x, h).add_(b)
        return fp16

    def fp16_cast() -> Tensor:
        with NO_TORCH_FUNCTION():
            return LINEAR_DYNAMIC_FP16(x.float(), h).add_(b).to(x.dtype)
    return fp16_cast


def _raw_int8_dynamic(layer: QuantizedLinear, x: Tensor) -> Callable[[], Tensor]:
    q, s, b = layer.w_int8, layer.w_scale, layer.bias
    if layer.candidate.kernel == "fbgemm":
        h = _handle("fbgemm_int8", q, s)

        def fbgemm() -> Tensor:
            with NO_TORCH_FUNCTION():
                return LINEAR_DYNAMIC(x, h, True).add_(b)
        return fbgemm
    packed, zp = _handle("onednn_int8", q, s)

    def onednn() -> Tensor:  # uint8_act_per_token_offset(x, 63, 64) in its fewest ops (x is float32)
        xs = (x.abs().amax(dim=-1, keepdim=True) / 63).clamp_min(ACT_EPS)
        xq = torch.round(x / xs).clamp_(-63, 63).add_(64).to(torch.uint8)
        y = QLINEAR_POINTWISE(xq, 1.0, 64, packed, s, zp, None, 1.0, 0, F32, "none", [], "")
        return y.mul_(xs).add_(b)

    return onednn


def _raw_int8pack(layer: QuantizedLinear, x: Tensor) -> Callable[[], Tensor]:
    q, b = layer.w_int8, layer.bias
    s = layer._runtime.casts[x.dtype]
    return lambda: torch._weight_int8pack_mm(x, q, s).add_(b)


def _raw_int4(layer: QuantizedLinear, x: Tensor) -> Callable[[], Tensor]:
    h = _handle("int4pack", layer.w_int4)
    sz, b, g = layer.scales_and_zeros, layer.bias, layer.candidate.group_size
    return lambda: INT4PACK_MM(x, h, g, sz).add_(b)


def _raw_fp8(layer: QuantizedLinear, x: Tensor) -> Callable[[], Tensor]:
    w, s, b = layer.w_fp8, layer.w_scale, layer.bias
    if layer.candidate.family == "fp8_weight_only":
        return lambda: F.linear(x, w.to(x.dtype) * s.to(x.dtype)[:, None], b)
    sb = s.reshape(1, -1)

    def scaled() -> Tensor:
        xq, xs = fp8_per_row(x)
        return torch._scaled_mm(xq, w.t(), scale_a=xs[:, None], scale_b=sb, bias=b, out_dtype=x.dtype)

    return scaled


_RAW: dict[str, Callable[[QuantizedLinear, Tensor], Callable[[], Tensor]]] = {
    "float": _raw_float,
    "int8_dynamic": _raw_int8_dynamic,
    "int8_weight_only": _raw_int8pack,
    "int4_weight_only": _raw_int4,
    "fp8_weight_only": _raw_fp8,
    "fp8_dynamic": _raw_fp8,
}


# ---- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    label: str
    dtype: torch.dtype
    candidate: Candidate | None  # None: the nn.Linear reference row


CASES = (
    # Reference: what plain PyTorch's own module adds over its kernel (nn.Linear vs F.linear).
    Case("reference: nn.Linear vs F.linear", F32, None),
    Case("float/aten (baseline)", F32, FloatCandidate("aten")),
    Case("float/onednn", F32, FloatCandidate("onednn")),
    Case("float/fbgemm_fp16", F32, FloatCandidate("fbgemm_fp16")),
    Case("float/aten cast f32 (bf16 model)", BF16, FloatCandidate("aten", "float32")),
    Case("float/onednn cast f32 (bf16 model)", BF16, FloatCandidate("onednn", "float32")),
    Case("int8_dynamic/fbgemm", F32, Int8Dynamic("fbgemm")),
    Case("int8_dynamic/onednn", F32, Int8Dynamic("onednn")),
    Case("int8_weight_only/int8pack (bf16)", BF16, Int8WeightOnly("int8pack")),
    Case("int4_weight_only/tinygemm_cpu G64 (bf16)", BF16, Int4WeightOnly("tinygemm_cpu", 64)),
    Case("fp8_weight_only/dequant", F32, Fp8WeightOnly("dequant")),
    Case("fp8_dynamic/scaled_mm", F32, Fp8Dynamic("scaled_mm")),
    Case("DispatchLinear int8pack|onednn (bf16, M<16)", BF16, Int8WeightOnly("int8pack")),
)


def _layer(case: Case, k: int, n: int) -> tuple[nn.Module, Candidate | None]:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(case.dtype)
    b = torch.randn(n, generator=gen).to(case.dtype)
    if case.candidate is None:
        lin = nn.Linear(k, n).to(case.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        return lin, None
    if case.label.startswith("DispatchLinear"):
        d = Dispatch(case.candidate, Int8Dynamic("onednn"), 16)
        layer: QuantizedLinear = DispatchLinear(d, d.small.quantize(w), b, k, n, act_dtype=case.dtype)
        small = d.small
    else:
        layer, small = case.candidate.build(w, b), case.candidate
    # As finalize leaves it: tuned for the M it runs (so every call also does the unseen-M check).
    return label(layer, "bench", frozenset({1})), small


def _raw(layer: nn.Module, small: Candidate | None, x: Tensor) -> Callable[[], Tensor]:
    if small is None:
        w, b = layer.weight, layer.bias
        return lambda: F.linear(x, w, b)
    return _RAW[small.family](layer, x)  # type: ignore[arg-type]  (a DispatchLinear at M=1 runs `small`)


def paired(layer_fn: Callable[[], Any], raw_fn: Callable[[], Any], rounds: int, block_s: float
           ) -> tuple[float, float, float, float]:
    """(raw median, layer median, median of per-round differences, its IQR), seconds per call.

    Each round times a block of each callable back to back, in alternating order; the overhead is
    the median of the per-round differences, so drift and other processes' bursts (this machine
    has 2 cores and is shared) hit both sides of a difference alike. Warm-up (50 calls each) also
    builds oneDNN primitives, caches, ..."""
    lay, raw = paired_blocks(layer_fn, raw_fn, rounds, block_s, calibration_calls=50)
    q1, med, q3 = quantiles([a - b for a, b in zip(lay, raw)])
    return statistics.median(raw), statistics.median(lay), med, q3 - q1


def run(size: int, threads: int, rounds: int, block_s: float, only: str = ""
        ) -> list[tuple[str, float, float, float, float]]:
    rows = []
    with fixed_threads(threads), torch.no_grad():
        for case in CASES:
            if only and case.candidate is not None and only not in case.label:
                continue
            layer, small = _layer(case, size, size)
            x = torch.randn(1, size).to(case.dtype)
            raw_fn = _raw(layer, small, x)
            torch.testing.assert_close(layer(x), raw_fn(), rtol=0, atol=0)  # the same computation
            raw, lay, over, iqr = paired(lambda: layer(x), raw_fn, rounds, block_s)  # noqa: B023
            rows.append((case.label, raw * 1e6, lay * 1e6, over * 1e6, iqr * 1e6))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="K = N of the layer (default 256)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=101)
    p.add_argument("--block-ms", type=float, default=2.0, help="length of one timed block")
    p.add_argument("--only", default="", help="rows whose label contains this (the reference row always runs)")
    args = p.parse_args(argv)
    rows = run(args.size, args.threads, args.rounds, args.block_ms * 1e-3, args.only)
    print(f"M=1, K=N={args.size}, {args.threads} thread(s), {args.rounds} paired rounds, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'kernel':46s} {'raw us':>8s} {'layer us':>9s} {'overhead us':>12s} {'IQR':>6s} {'x nn.Linear':>12s}")
    ref = rows[0][3]
    worst = worst_label = None
    for name, raw_us, layer_us, over_us, iqr_us in rows:
        if name != rows[0][0] and (worst is None or over_us > worst):
            worst, worst_label = over_us, name
        print(f"{name:46s} {raw_us:8.2f} {layer_us:9.2f} {over_us:12.2f} {iqr_us:6.2f} {over_us / ref:11.2f}x")
    print(f"worst overhead {worst:.2f} us ({worst_label}; target <= {TARGET_US} us); "
          f"nn.Linear's own: {ref:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
