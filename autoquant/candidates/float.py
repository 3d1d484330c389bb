"""The float family: the baseline F.linear, and unquantized (or fp16-weight) kernels that beat it.

Kernels (param ``kernel``):

- ``aten``: ``F.linear``. With ``compute_dtype=None`` this is THE baseline (lossless).
- ``onednn`` (CPU): ``mkldnn._linear_pointwise`` over the weight reordered once into oneDNN's
  blocked layout by ``mkldnn._reorder_linear_weight``. The reorder's batch-size hint is left at
  None: oneDNN then picks a layout that does not depend on M, and every M is correct whatever the
  hint (checked for hints None/1/16/128 and M = 1..200; with a hint that disagrees with M oneDNN
  may reorder again inside the call, which is slower, never wrong). On this AVX2 CPU the hint made
  no measurable difference. bf16 / fp16 weights need avx512bw+avx512vl+avx512dq / avx512_fp16 or
  avx_ne_convert (``supports`` asks torch).
- ``fbgemm_fp16`` (CPU, float32 activations): fp16 weight prepacked by
  ``quantized.linear_prepack_fp16``, then ``quantized.linear_dynamic_fp16``; the activation stays
  float32 and accumulation is float32, only the weight is rounded to fp16 (values beyond +-65504
  saturate).

Both CPU kernels run through the opaque ops ``autoquant::cpu_onednn_linear`` /
``autoquant::cpu_fbgemm_fp16_linear`` (``_cpu_ops``): plain-tensor arguments, so torch.compile and
torch.export trace them without a graph break, and the reordered / prepacked weight is built once
per weight tensor in ``prepare`` and kept in ``_cpu_ops.PREPACK_CACHE``. Memory: that copy sits
next to the plain weight buffer (what a checkpoint saves), so these kernels hold the weight twice.

``compute_dtype`` (None | "float32" | "bfloat16" | "float16"): None computes in the activation
dtype; otherwise x (and the stored weight) are cast to it, the kernel runs there and the output is
cast back. A bf16 model on a CPU without bf16 units runs much faster with compute_dtype="float32".

>>> c = FloatCandidate(kernel="aten")
>>> c.lossless, c.build(torch.randn(4, 8), None)(torch.randn(2, 8)).shape
(True, torch.Size([2, 4]))
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..keys import OpShape, parse_dtype
from ._cpu_ops import (
    eager_aten_linear,
    eager_fbgemm_fp16,
    eager_onednn_linear,
    fbgemm_fp16_linear,
    onednn_linear,
    prepack,
)
from ._util import (
    FLOAT_DTYPES,
    FLOAT_NAMES,
    add_bias,
    bad_dtype_reason,
    not_cpu_reason,
    op_dtype,
)
from .base import Candidate, register, register_kernel

__all__ = ["FloatAten", "FloatCandidate", "FloatFbgemmFp16", "FloatOnednn", "is_baseline"]

_COMPUTE_DTYPES = dict(zip(FLOAT_NAMES, FLOAT_DTYPES))


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


def is_baseline(c: Candidate) -> bool:
    """The float baseline: F.linear in the model's own dtype. A layer it wins stays (or goes back
    to) a plain nn.Linear, so that is also what the tuner times for it."""
    return c.family == "float" and c.kernel == "aten" and getattr(c, "compute_dtype", None) is None


@register
@dataclass(frozen=True)
class FloatCandidate(Candidate):
    """The family: compute-dtype handling, the reference. Each kernel is a subclass below
    (``FloatCandidate("onednn")`` builds a :class:`FloatOnednn`)."""

    family: ClassVar[str] = "float"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 0

    kernel: str = "aten"
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compute_dtype is not None and self.compute_dtype not in FLOAT_NAMES:
            raise ValueError(f"float: compute_dtype must be None or one of {FLOAT_NAMES}, got {self.compute_dtype!r}")

    # Accuracy facts depend on the params here, so these two ClassVars of the protocol become
    # per-instance properties (read them from an instance, not from the class).
    @property  # type: ignore[override]
    def lossless(self) -> bool:
        """In the activation dtype nothing is rounded (oneDNN may sum in another order); fbgemm_fp16
        overrides this (its weight is fp16)."""
        return self.compute_dtype is None

    @property  # type: ignore[override]
    def min_sqnr_db(self) -> float:
        """Floor vs float32 F.linear on random normal data, measured with margin (tests/candidates)."""
        if self.lossless:
            return float("inf")
        if self.compute_dtype == "bfloat16":
            return 40.0  # bf16 rounding of x, w and the output: measured ~51 dB
        if self.compute_dtype == "float16":
            return 55.0  # fp16 x and weight: measured ~69 dB
        return 80.0  # compute in float32 for a bf16/fp16 model: only the cast back rounds

    # ---- helpers --------------------------------------------------------------------------------
    def _compute(self, x_dtype: torch.dtype) -> torch.dtype:
        # A dict lookup, not parse_dtype: this runs on every call (__post_init__ checked the name).
        return x_dtype if self.compute_dtype is None else _COMPUTE_DTYPES[self.compute_dtype]

    # ---- protocol -------------------------------------------------------------------------------
    def supports(self, device: torch.device, op: OpShape) -> str | None:
        x_dtype = op_dtype(op.dtype)
        if x_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"float: activations of dtype {op.dtype} are not floating point"
        return self._kernel_reason(device, self._compute(x_dtype))

    @abstractmethod
    def _kernel_reason(self, device: torch.device, cd: torch.dtype) -> str | None: ...

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        dtype = weight.dtype if self.compute_dtype is None else parse_dtype(self.compute_dtype)
        return {"weight": weight.to(dtype).contiguous()}

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return packed["weight"].to(self._compute(dtype)).float()

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        cd = self._compute(x.dtype)
        y = F.linear(x.to(cd), packed["weight"].to(cd), None if bias is None else bias.to(cd))
        return y.to(x.dtype)


@register_kernel(FloatCandidate, "aten")
class FloatAten(FloatCandidate):
    """``F.linear`` (in compute_dtype when set); with compute_dtype None, THE baseline."""

    def _kernel_reason(self, device: torch.device, cd: torch.dtype) -> str | None:
        return None  # F.linear runs everywhere (fp16 on an old CPU slowly: timing decides)

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        cd = self._compute(x.dtype)
        xc = x if x.dtype == cd else x.to(cd)
        w = packed["weight"]
        b = bias if bias is None or bias.dtype == cd else bias.to(cd)
        y = F.linear(xc, w if w.dtype == cd else w.to(cd), b)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return eager_aten_linear(buffers, dtype, self._compute(dtype))


@register_kernel(FloatCandidate, "onednn")
class FloatOnednn(FloatCandidate):
    """oneDNN linear over the weight reordered once (``_cpu_ops.PREPACK_CACHE``)."""

    @property
    def prepack_kind(self) -> str | None:
        return "onednn"

    def _kernel_reason(self, device: torch.device, cd: torch.dtype) -> str | None:
        reason = not_cpu_reason("float/onednn", device)
        if reason:
            return reason
        if not _mkldnn_supports(cd):
            return (f"float/onednn: oneDNN {str(cd).removeprefix('torch.')} linear needs CPU support "
                    "this machine lacks (avx512 bf16/fp16 or avx_ne_convert)")
        return None

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        """Warm the prepack cache (the op rebuilds a missing entry itself); no runtime state."""
        prepack("onednn", packed["weight"])
        return None

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        cd = self._compute(x.dtype)
        xc = x if x.dtype == cd else x.to(cd)
        b = bias if bias is None or bias.dtype == cd else bias.to(cd)
        y = onednn_linear(xc, packed["weight"], b)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return eager_onednn_linear(buffers, dtype, self._compute(dtype))


@register_kernel(FloatCandidate, "fbgemm_fp16")
class FloatFbgemmFp16(FloatCandidate):
    """fbgemm's fp16-weight GEMM: float32 activations and accumulation, bias added in float32."""

    @property
    def prepack_kind(self) -> str | None:
        return "fbgemm_fp16"

    @property  # type: ignore[override]
    def lossless(self) -> bool:
        return False

    @property  # type: ignore[override]
    def min_sqnr_db(self) -> float:
        if self.compute_dtype == "bfloat16":
            return 40.0
        return 55.0  # fp16 weight: measured ~73 dB

    def _kernel_reason(self, device: torch.device, cd: torch.dtype) -> str | None:
        reason = not_cpu_reason("float/fbgemm_fp16", device)
        if reason:
            return reason
        if not _fbgemm_available():
            return "float/fbgemm_fp16: torch was built without the fbgemm quantized engine"
        return bad_dtype_reason("float/fbgemm_fp16 (set compute_dtype='float32' for other models)",
                                cd, (torch.float32,))

    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        # fp16 storage: what the prepack rounds to anyway, at half the bytes of float32.
        return {"weight": weight.to(torch.float16).contiguous()}

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        prepack("fbgemm_fp16", packed["weight"])
        return None

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        cd = self._compute(x.dtype)
        xc = x if x.dtype == cd else x.to(cd)
        y = add_bias(fbgemm_fp16_linear(xc, packed["weight"]), bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return eager_fbgemm_fp16(buffers, dtype) if self._compute(dtype) == torch.float32 else None

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return packed["weight"].float()  # the fp16 weight, computed in float32

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        # fp16 weight, float32 activation and accumulation, bias added in float32.
        cd = self._compute(x.dtype)
        y = F.linear(x.to(cd).float(), packed["weight"].float(), None if bias is None else bias.float())
        return y.to(x.dtype)
