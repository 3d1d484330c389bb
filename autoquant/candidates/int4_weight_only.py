"""int4 weight-only: grouped asymmetric 4-bit weights, float activations (tinygemm convention).

Quantization (``primitives.int4_grouped_asym``): per output row and group of ``group_size``
consecutive inputs, codes q in 0..15 and ``w_hat = (q - 8) * scale + zero``, scale and zero stored
in the weight's dtype (tinygemm wants them in the activation dtype, which is the model's).

Packed state (weight_format ``int4_nk_g{G}``, one portable layout for every kernel)::

    w_int4            uint8 [N, K // 2]     byte = q[n, 2j] | q[n, 2j + 1] << 4 (low nibble = even k)
    scales_and_zeros  weight dtype [K // G, N, 2]    [..., 0] = scale, [..., 1] = zero

The kernels' own layouts are built from it in ``prepare`` (runtime state, never saved): the CPU
tinygemm layout depends on the CPU's vector width (blocks of 32 columns on AVX2, 64 on AVX-512), so
saving it would break a checkpoint moved to another CPU. Cost: the runtime copy doubles the int4
bytes while the layer lives. The CPU layout lives in ``_cpu_ops.PREPACK_CACHE`` keyed by the
``w_int4`` buffer, and ``tinygemm_cpu`` runs as the opaque op ``autoquant::cpu_int4pack_mm`` over
the portable buffers: a torch.export-ed program holds (and saves) only the portable layout.

Kernels:

- ``tinygemm_cpu``: ``_convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)`` (uint8 [N, K // 2])
  + ``_weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros)``. N % 16 == 0, G in
  {32, 64, 128, 256}, scales_and_zeros in x's dtype (fp32 / bf16 / fp16); dequantizes in float32,
  accumulates in float32, rounds once (bit-exact against the reference for bf16). Below AVX-512
  only bf16 activations get a vectorized kernel; ``supports`` declines fp32 / fp16 there.
- ``tinygemm`` (CUDA, sm80+): ``_convert_weight_to_int4pack(uint8 [N, K // 2] with even k in the
  HIGH nibble, inner_k_tiles)`` + ``_weight_int4pack_mm``. bf16 activations and qparams only;
  N % 8 == 0; inner_k_tiles is the largest of 8 / 4 / 2 with K % (16 * tiles) == 0.
- ``triton`` (CUDA): ``autoquant.kernels.int4_wo_mm`` reading ``w_int4`` as is (it is that
  module's pack_int4 layout); its formula is ``(q - z') * s`` with a float z', so ``prepare``
  hands it float32 ``s`` and ``z' = 8 - zero / s``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..keys import OpShape
from ..primitives import (
    INT4_MID,
    int4_grouped_asym,
    pack_int4_lo_first,
    row_blocks,
    swap_nibbles,
    unpack_int4_lo_first,
)
from ._cpu_ops import eager_int4pack, int4pack_mm, prepack
from ._util import (
    FLOAT_DTYPES,
    add_bias,
    bad_dtype_reason,
    cpu_scalar_only_reason,
    min_capability_reason,
    not_cpu_reason,
    not_cuda_reason,
    op_dtype,
    require_triton_op,
    triton_op,
)
from .base import Candidate, register, register_kernel

__all__ = ["Int4Tinygemm", "Int4TinygemmCpu", "Int4Triton", "Int4WeightOnly"]

GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_GROUPS = (32, 64, 128, 256)
TRITON_GROUPS = (32, 64, 128)


def _inner_k_tiles(k: int) -> int | None:
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    return None


@register
@dataclass(frozen=True)
class Int4WeightOnly(Candidate):
    """The family: grouped asymmetric codes, their packing and dequantization. Each kernel is a
    subclass below (``Int4WeightOnly("tinygemm_cpu", 64)`` builds an :class:`Int4TinygemmCpu`)."""

    family: ClassVar[str] = "int4_weight_only"
    version: ClassVar[int] = 1
    order: ClassVar[int] = 3
    dynamic_activation: ClassVar[bool] = False
    # Measured on random normal data (K=256..4096, fp32 and bf16): G=32 21.8-22.5 dB,
    # G=64 20.5-21.2 dB, G=128 18.6-20.6 dB.
    min_sqnr_db: ClassVar[float] = 17.0
    lossless: ClassVar[bool] = False

    kernel: str = "tinygemm_cpu"
    group_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4_weight_only: group_size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def weight_format(self) -> str | None:
        return f"int4_nk_g{self.group_size}"

    # ---- supports -------------------------------------------------------------------------------
    def supports(self, device: torch.device, op: OpShape) -> str | None:
        name = f"int4_weight_only/{self.kernel}(G={self.group_size})"
        if op.k % self.group_size:
            return f"{name}: K={op.k} is not a multiple of group_size={self.group_size}"
        return self._kernel_reason(name, device, op, op_dtype(op.dtype))

    @abstractmethod
    def _kernel_reason(self, name: str, device: torch.device, op: OpShape,
                       dtype: torch.dtype | None) -> str | None: ...

    # ---- packing ------------------------------------------------------------------------------------
    def quantize(self, weight: Tensor) -> dict[str, Tensor]:
        qdtype = weight.dtype if weight.dtype in FLOAT_DTYPES else torch.float32
        n, k = weight.shape
        if k % self.group_size:  # int4_grouped_asym says so for the whole weight
            int4_grouped_asym(weight, self.group_size, qdtype)
        # By blocks of rows (each row's codes depend on that row alone: the same bits as one
        # call, with the int32 codes and float temporaries bounded; see primitives.row_blocks).
        w_int4 = torch.empty((n, k // 2), dtype=torch.uint8, device=weight.device)
        sz = torch.empty((k // self.group_size, n, 2), dtype=qdtype, device=weight.device)
        for rows in row_blocks(n, k, weight.device):
            q, scales, zeros = int4_grouped_asym(weight[rows], self.group_size, qdtype)
            w_int4[rows] = pack_int4_lo_first(q)
            sz[:, rows, 0] = scales
            sz[:, rows, 1] = zeros
        return {"w_int4": w_int4, "scales_and_zeros": sz}

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """tinygemm's ``(q - 8) * scale + zero`` with the qparams read in x's dtype, in float32."""
        q = unpack_int4_lo_first(packed["w_int4"]).float()
        g = self.group_size
        sz = packed["scales_and_zeros"].to(dtype).float()  # the kernels read qparams in x's dtype
        return (q - INT4_MID) * sz[..., 0].t().repeat_interleave(g, 1) + sz[..., 1].t().repeat_interleave(g, 1)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        w = self.dequantize(packed, x.dtype)
        y = (x.double() @ w.double().T).to(x.dtype)
        return add_bias(y, bias)


@register_kernel(Int4WeightOnly, "tinygemm_cpu")
class Int4TinygemmCpu(Int4WeightOnly):
    """``_weight_int4pack_mm_for_cpu`` over the CPU layout kept in ``_cpu_ops.PREPACK_CACHE``."""

    @property
    def prepack_kind(self) -> str | None:
        return "int4pack"

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape,
                       dtype: torch.dtype | None) -> str | None:
        reason = not_cpu_reason(name, device) or bad_dtype_reason(name, dtype, FLOAT_DTYPES)
        if reason:
            return reason
        if op.n % 16:
            return f"{name}: the CPU int4 pack needs N % 16 == 0, got N={op.n}"
        return cpu_scalar_only_reason(name, device, dtype)

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        n = packed["w_int4"].shape[0]
        if n % 16:  # a shape rule: our ValueError at build time, not torch's RuntimeError from the pack
            raise ValueError(f"{self.name}: the CPU int4 pack needs N % 16 == 0, got N={n}")
        prepack("int4pack", packed["w_int4"])  # warms the cache; the op rebuilds a missing entry itself
        return None

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        sz = packed["scales_and_zeros"]
        sz = sz if sz.dtype == x.dtype else sz.to(x.dtype)  # tinygemm reads qparams in x's dtype
        return add_bias(int4pack_mm(x, packed["w_int4"], sz, self.group_size), bias)

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        return eager_int4pack(buffers, dtype, self.group_size)


@register_kernel(Int4WeightOnly, "tinygemm")
class Int4Tinygemm(Int4WeightOnly):
    """CUDA tinygemm ``_weight_int4pack_mm`` (sm80+, bf16) over its own layout built in prepare."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape,
                       dtype: torch.dtype | None) -> str | None:
        reason = (not_cuda_reason(name, device) or bad_dtype_reason(name, dtype, (torch.bfloat16,))
                  or min_capability_reason(name, device, (8, 0)))
        if reason:
            return reason
        if op.n % 8:
            return f"{name}: tinygemm needs N % 8 == 0, got N={op.n}"
        if _inner_k_tiles(op.k) is None:
            return f"{name}: tinygemm needs K % 32 == 0, got K={op.k}"
        return None

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        w = packed["w_int4"]
        tiles = _inner_k_tiles(w.shape[1] * 2)
        if w.device.type != "cuda" or tiles is None:
            return None
        return {"w": torch.ops.aten._convert_weight_to_int4pack(swap_nibbles(w).contiguous(), tiles),
                "sz": packed["scales_and_zeros"]}

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        if runtime is None:
            raise RuntimeError(f"{self.name}: runtime state missing (weights on the wrong device?)")
        sz = runtime["sz"] if runtime["sz"].dtype == x.dtype else runtime["sz"].to(x.dtype)
        return add_bias(torch.ops.aten._weight_int4pack_mm(x, runtime["w"], self.group_size, sz), bias)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        # CUDA tinygemm dequantizes into bf16 registers (one fma, one rounding) before the mma.
        return super().dequantize(packed, dtype).to(torch.bfloat16).float()


