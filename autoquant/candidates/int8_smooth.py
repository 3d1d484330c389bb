"""int8 smooth: int8 dynamic with per-input-channel smoothing of activation outliers (SmoothQuant).

Why: a per-TENSOR activation scale (fbgemm's) is set by the largest channel, so a few outlier
channels (typical after LayerNorm) leave the others a handful of codes. Dividing each input channel
by ``s_k`` and multiplying the weight's column by it changes nothing in exact arithmetic and evens
out the activation's range (the weight, quantized per output row, absorbs it). Measured on MiniLM
(per layer and end to end, against fbgemm and oneDNN per-token): benchmarks/results/smooth_minilm_cpu.txt.

Calibrated (``Candidate.calibrated``): ``calibrate(weight, act_absmax)`` gives
``smooth_inv = 1 / s`` (float32 [K], :func:`autoquant.primitives.smoothing_inv`) from the
per-input-channel absmax of the layer's recorded activations, with ``s_k = a_k^alpha /
w_k^(1-alpha)``. Packed state: ``w_int8`` int8 [N, K] and ``w_scale`` float32 [N], the int8
per-output-row quantization of ``W / smooth_inv`` (columns), plus ``smooth_inv`` itself. The packed
weight is NOT the plain weight's (so no ``weight_format`` is shared with int8_dynamic), and
``smooth_inv`` is the calibration a plan carries (``calibration_keys``).

Kernels:

- ``fbgemm`` (CPU): ``y = fbgemm_int8(x * smooth_inv, w_int8, w_scale) + bias``: the op of
  int8_dynamic's fbgemm kernel (``autoquant::cpu_fbgemm_int8_linear``, per-tensor 7-bit uint8
  activation inside the call). The multiply is an ordinary elementwise op in the graph, which
  inductor fuses with the op before it; ``matmul_part`` is the fbgemm call on an activation
  smoothed up front. float32 activations (others cast to float32 and back).

>>> import torch
>>> c = Int8Smooth("fbgemm", alpha=0.5)
>>> w, x = torch.randn(16, 32), torch.randn(4, 32)
>>> layer = c.build(w, None, act_absmax=x.abs().amax(0))
>>> sorted(layer.packed()), layer(x).shape
(['smooth_inv', 'w_int8', 'w_scale'], torch.Size([4, 16]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..keys import OpShape
from ..primitives import smoothing_inv
from ._cpu_ops import eager_fbgemm_int8, fbgemm_int8_linear
from ._util import FLOAT_DTYPES, add_bias, bad_dtype_reason, op_dtype
from .base import Candidate, register, register_kernel
from .int8_dynamic import FbgemmInt8Handle, Int8Dynamic
from .int8_weight_only import dequantize_int8_nk_rowscale, quantize_int8_nk_rowscale

__all__ = ["Int8Smooth", "Int8SmoothFbgemm"]


@register
@dataclass(frozen=True)
class Int8Smooth(Candidate):
    """The family: calibration, packing and the weight's dequantization. Each kernel is a subclass
    below (``Int8Smooth("fbgemm")`` builds an :class:`Int8SmoothFbgemm`). `alpha` in [0, 1]: how
    much of each channel's range moves from the activation to the weight."""

    family: ClassVar[str] = "int8_smooth"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 3
    dynamic_activation: ClassVar[bool] = True
    # As int8_dynamic's fbgemm kernel on data without outliers (its floor); gains are on outliers.
    min_sqnr_db: ClassVar[float] = 28.0
    lossless: ClassVar[bool] = False
    calibrated: ClassVar[bool] = True
    calibration_keys: ClassVar[tuple[str, ...]] = ("smooth_inv",)

    kernel: str = "fbgemm"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"int8_smooth: alpha must be a number in [0, 1], got {self.alpha!r}")

    # ---- supports -------------------------------------------------------------------------------
    def supports(self, device: torch.device, op: OpShape) -> str | None:
        name = f"int8_smooth/{self.kernel}"
        return bad_dtype_reason(name, op_dtype(op.dtype), FLOAT_DTYPES) or self._kernel_reason(name, device, op)

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape) -> str | None:
        raise NotImplementedError  # pragma: no cover - every kernel class defines it

    # ---- calibration and packing ------------------------------------------------------------------
    def calibrate(self, weight: Tensor, act_absmax: Tensor) -> dict[str, Tensor]:
        return {"smooth_inv": smoothing_inv(act_absmax, weight, float(self.alpha))}

    def quantize(self, weight: Tensor, *, calibration: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The packed state for `weight` [N, K] under `calibration` (``{"smooth_inv": float32 [K]}``,
        from :meth:`calibrate` or a plan). Without it: CalibrationMissing (via :meth:`pack`)."""
        if calibration is None:
            return self.pack(weight)  # raises CalibrationMissing, saying what to pass
        inv = calibration["smooth_inv"].to(device=weight.device, dtype=torch.float32).contiguous()
        if inv.shape != (weight.shape[1],):
            raise ValueError(f"int8_smooth: smooth_inv has shape {tuple(inv.shape)}, the weight's K is "
                             f"{weight.shape[1]}: the calibration belongs to another layer")
        if not bool(torch.isfinite(inv).all()) or not bool((inv > 0).all()):
            raise ValueError("int8_smooth: smooth_inv must be finite and positive (recalibrate the layer)")
        packed = quantize_int8_nk_rowscale(weight.float() / inv[None, :])
        packed["smooth_inv"] = inv
        return packed

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        # reference multiplies x by smooth_inv, then by the dequantized smoothed weight.
        return dequantize_int8_nk_rowscale(packed) * packed["smooth_inv"][None, :]


@register_kernel(Int8Smooth, "fbgemm")
class Int8SmoothFbgemm(FbgemmInt8Handle, Int8Smooth):
    """fbgemm on the smoothed activation: per-tensor 7-bit uint8 inside the call (see module doc)."""

    def adds_work_to(self) -> Candidate:
        """int8_dynamic on fbgemm: the same kernel on an int8 weight of the same shape, after one
        multiply of the activation: never faster, only more accurate."""
        return _FBGEMM

    @staticmethod
    def _fbgemm(xs: Tensor, packed: dict[str, Tensor], bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
        y = add_bias(fbgemm_int8_linear(xs, packed["w_int8"], packed["w_scale"]), bias)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        return self._fbgemm(xf * packed["smooth_inv"], packed, bias, x.dtype)

    def matmul_part(self, x: Tensor, packed: dict[str, Tensor], runtime: Any,
                    bias: Tensor | None) -> Callable[[], Tensor] | None:
        # The smoothing multiply is the unfused activation pass the interpolate model discounts.
        xs = x.float() * packed["smooth_inv"]
        out_dtype = x.dtype
        return lambda: self._fbgemm(xs, packed, bias, out_dtype)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        inner = eager_fbgemm_int8(buffers, dtype)
        if inner is None or buffers["smooth_inv"].dtype != torch.float32:
            return None

        def run(x: Tensor) -> Tensor:
            return inner(x * buffers["smooth_inv"])

        return run

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        # int8_dynamic fbgemm's reference (per-tensor 7-bit uint8 activation) on the smoothed x.
        xs = x.float() * packed["smooth_inv"]
        return _FBGEMM.reference(xs, packed, bias).to(x.dtype)


_FBGEMM = Int8Dynamic("fbgemm")
