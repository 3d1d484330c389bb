"""int8 weight-only: symmetric per-output-channel int8 weight, float activations.

Packed state (weight_format ``int8_nk_rowscale``, shared with int8_dynamic so one layer can switch
kernels on M over ONE copy)::

    w_int8  int8    [N, K]   q = round(w / scale), -127..127 (nn.Linear layout)
    w_scale float32 [N]      scale = max|w[n]| / 127

Kernels:

- ``int8pack``: ``torch._weight_int8pack_mm(x, w_int8, scale)`` (CPU and CUDA in torch 2.13). It
  wants the scales in the activation dtype (CPU raises otherwise), so ``prepare`` keeps a copy
  per float dtype. CPU: fp32 / bf16 / fp16 activations, any K, x contiguous; it accumulates in
  float32, multiplies by the (activation-dtype) scale in float32 and rounds once (verified
  bit-exact for bf16). Below AVX-512 only bf16 activations get a vectorized kernel (fp32 / fp16
  measured 7-60x slower than F.linear), so ``supports`` declines those there. The vectorized CPU
  kernels step K by 8 (AVX2) or 16 (AVX-512, NEON by 8) with no tail loop and use ALIGNED loads
  of x: any other K reads past each row (wrong results at M=1, a segfault at M >= 2, found by
  tests/deploy/test_property.py), and an x whose data pointer is not 16 / 32-byte aligned
  segfaults. So on CPU ``supports`` declines K % 16 != 0, ``prepare`` refuses to build such a
  layer (a plan from elsewhere fails at build time, not by crashing), and eager ``linear`` copies
  a misaligned x (one pointer test per call; under torch.compile the check cannot run, and
  inputs are views at whole-row offsets in practice). CUDA: the 2.13 kernel upcasts everything to
  float32, same math.
- ``dequant``: ``F.linear(x, w_int8.to(x.dtype) * scale.to(x.dtype))``; any device, the fallback.
  It materializes the float weight on every call, so it never beats the float baseline and is
  left out of ``default_candidates`` (build it explicitly when wanted).
- ``triton`` (CUDA): ``autoquant.kernels.int8_wo_mm`` (imported on first use): int8 tiles upcast
  in registers, float32 accumulation, scale and bias in the epilogue.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..keys import OpShape
from ..primitives import int8_weight_per_channel
from ._cpu_ops import eager_int8pack, tracing
from ._util import (
    FLOAT_DTYPES,
    add_bias,
    bad_dtype_reason,
    cpu_scalar_only_reason,
    not_cuda_reason,
    op_dtype,
    require_triton_op,
    ScalesByDtype,
    triton_op,
)
from .base import Candidate, register, register_kernel

__all__ = ["INT8_FORMAT", "Int8WeightOnly", "Int8WeightOnlyDequant", "Int8WeightOnlyInt8pack", "Int8WeightOnlyTriton",
           "quantize_int8_nk_rowscale"]

INT8_FORMAT = "int8_nk_rowscale"
# CPU _weight_int8pack_mm: K step of its widest vector kernel, and the alignment its x loads need.
CPU_INT8PACK_K_MULTIPLE = 16
CPU_INT8PACK_X_ALIGN = 32


def _cpu_k_reason(k: int) -> str | None:
    if k % CPU_INT8PACK_K_MULTIPLE == 0:
        return None
    return (f"int8_weight_only/int8pack: the CPU kernel needs K % {CPU_INT8PACK_K_MULTIPLE} == 0 (its vector "
            f"loop has no tail: other K give wrong results or crash), got K={k}")


def quantize_int8_nk_rowscale(weight: Tensor) -> dict[str, Tensor]:
    """The ``int8_nk_rowscale`` packed dict (shared by every int8 kernel of both int8 families)."""
    q, scale = int8_weight_per_channel(weight)
    return {"w_int8": q.contiguous(), "w_scale": scale.contiguous()}


def dequantize_int8_nk_rowscale(packed: dict[str, Tensor]) -> Tensor:
    """The float32 [N, K] weight of an ``int8_nk_rowscale`` packed dict: exact integer codes times
    the float32 row scale (what kernels that rescale integer sums by that scale multiply by)."""
    return packed["w_int8"].float() * packed["w_scale"].float()[:, None]


@register
@dataclass(frozen=True)
class Int8WeightOnly(Candidate):
    """The family: packed state and its dequantization. Each kernel is a subclass below
    (``Int8WeightOnly("int8pack")`` builds an :class:`Int8WeightOnlyInt8pack`)."""

    family: ClassVar[str] = "int8_weight_only"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 1
    dynamic_activation: ClassVar[bool] = False
    # Measured on random normal data (K=96..4096, fp32 and bf16 activations): 40.5-45 dB.
    min_sqnr_db: ClassVar[float] = 35.0
    lossless: ClassVar[bool] = False

    kernel: str = "int8pack"

    @property
    def weight_format(self) -> str | None:
        return INT8_FORMAT

    def supports(self, device: torch.device, op: OpShape) -> str | None:
        name = f"int8_weight_only/{self.kernel}"
        return bad_dtype_reason(name, op_dtype(op.dtype), FLOAT_DTYPES) or self._kernel_reason(name, device, op)

    @abstractmethod
    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None: ...

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        return quantize_int8_nk_rowscale(weight)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        # triton's epilogue; int8pack and dequant override (they cast the scale to x's dtype).
        return dequantize_int8_nk_rowscale(packed)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        # Exact integer sums (|acc| < 2^53 in float64), times the float32 scale, bias in the
        # epilogue, rounded once to x.dtype (triton; int8pack and dequant override).
        acc = (x.double() @ packed["w_int8"].double().T).float()
        y = acc * packed["w_scale"].float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


@register_kernel(Int8WeightOnly, "int8pack")
class Int8WeightOnlyInt8pack(Int8WeightOnly):
    """``torch._weight_int8pack_mm`` with the scales cast to x's dtype once (``ScalesByDtype``)."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        if device.type not in ("cpu", "cuda"):
            return f"{name}: torch has no _weight_int8pack_mm for {device.type}"
        if device.type == "cpu":
            reason = _cpu_k_reason(op.k)
            if reason:
                return reason
        return cpu_scalar_only_reason(name, device, op_dtype(op.dtype))

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        q = packed["w_int8"]
        reason = _cpu_k_reason(q.shape[1]) if q.device.type == "cpu" else None
        if reason:
            raise ValueError(reason)  # at build / load time, instead of a crash on the first call
        return ScalesByDtype(packed["w_scale"])

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        q, scale = packed["w_int8"], packed["w_scale"]
        if runtime is None:
            s = scale.to(x.dtype)
        elif tracing():
            # The cast made in prepare, as a constant: inductor's lowering of the CPU kernel
            # wants a realized scale tensor, not a fused cast.
            s = runtime.casts.get(x.dtype)
            s = scale.to(x.dtype) if s is None else s
        else:
            s = runtime.get(scale, x.dtype)
            if x.data_ptr() % CPU_INT8PACK_X_ALIGN:
                x = x.clone()  # a fresh allocation is 64-byte aligned (the CPU kernel's loads need 32)
            if q.data_ptr() % CPU_INT8PACK_X_ALIGN:
                q = q.clone()  # so does the weight's: a zero-copy load can hand a misaligned one
        return add_bias(torch._weight_int8pack_mm(x, q, s), bias)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return None if runtime is None else eager_int8pack(buffers, runtime, dtype, CPU_INT8PACK_X_ALIGN)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return packed["w_int8"].float() * packed["w_scale"].to(dtype).float()[:, None]

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        # Scale in x.dtype, bias added after in x.dtype.
        acc = (x.double() @ packed["w_int8"].double().T).float()
        y = (acc * packed["w_scale"].to(x.dtype).float()).to(x.dtype)
        return add_bias(y, bias)


@register_kernel(Int8WeightOnly, "dequant")
class Int8WeightOnlyDequant(Int8WeightOnly):
    """F.linear on the weight dequantized in x's dtype per call (never faster: built on request)."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        return None

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        return self.reference(x, packed, bias)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return (packed["w_int8"].to(dtype) * packed["w_scale"].to(dtype)[:, None]).float()

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        w = packed["w_int8"].to(x.dtype) * packed["w_scale"].to(x.dtype)[:, None]
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@register_kernel(Int8WeightOnly, "triton")
class Int8WeightOnlyTriton(Int8WeightOnly):
    """``autoquant.kernels.int8_wo_mm`` (CUDA)."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        reason = not_cuda_reason(name, device)
        if reason:
            return reason
        _, reason = triton_op("int8_wo_mm")
        return reason

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        return require_triton_op("int8_wo_mm")(x, packed["w_int8"], packed["w_scale"], bias)
