"""int8 dynamic: activations quantized at run time, per-channel symmetric int8 weights.

Packed state: ``int8_nk_rowscale`` (``w_int8`` int8 [N, K], ``w_scale`` float32 [N]), the SAME
dict as int8_weight_only, for every kernel here: a layer can run int8_weight_only at small M and
one of these at large M over one packed copy. fbgemm and onednn additionally keep a prepacked copy
of the int8 weight (built in ``prepare``, never saved) in ``_cpu_ops.PREPACK_CACHE``, keyed by the
``w_int8`` buffer: their ops take only plain tensors, so torch.compile / torch.export trace them
without a graph break (see ``_cpu_ops`` for the bytes each copy costs).

Kernels, and how each quantizes the activation (each ``reference`` mirrors it):

- ``int_mm``: per-token symmetric int8 (-127..127, scale float32 [M]) in torch, then
  ``torch._int_mm(x_int8, w_int8.t())`` (int32), rescaled in float32:
  ``acc * x_scale[:, None] * w_scale[None, :] + bias``. CUDA (cuBLASLt int8): M > 16 and K, N
  multiples of 8; ``supports`` says so and ``linear`` still pads M <= 16 up to 17 rows so a
  finalized layer never fails on a new, smaller M. CPU: ``_int_mm`` is an unvectorized loop here,
  measured 2.4x (M=1) to 50x slower than float32 F.linear; timing it at large shapes would cost
  minutes per op for a certain loser, so ``supports`` declines on CPU (the kernel still runs there).
- ``fbgemm`` (CPU): ``quantized.linear_dynamic(x, prepacked, reduce_range=True)``. It quantizes x
  per TENSOR inside the call, asymmetric uint8 with codes 0..127 (reduce_range): on AVX2 without
  VNNI the u8 x s8 dot (vpmaddubsw) sums pairs in int16 and saturates with full-range codes
  (measured: errors as large as the outputs with reduce_range=False). float32 activations only;
  others are cast to float32 and back. Runs as the opaque op ``autoquant::cpu_fbgemm_int8_linear``.
- ``onednn`` (CPU): ``onednn.qlinear_prepack(w_int8, None)`` + ``onednn.qlinear_pointwise``. The op
  takes one activation scale / zero point per tensor, so per-token quantization is done in torch
  with the trick: q = round(x / s_m) in -63..63 (7 bits, same saturation reason as fbgemm), passed
  as uint8 q + 64 with x_scale=1.0 and x_zero_point=64 for every row; the kernel returns
  float32 ``acc * w_scale[n]`` and torch applies ``* s_m + bias``. Only the matmul is the opaque op
  ``autoquant::cpu_onednn_qlinear``: the activation quantization stays in the graph, where inductor
  can fuse it with its neighbours.
- ``triton`` (CUDA): ``autoquant.kernels.quantize_per_token_int8`` + ``int8_dyn_mm`` (same
  per-token math as int_mm, rescale and bias fused in the epilogue).

``matmul_part`` quantizes x once up front and returns a closure running only the matmul and
rescale. fbgemm quantizes inside its packing routine, so its closure is the whole op (there is no
unfused activation pass left to discount).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..keys import OpShape
from ..primitives import int8_act_per_token, uint8_act_per_tensor, uint8_act_per_token_offset
from ._cpu_ops import eager_fbgemm_int8, eager_onednn_int8, fbgemm_int8_linear, onednn_qlinear, prepack
from ._util import (
    FLOAT_DTYPES,
    add_bias,
    bad_dtype_reason,
    not_cpu_reason,
    not_cuda_reason,
    op_dtype,
    require_triton_op,
    triton_op,
)
from .base import Candidate, register, register_kernel
from .int8_weight_only import INT8_FORMAT, dequantize_int8_nk_rowscale, quantize_int8_nk_rowscale

__all__ = ["Int8Dynamic", "Int8DynamicFbgemm", "Int8DynamicIntMm", "Int8DynamicOnednn", "Int8DynamicTriton"]

# 7-bit activation codes for the CPU int8 kernels (see module docstring: int16 pair saturation).
CPU_ACT_QMAX = 127  # fbgemm: uint8 codes 0..127 (reduce_range=True)
ONEDNN_ACT_QMAX = 63  # onednn: symmetric -63..63, offset by 64 into uint8 1..127
ONEDNN_ZP = 64
CUDA_INT_MM_MIN_M = 17


def _rescale(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """float32 ``acc * x_scale[:, None] * w_scale[None, :] + bias`` cast to out_dtype (the order
    of autoquant.kernels' epilogue, so int_mm and triton share one reference)."""
    y = acc.float() * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _int_mm(x_int8: Tensor, w_int8: Tensor) -> Tensor:
    m = x_int8.shape[0]
    if x_int8.is_cuda and m < CUDA_INT_MM_MIN_M:
        # cuBLASLt int8 GEMM needs M > 16: pad with zero rows (a safety net; supports() declines).
        pad = x_int8.new_zeros((CUDA_INT_MM_MIN_M - m, x_int8.shape[1]))
        return torch._int_mm(torch.cat([x_int8, pad]), w_int8.t())[:m]
    return torch._int_mm(x_int8, w_int8.t())


@register
@dataclass(frozen=True)
class Int8Dynamic(Candidate):
    """The family: packed state, the weight's dequantization, the per-token reference. Each kernel
    is a subclass below (``Int8Dynamic("fbgemm")`` builds an :class:`Int8DynamicFbgemm`)."""

    family: ClassVar[str] = "int8_dynamic"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 2
    dynamic_activation: ClassVar[bool] = True
    # Measured on random normal data (K=256..4096, fp32 and bf16): int_mm / triton 37.7-40 dB,
    # onednn (7-bit tokens) 33.8-36 dB, fbgemm (7-bit, per tensor) 32.6-34 dB.
    min_sqnr_db: ClassVar[float] = 28.0
    lossless: ClassVar[bool] = False

    kernel: str = "int_mm"

    @property
    def weight_format(self) -> str | None:
        return INT8_FORMAT

    # ---- supports -------------------------------------------------------------------------------
    def supports(self, device: torch.device, op: OpShape) -> str | None:
        name = f"int8_dynamic/{self.kernel}"
        return bad_dtype_reason(name, op_dtype(op.dtype), FLOAT_DTYPES) or self._kernel_reason(name, device, op)

    @abstractmethod
    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None: ...

    # ---- packing ----------------------------------------------------------------------------------
    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        return quantize_int8_nk_rowscale(weight)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        # Every kernel rescales the exact integer sums by the float32 weight scales.
        return dequantize_int8_nk_rowscale(packed)

    # ---- compute: quantize x, then the matmul and rescale ----------------------------------------
    def _quantize_x(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The activation as the matmul consumes it: per-token symmetric int8 here."""
        return int8_act_per_token(x)

    @abstractmethod
    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor: ...

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        xq, xs = self._quantize_x(x)
        return self._matmul(xq, xs, packed, bias, x.dtype)

    def matmul_part(self, x: Tensor, packed: dict[str, Tensor], runtime: Any,
                    bias: Tensor | None) -> Callable[[], Tensor] | None:
        xq, xs = self._quantize_x(x)
        out_dtype = x.dtype
        return lambda: self._matmul(xq, xs, packed, bias, out_dtype)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        xq, xs = int8_act_per_token(x)
        acc = (xq.double() @ packed["w_int8"].double().T).float()  # exact: |acc| < 2^53
        return _rescale(acc, xs, packed["w_scale"], bias, x.dtype)


@register_kernel(Int8Dynamic, "int_mm")
class Int8DynamicIntMm(Int8Dynamic):
    """``torch._int_mm`` on per-token int8 codes, rescaled in float32 (CUDA; see module doc)."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        if device.type == "cpu":
            return (f"{name}: CPU torch._int_mm is an unvectorized loop, measured 2.4-50x slower "
                    "than float32 F.linear: not worth timing (fbgemm/onednn cover CPU)")
        reason = not_cuda_reason(name, device)
        if reason:
            return reason
        # The hard rule first: with it broken the kernel cannot run at any M (seen on an H200).
        if op.k % 8 or op.n % 8:
            return f"{name}: cuBLASLt int8 GEMM needs K and N multiples of 8, got K={op.k} N={op.n}"
        if op.m < CUDA_INT_MM_MIN_M:
            return (f"{name}: cuBLASLt int8 GEMM needs M > 16, got M={op.m} (linear() zero-pads to 17 "
                    "rows so a finalized layer still runs, but that is not worth timing: "
                    "int8_weight_only covers small M)")
        return None

    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
        return _rescale(_int_mm(xq, packed["w_int8"]), xs, packed["w_scale"], bias, out_dtype)


@register_kernel(Int8Dynamic, "triton")
class Int8DynamicTriton(Int8Dynamic):
    """``autoquant.kernels``: per-token quantization and the int8 GEMM with a fused epilogue."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        reason = not_cuda_reason(name, device)
        if reason:
            return reason
        for fn in ("quantize_per_token_int8", "int8_dyn_mm"):
            _, reason = triton_op(fn)
            if reason:
                return reason
        return None

    def _quantize_x(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return require_triton_op("quantize_per_token_int8")(x)

    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
        fn = require_triton_op("int8_dyn_mm")
        return fn(xq, xs, packed["w_int8"], packed["w_scale"], bias, out_dtype=out_dtype)

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        fn = require_triton_op("int8_dynamic_linear")
        return fn(x, packed["w_int8"], packed["w_scale"], bias)


def _cpu_engine_reason(name: str, device: torch.device, engine: str) -> str | None:
    reason = not_cpu_reason(name, device)
    if reason:
        return reason
    engines = torch.backends.quantized.supported_engines
    if engine not in engines and not (engine == "fbgemm" and "x86" in engines):
        return f"{name}: torch was built without the {engine} quantized engine"
    return None


class FbgemmInt8Handle:
    """For kernels that run fbgemm's int8 op on the packed ``w_int8`` / ``w_scale`` (int8 dynamic's
    and int8 smooth's fbgemm kernels): the prepacked handle they read, the CPU engine they need, and
    warming the handle at build time. A mixin listed before the family."""

    @property
    def prepack_kind(self) -> str | None:
        return "fbgemm_int8"

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        return _cpu_engine_reason(name, device, "fbgemm")

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        """Warm the prepack cache (the op rebuilds a missing entry itself)."""
        prepack("fbgemm_int8", packed["w_int8"], packed["w_scale"])
        return None


@register_kernel(Int8Dynamic, "fbgemm")
class Int8DynamicFbgemm(FbgemmInt8Handle, Int8Dynamic):
    """fbgemm: x quantized per TENSOR inside the call (7-bit, see module doc), float32 only."""

    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:  # pragma: no cover - fbgemm quantizes inside its call
        raise NotImplementedError("fbgemm quantizes the activation inside its packed call")

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        y = add_bias(fbgemm_int8_linear(xf, packed["w_int8"], packed["w_scale"]), bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def matmul_part(self, x: Tensor, packed: dict[str, Tensor], runtime: Any,
                    bias: Tensor | None) -> Callable[[], Tensor] | None:
        # The whole op: there is no unfused activation pass left to discount.
        return lambda: self.linear(x, packed, runtime, bias)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return eager_fbgemm_int8(buffers, dtype)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        xq, xs, zp = uint8_act_per_tensor(x.float(), CPU_ACT_QMAX)
        acc = ((xq.double() - zp) @ packed["w_int8"].double().T).float()
        y = acc * (xs * packed["w_scale"])[None, :]
        return add_bias(y, bias).to(x.dtype)


@register_kernel(Int8Dynamic, "onednn")
class Int8DynamicOnednn(Int8Dynamic):
    """oneDNN: 7-bit per-token codes offset into uint8, the kernel's ``acc * w_scale``, then
    ``* x_scale + bias`` in torch (see module doc)."""

    @property
    def prepack_kind(self) -> str | None:
        return "onednn_int8"

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        return _cpu_engine_reason(name, device, "onednn")

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        prepack("onednn_int8", packed["w_int8"], packed["w_scale"])
        return None

    def _quantize_x(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return uint8_act_per_token_offset(x, ONEDNN_ACT_QMAX, ONEDNN_ZP)

    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
        # float32 out = acc * 1.0 * w_scale[n]; then the per-token scale and bias.
        y = add_bias(onednn_qlinear(xq, ONEDNN_ZP, packed["w_int8"], packed["w_scale"]).mul_(xs[:, None]), bias)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return eager_onednn_int8(buffers, dtype, ONEDNN_ACT_QMAX, ONEDNN_ZP)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        xq, xs = int8_act_per_token(x, ONEDNN_ACT_QMAX)
        acc = (xq.double() @ packed["w_int8"].double().T).float()
        y = (acc * packed["w_scale"][None, :]) * xs[:, None]
        return add_bias(y, bias).to(x.dtype)
