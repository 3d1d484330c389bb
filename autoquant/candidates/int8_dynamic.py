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
from .base import Candidate, register
from .int8_weight_only import INT8_FORMAT, quantize_int8_nk_rowscale

__all__ = ["Int8Dynamic"]

KERNELS = ("int_mm", "fbgemm", "onednn", "triton")
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
    family: ClassVar[str] = "int8_dynamic"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 2
    dynamic_activation: ClassVar[bool] = True
    # Measured on random normal data (K=256..4096, fp32 and bf16): int_mm / triton 37.7-40 dB,
    # onednn (7-bit tokens) 33.8-36 dB, fbgemm (7-bit, per tensor) 32.6-34 dB.
    min_sqnr_db: ClassVar[float] = 28.0
    lossless: ClassVar[bool] = False

    kernel: str = "int_mm"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"int8_dynamic: unknown kernel {self.kernel!r}; expected one of {KERNELS}")

    @property
    def weight_format(self) -> str | None:
        return INT8_FORMAT

    @property
    def prepack_kind(self) -> str | None:
        return {"fbgemm": "fbgemm_int8", "onednn": "onednn_int8"}.get(self.kernel)

    # ---- supports -------------------------------------------------------------------------------
    def supports(self, device: torch.device, op: OpShape) -> str | None:
        name = f"int8_dynamic/{self.kernel}"
        reason = bad_dtype_reason(name, op_dtype(op.dtype), FLOAT_DTYPES)
        if reason:
            return reason
        if self.kernel == "int_mm":
            if device.type == "cpu":
                return (f"{name}: CPU torch._int_mm is an unvectorized loop, measured 2.4-50x slower "
                        "than float32 F.linear: not worth timing (fbgemm/onednn cover CPU)")
            reason = not_cuda_reason(name, device)
            if reason:
                return reason
            if op.m < CUDA_INT_MM_MIN_M:
                return (f"{name}: cuBLASLt int8 GEMM needs M > 16, got M={op.m} (linear() zero-pads to 17 "
                        "rows so a finalized layer still runs, but that is not worth timing: "
                        "int8_weight_only covers small M)")
            if op.k % 8 or op.n % 8:
                return f"{name}: cuBLASLt int8 GEMM needs K and N multiples of 8, got K={op.k} N={op.n}"
            return None
        if self.kernel in ("fbgemm", "onednn"):
            reason = not_cpu_reason(name, device)
            if reason:
                return reason
            engines = torch.backends.quantized.supported_engines
            need = "onednn" if self.kernel == "onednn" else "fbgemm"
            if need not in engines and not (need == "fbgemm" and "x86" in engines):
                return f"{name}: torch was built without the {need} quantized engine"
            return None
        reason = not_cuda_reason(name, device)
        if reason:
            return reason
        for fn in ("quantize_per_token_int8", "int8_dyn_mm"):
            _, reason = triton_op(fn)
            if reason:
                return reason
        return None

    # ---- packing ----------------------------------------------------------------------------------
    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        return quantize_int8_nk_rowscale(weight)

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        """fbgemm / onednn: warm the prepack cache (the ops rebuild a missing entry themselves)."""
        if self.kernel in ("fbgemm", "onednn"):
            prepack(f"{self.kernel}_int8", packed["w_int8"], packed["w_scale"])
        return None

    # ---- compute ------------------------------------------------------------------------------------
    def _quantize_x(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The activation as the matmul consumes it (onednn: uint8 codes 1..127 with zp 64)."""
        if self.kernel == "onednn":
            return uint8_act_per_token_offset(x, ONEDNN_ACT_QMAX, ONEDNN_ZP)
        if self.kernel == "triton":
            return require_triton_op("quantize_per_token_int8")(x)
        return int8_act_per_token(x)

    def _matmul(self, xq: Tensor, xs: Tensor, packed: dict[str, Tensor], runtime: Any,
                bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        q, scale = packed["w_int8"], packed["w_scale"]
        if self.kernel == "int_mm":
            return _rescale(_int_mm(xq, q), xs, scale, bias, out_dtype)
        if self.kernel == "triton":
            return require_triton_op("int8_dyn_mm")(xq, xs, q, scale, bias, out_dtype=out_dtype)
        # onednn: float32 out = acc * 1.0 * w_scale[n]; then the per-token scale and bias.
        y = add_bias(onednn_qlinear(xq, ONEDNN_ZP, q, scale).mul_(xs[:, None]), bias)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _fbgemm(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        y = add_bias(fbgemm_int8_linear(xf, packed["w_int8"], packed["w_scale"]), bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        if self.kernel == "fbgemm":
            return self._fbgemm(x, packed, bias)
        if self.kernel == "triton":
            fn = require_triton_op("int8_dynamic_linear")
            return fn(x, packed["w_int8"], packed["w_scale"], bias)
        xq, xs = self._quantize_x(x)
        return self._matmul(xq, xs, packed, runtime, bias, x.dtype)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        if self.kernel == "fbgemm":
            return eager_fbgemm_int8(buffers, dtype)
        if self.kernel == "onednn":
            return eager_onednn_int8(buffers, dtype, ONEDNN_ACT_QMAX, ONEDNN_ZP)
        return None

    def matmul_part(self, x: Tensor, packed: dict[str, Tensor], runtime: Any,
                    bias: Tensor | None) -> Callable[[], Tensor] | None:
        if self.kernel == "fbgemm":
            return lambda: self._fbgemm(x, packed, bias)
        xq, xs = self._quantize_x(x)
        out_dtype = x.dtype
        return lambda: self._matmul(xq, xs, packed, runtime, bias, out_dtype)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        q, scale = packed["w_int8"], packed["w_scale"]
        if self.kernel == "fbgemm":
            xq, xs, zp = uint8_act_per_tensor(x.float(), CPU_ACT_QMAX)
            acc = ((xq.double() - zp) @ q.double().T).float()
            y = acc * (xs * scale)[None, :]
            return add_bias(y, bias).to(x.dtype)
        if self.kernel == "onednn":
            xq, xs = int8_act_per_token(x, ONEDNN_ACT_QMAX)
            acc = (xq.double() @ q.double().T).float()
            y = (acc * scale[None, :]) * xs[:, None]
            return add_bias(y, bias).to(x.dtype)
        xq, xs = int8_act_per_token(x)
        acc = (xq.double() @ q.double().T).float()  # exact: |acc| < 2^53
        return _rescale(acc, xs, scale, bias, x.dtype)