@register_kernel(Int4WeightOnly, "triton")
class Int4Triton(Int4WeightOnly):
    """``autoquant.kernels.int4_wo_mm``: ``(q - z') * s`` with float32 s and z' = 8 - zero / s."""

    def _kernel_reason(self, name: str, device: torch.device, op: OpShape,
                       dtype: torch.dtype | None) -> str | None:
        reason = not_cuda_reason(name, device) or bad_dtype_reason(name, dtype, FLOAT_DTYPES)
        if reason:
            return reason
        if self.group_size not in TRITON_GROUPS:
            return f"{name}: the Triton int4 kernel takes group sizes {TRITON_GROUPS}"
        _, reason = triton_op("int4_wo_mm")
        return reason

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        # Any device (CPU tensors run under TRITON_INTERPRET=1, else the op says why not).
        sz = packed["scales_and_zeros"]
        scale = sz[..., 0].float().contiguous()
        return {"scales": scale, "zeros": (INT4_MID - sz[..., 1].float() / scale).contiguous()}

    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor:
        if runtime is None:
            raise RuntimeError(f"{self.name}: runtime state missing (weights on the wrong device?)")
        fn = require_triton_op("int4_wo_mm")
        return fn(x, packed["w_int4"], runtime["scales"], runtime["zeros"], self.group_size, bias)

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        q = unpack_int4_lo_first(packed["w_int4"]).float()
        sz, g = packed["scales_and_zeros"], self.group_size
        s = sz[..., 0].float()
        z = INT4_MID - sz[..., 1].float() / s
        return (q - z.t().repeat_interleave(g, 1)) * s.t().repeat_interleave(g, 1)

    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor:
        # (q - z') * s in float32 with the runtime's z' and s, bias in the epilogue.
        y = x.float() @ self.dequantize(packed, x.dtype).T
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
