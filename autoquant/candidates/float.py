"""The float family: the baseline F.linear, and unquantized (or fp16-weight) kernels that beat it.

Kernels (param ``kernel``):

- ``aten``: ``F.linear``. With ``compute_dtype=None`` this is THE baseline (lossless).
- ``onednn`` (CPU): the weight reordered once into oneDNN's blocked layout by
  ``mkldnn._reorder_linear_weight`` (in ``prepare``), then ``mkldnn._linear_pointwise``. The
  reorder's batch-size hint is left at None: oneDNN then picks a layout that does not depend on M,
  and every M is correct whatever the hint (checked for hints None/1/16/128 and M = 1..200; with a
  hint that disagrees with M oneDNN may reorder again inside the call, which is slower, never
  wrong). On this AVX2 CPU the hint made no measurable difference. bf16 / fp16 weights need
  avx512bw+avx512vl+avx512dq / avx512_fp16 or avx_ne_convert (``supports`` asks torch).
  Memory: the plain weight stays in the packed state and the reordered copy lives in the runtime
  state, so this kernel holds the weight twice.
- ``fbgemm_fp16`` (CPU, float32 activations): fp16 weight prepacked by
  ``quantized.linear_prepack_fp16`` (runtime state), ``quantized.linear_dynamic_fp16``; the
  activation stays float32 and accumulation is float32, only the weight is rounded to fp16
  (values beyond +-65504 saturate).

``compute_dtype`` (None | "float32" | "bfloat16" | "float16"): None computes in the activation
dtype; otherwise x (and the stored weight) are cast to it, the kernel runs there and the output is
cast back. A bf16 model on a CPU without bf16 units runs much faster with compute_dtype="float32".

>>> c = FloatCandidate(kernel="aten")
>>> c.lossless, c.build(torch.randn(4, 8), None)(torch.randn(2, 8)).shape
(True, torch.Size([2, 4]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..keys import OpShape, parse_dtype
from ._util import (
    FLOAT_NAMES,
    add_bias,
    bad_dtype_reason,
    not_cpu_reason,
    op_dtype,
    quantized_engine,
)
from .base import Candidate, register

__all__ = ["FloatCandidate"]

KERNELS = ("aten", "onednn", "fbgemm_fp16")


def _mkldnn_supports(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or (
        "x86" in torch.backends.quantized.supported_engines
    )


@register
@dataclass(frozen=True)
class FloatCandidate(Candidate):
    family: ClassVar[str] = "float"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 0

    kernel: str = "aten"
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"float: unknown kernel {self.kernel!r}; expected one of {KERNELS}")
        if self.compute_dtype is not None and self.compute_dtype not in FLOAT_NAMES:
            raise ValueError(f"float: compute_dtype must be None or one of {FLOAT_NAMES}, got {self.compute_dtype!r}")

    # Accuracy facts depend on the params here, so these two ClassVars of the protocol become
    # per-instance properties (read them from an instance, not from the class).
    @property  # type: ignore[override]
    def lossless(self) -> bool:
        """aten / onednn in the activation dtype quantize nothing (oneDNN may sum in another order)."""
        return self.kernel in ("aten", "onednn") and self.compute_dtype is None

    @property  # type: ignore[override]
    def min_sqnr_db(self) -> float:
        """Floor vs float32 F.linear on random normal data, measured with margin (tests/candidates)."""
        if self.lossless:
            return float("inf")
        if self.compute_dtype == "bfloat16":
            return 40.0  # bf16 rounding of x, w and the output: measured ~51 dB
        if self.kernel == "fbgemm_fp16" or self.compute_dtype == "float16":
            return 55.0  # fp16 weight (and x for compute_dtype float16): measured ~73 / ~69 dB
        return 80.0  # compute in float32 for a bf16/fp16 model: only the cast back rounds

    @property
    def traceable(self) -> bool:
        """onednn: inductor's lowering of mkldnn._linear_pointwise insists on a weight it packed
        itself (a graph constant), and fails on ours; fbgemm_fp16's runtime handle is a
        ScriptObject dynamo cannot proxy. Both run as eager islands inside a compiled model."""
        return self.kernel == "aten"

    # ---- helpers --------------------------------------------------------------------------------
    def _compute(self, x_dtype: torch.dtype) -> torch.dtype:
        return x_dtype if self.compute_dtype is None else parse_dtype(self.compute_dtype)

    # ---- protocol -------------------------------------------------------------------------------
    def supports(self, device: torch.device, op: OpShape) -> str | None:
        x_dtype = op_dtype(op.dtype)
        if x_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"float: activations of dtype {op.dtype} are not floating point"
        cd = self._compute(x_dtype)
        if self.kernel == "aten":
            return None  # F.linear runs everywhere (fp16 on an old CPU slowly: timing decides)
        if self.kernel == "onednn":
            reason = not_cpu_reason("float/onednn", device)
            if reason:
                return reason
            if not _mkldnn_supports(cd):
                return (f"float/onednn: oneDNN {str(cd).removeprefix('torch.')} linear needs CPU support "
                        "this machine lacks (avx512 bf16/fp16 or avx_ne_convert)")
            return None
        # fbgemm_fp16
        reason = not_cpu_reason("float/fbgemm_fp16", device)
        if reason:
            return reason
        if not _fbgemm_available():
            return "float/fbgemm_fp16: torch was built without the fbgemm quantized engine"
        return bad_dtype_reason("float/fbgemm_fp16 (set compute_dtype='float32' for other models)",
                                cd, (torch.float32,))

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        if self.kernel == "fbgemm_fp16":
            # fp16 storage: what the prepack rounds to anyway, at half the bytes of float32.
            return {"weight": weight.to(torch.float16).contiguous()}
        dtype = weight.dtype if self.compute_dtype is None else parse_dtype(self.compute_dtype)
        return {"weight": weight.to(dtype).contiguous()}

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        w = packed["weight"]
        if w.device.type != "cpu" or self.kernel == "aten":
            return None  # CPU-only kernels refuse in linear(); supports() already said why
        if self.kernel == "onednn":
            return torch.ops.mkldnn._reorder_linear_weight(w, None)
        with quantized_engine("fbgemm"):
            return torch.ops.quantized.linear_prepack_fp16(w.float(), None)

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        cd = self._compute(x.dtype)
        xc = x if x.dtype == cd else x.to(cd)
        if self.kernel == "aten":
            w = packed["weight"]
            y = F.linear(xc, w if w.dtype == cd else w.to(cd), None if bias is None else bias.to(cd))
        elif runtime is None:
            raise RuntimeError(f"{self.name}: runtime state missing (weights not on CPU?)")
        elif self.kernel == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(xc, runtime, None if bias is None else bias.to(cd),
                                                   "none", [], "")
        else:
            y = add_bias(torch.ops.quantized.linear_dynamic_fp16(xc, runtime), bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        cd = self._compute(x.dtype)
        w = packed["weight"]
        if self.kernel == "fbgemm_fp16":
            # fp16 weight, float32 activation and accumulation, bias added in float32.
            y = F.linear(x.to(cd).float(), w.float(), None if bias is None else bias.float())
        else:
            y = F.linear(x.to(cd), w.to(cd), None if bias is None else bias.to(cd))
        return y.to(x.dtype)
