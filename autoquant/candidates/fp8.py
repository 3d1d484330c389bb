"""fp8 e4m3 families: weight-only and dynamic (per-row activation x per-row weight).

Packed state (weight_format ``fp8_nk_rowscale``, shared by both families)::

    w_fp8    float8_e4m3fn [N, K]   w / scale rounded to nearest even, clamped to +-448
    w_scale  float32 [N]            max|w[n]| / 448 (floor 1e-12)

float8 is a plain dtype (safetensors F8_E4M3), not a quantized tensor.

fp8_weight_only, kernel ``dequant`` (any device): ``F.linear(x, w_fp8.to(x.dtype) * scale)``. The
cast of e4m3 values to fp32 / bf16 / fp16 is exact; the product rounds once in x's dtype. It
materializes the float weight per call, so it buys memory and accuracy headroom, not speed.

fp8_dynamic quantizes x per row at run time (``primitives.fp8_per_row``), then:

- ``scaled_mm``: ``torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=[M, 1], scale_b=[1, N], bias,
  out_dtype)``. CPU: where the build takes row-wise scales (torch 2.13 does; 2.11 asserts "only
  supports per-tensor scaling", so ``supports`` asks a probe, not the version), scale_b must be a
  contiguous [1, N], any shape, out_dtype = x.dtype, bias in x's dtype; it is a reference loop,
  measured far slower than F.linear, so it is timed and loses. CUDA: sm89+, K and N multiples of
  16; the row-wise path outputs bf16 (cuBLAS below 12.9 / sm < 90 uses CUTLASS, bf16 only), so
  non-bf16 activations get a bf16 result, then bias, then the cast to x's dtype; the reference
  mirrors that rounding.
- ``triton`` (CUDA sm89+): ``autoquant.kernels.fp8_rowwise_mm`` with out_dtype = x.dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..keys import OpShape
from ..primitives import dequant_fp8_per_row, fp8_per_row, fp8_weight_per_row
from ._util import (
    FLOAT_DTYPES,
    add_bias,
    bad_dtype_reason,
    min_capability_reason,
    not_cuda_reason,
    op_dtype,
    require_triton_op,
    triton_op,
)
from .base import Candidate, register, register_kernel

__all__ = ["FP8_FORMAT", "Fp8Dynamic", "Fp8DynamicScaledMm", "Fp8DynamicTriton", "Fp8WeightOnly",
           "Fp8WeightOnlyDequant"]

FP8_FORMAT = "fp8_nk_rowscale"
FP8_MIN_CAPABILITY = (8, 9)


def quantize_fp8_nk_rowscale(weight: Tensor) -> dict[str, Tensor]:
    q, scale = fp8_weight_per_row(weight)
    return {"w_fp8": q.contiguous(), "w_scale": scale.contiguous()}


def dequantize_fp8_nk_rowscale(packed: dict[str, Tensor]) -> Tensor:
    """The float32 weight [N, K] the format stands for: ``w_fp8 * w_scale[:, None]`` (exact)."""
    return dequant_fp8_per_row(packed["w_fp8"], packed["w_scale"])


@functools.cache
def cpu_rowwise_scaled_mm_reason() -> str | None:
    """Why this torch build's CPU ``_scaled_mm`` cannot take row-wise scales, or None when it can.

    A probe (one 2x16 @ 16x2 product, once per process) instead of a version test: what the build
    does is what counts, whichever version brought it.
    """
    a = torch.zeros(2, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.float32)
    except RuntimeError as exc:
        said = str(exc).strip().rstrip(".").split(". ")[-1]  # its last sentence: the assert's preamble is noise
        return (f"fp8_dynamic/scaled_mm: the CPU torch._scaled_mm of torch {torch.__version__} rejects row-wise "
                f"scales ({said}); a torch build whose CPU _scaled_mm takes them (2.13 does) runs this kernel")
    return None


def _dequant_linear(x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
    w = packed["w_fp8"].to(x.dtype) * packed["w_scale"].to(x.dtype)[:, None]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _eager_dequant(buffers: dict[str, Tensor], dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
    """``_dequant_linear`` for x of `dtype` (bias kept in it), strided x made contiguous first."""
    b = buffers.get("bias")
    if b is not None and b.dtype != dtype:
        return None
    linear = torch._C._nn.linear

    def run(x: Tensor) -> Tensor:
        w = buffers["w_fp8"].to(dtype) * buffers["w_scale"].to(dtype)[:, None]
        return linear(x if x.is_contiguous() else x.contiguous(), w, buffers["bias"])

    return run


@register
@dataclass(frozen=True)
class Fp8WeightOnly(Candidate):
    """The weight-only family: one kernel, ``dequant`` (:class:`Fp8WeightOnlyDequant`)."""

    family: ClassVar[str] = "fp8_weight_only"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 4
    dynamic_activation: ClassVar[bool] = False
    # Measured on random normal data (K=96..4096, fp32 and bf16): 31.3-33.7 dB.
    min_sqnr_db: ClassVar[float] = 27.0
    lossless: ClassVar[bool] = False

    kernel: str = "dequant"

    @property
    def weight_format(self) -> str | None:
        return FP8_FORMAT

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        return quantize_fp8_nk_rowscale(weight)


@register_kernel(Fp8WeightOnly, "dequant")
class Fp8WeightOnlyDequant(Fp8WeightOnly):
    """``F.linear(x, w_fp8.to(x.dtype) * scale)`` on any device (see the module doc)."""

    def supports(self, device: torch.device, op: OpShape) -> str | None:
        return bad_dtype_reason("fp8_weight_only/dequant", op_dtype(op.dtype), FLOAT_DTYPES)

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        return _dequant_linear(x, packed, bias)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return _eager_dequant(buffers, dtype)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        # The weight as _dequant_linear forms it: codes and scale cast to x's dtype, product there.
        return (packed["w_fp8"].to(dtype) * packed["w_scale"].to(dtype)[:, None]).float()

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        return _dequant_linear(x, packed, bias)


@register
@dataclass(frozen=True)
class Fp8Dynamic(Candidate):
    """The dynamic family: packed state, per-row activation quantization, the exact-sum part of the
    reference. Each kernel is a subclass below (``Fp8Dynamic("triton")`` builds an
    :class:`Fp8DynamicTriton`)."""

    family: ClassVar[str] = "fp8_dynamic"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 5
    dynamic_activation: ClassVar[bool] = True
    # Measured on random normal data (K=96..4096, fp32 and bf16): 28.2-30.5 dB.
    min_sqnr_db: ClassVar[float] = 24.0
    lossless: ClassVar[bool] = False

    kernel: str = "scaled_mm"

    @property
    def weight_format(self) -> str | None:
        return FP8_FORMAT

    def supports(self, device: torch.device, op: OpShape) -> str | None:
        name = f"fp8_dynamic/{self.kernel}"
        return bad_dtype_reason(name, op_dtype(op.dtype), FLOAT_DTYPES) or self._kernel_reason(name, device, op)

    @abstractmethod
    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None: ...

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        return quantize_fp8_nk_rowscale(weight)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return dequantize_fp8_nk_rowscale(packed)

    @abstractmethod
    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor: ...

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        xq, xs = fp8_per_row(x)
        return self._matmul(xq, xs, packed, bias, x.dtype)

    def matmul_part(self, x: Tensor, packed: dict[str, Tensor], runtime: Any,
                    bias: Tensor | None) -> Callable[[], Tensor] | None:
        xq, xs = fp8_per_row(x)
        out_dtype = x.dtype
        return lambda: self._matmul(xq, xs, packed, bias, out_dtype)

    def _exact_scaled(self, x: Tensor, packed: dict[str, Tensor]) -> Tensor:
        """float32 ``(x_fp8 @ w_fp8^T) * x_scale * w_scale`` with the sums exact (float64)."""
        xq, xs = fp8_per_row(x)
        acc = xq.double() @ packed["w_fp8"].double().T  # e4m3 products and sums: exact in float64
        return (acc.float() * xs[:, None]) * packed["w_scale"][None, :]


@register_kernel(Fp8Dynamic, "scaled_mm")
class Fp8DynamicScaledMm(Fp8Dynamic):
    """``torch._scaled_mm`` with row-wise scales (CPU where the build takes them; CUDA sm89+)."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        if device.type == "cpu":
            return cpu_rowwise_scaled_mm_reason()  # where it runs, slowly: timing decides
        reason = not_cuda_reason(name, device) or min_capability_reason(name, device, FP8_MIN_CAPABILITY)
        if reason:
            return reason
        if op.k % 16 or op.n % 16:
            return f"{name}: CUDA _scaled_mm needs K and N multiples of 16, got K={op.k} N={op.n}"
        return None

    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
        mm_dtype = torch.bfloat16 if xq.is_cuda else out_dtype
        fuse_bias = bias is not None and mm_dtype == out_dtype
        # _scaled_mm wants scale_b as a contiguous [1, N] float32 tensor: a view of w_scale, made
        # per call (a kept view would miss a w_scale replaced or swapped under the layer).
        scale_b = packed["w_scale"].reshape(1, -1)
        y = torch._scaled_mm(xq, packed["w_fp8"].t(), scale_a=xs[:, None], scale_b=scale_b,
                             bias=bias.to(out_dtype) if fuse_bias else None, out_dtype=mm_dtype)
        if not fuse_bias:
            y = add_bias(y.to(out_dtype), bias)
        return y

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        """CPU ``_scaled_mm`` with the bias fused (out_dtype = x's dtype there); CUDA takes the
        generic path."""
        w, b = buffers["w_fp8"], buffers.get("bias")
        if w.device.type != "cpu" or (b is not None and b.dtype != dtype):
            return None
        scaled_mm = torch._scaled_mm

        def run(x: Tensor) -> Tensor:
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            xq, xs = fp8_per_row(x2)
            y = scaled_mm(xq, buffers["w_fp8"].t(), scale_a=xs[:, None], scale_b=buffers["w_scale"].reshape(1, -1),
                          bias=buffers["bias"], out_dtype=dtype)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

        return run

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        # CUDA's row-wise path writes bf16: the bias and the cast to x's dtype come after it.
        y = self._exact_scaled(x, packed)
        mm_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        if bias is not None and mm_dtype == x.dtype:
            return (y + bias.float()).to(x.dtype)
        return add_bias(y.to(mm_dtype).to(x.dtype), bias)


@register_kernel(Fp8Dynamic, "triton")
class Fp8DynamicTriton(Fp8Dynamic):
    """``autoquant.kernels.fp8_rowwise_mm`` (CUDA sm89+), out_dtype = x's dtype, bias fused."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        reason = not_cuda_reason(name, device) or min_capability_reason(name, device, FP8_MIN_CAPABILITY)
        if reason:
            return reason
        _, reason = triton_op("fp8_rowwise_mm")
        return reason

    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
        fn = require_triton_op("fp8_rowwise_mm")
        return fn(xq, xs, packed["w_fp8"], packed["w_scale"], bias, out_dtype=out_dtype)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        y = self._exact_scaled(x, packed)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
