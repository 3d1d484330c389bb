"""Grouped asymmetric int4 weight-only matmul: ``autoquant::int4_wo_mm``.

Quantization formula (per output row n, per group g = k // G of G consecutive input columns)::

    q[n, k] in [0, 15] (unsigned)
    w[n, k] = (q[n, k] - zeros[k // G, n]) * scales[k // G, n]

``zeros`` is stored as a float in the scales' dtype, so it may be fractional (e.g. a min/max
quantizer's -min/scale); the kernel evaluates the formula in float32.

Packing (``pack_int4`` / ``unpack_int4``)::

    w_packed: uint8 [N, K // 2], row-major (nn.Linear orientation, K along a row)
    w_packed[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)     # low nibble = even k, high nibble = odd k

The kernel dequantizes the low and high nibbles of a tile as two separate [K/2, N] operands and
multiplies them with the even and odd activation columns (see _int4_wo_kernel.py); no nibble shuffle
is needed on the GPU and the byte layout stays the obvious one.

Contract::

    int4_wo_mm(x [M, K] float32|bfloat16|float16, w_packed [N, K // 2] uint8,
               scales [K // G, N], zeros [K // G, N] (float32|bfloat16|float16, one dtype),
               group_size G in {32, 64, 128}, bias [N] float | None) -> y [M, N] x.dtype
    y = x @ w.T + bias        (K must be a multiple of G; float32 accumulation)

Tuned for M = 1..256; M = 1 runs a split-K GEMV kernel where K is split (see _gemv.py).
Example (CUDA, or CPU with TRITON_INTERPRET=1)::

    packed = pack_int4(q)                                  # q: [N, K] uint8 in 0..15
    y = int4_wo_mm(x, packed, scales, zeros, 128, bias)
"""

import torch
from torch import Tensor

from . import _checks
from ._gemv import gemv_splits, reduce_splits, split_output, use_gemv
from ._registry import (
    check_launchable,
    define_op,
    is_interpreted,
    launcher,
    launches_inline,
    load_kernels,
    m_bucket,
    require_triton,
)

OP = "autoquant::int4_wo_mm"
_KERNEL_MODULE = "_int4_wo_kernel"
GROUP_SIZES = (32, 64, 128)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------- packing
def pack_int4(q: Tensor) -> Tensor:
    """Pack ``q`` [N, K] (integers 0..15, K even) into uint8 [N, K // 2]; see the module doc."""
    if not isinstance(q, Tensor) or q.dim() != 2:
        raise ValueError(
            f"pack_int4: q must be a 2-D tensor [N, K], got {getattr(q, 'shape', type(q))}"
        )
    if q.dtype not in _INT_DTYPES:
        raise ValueError(f"pack_int4: q must have an integer dtype, got {q.dtype}")
    if q.shape[1] % 2:
        raise ValueError(f"pack_int4: K = {q.shape[1]} must be even (two 4-bit values per byte)")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(
            f"pack_int4: values must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]"
        )
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, K: int) -> Tensor:
    """Inverse of pack_int4: uint8 [N, K // 2] -> uint8 [N, K] with values 0..15."""
    if not isinstance(packed, Tensor) or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(
            "unpack_int4: packed must be a 2-D uint8 tensor [N, K // 2], "
            f"got {getattr(packed, 'shape', packed)}"
        )
    if K != 2 * packed.shape[1]:
        raise ValueError(
            f"unpack_int4: K = {K} does not match packed width {packed.shape[1]} "
            "(expected K = 2 * width)"
        )
    q = torch.empty((packed.shape[0], K), dtype=torch.uint8, device=packed.device)
    q[:, 0::2] = packed & 0xF
    q[:, 1::2] = packed >> 4
    return q


# ---------------------------------------------------------------------------------------- reference
def dequantize_int4_reference(
    w_packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    """float32 [N, K] weights: (q - zeros) * scales, broadcast over each group of K."""
    k = 2 * w_packed.shape[1]
    q = unpack_int4(w_packed, k).float()
    s = scales.float().repeat_interleave(group_size, dim=0).T  # [N, K]
    z = zeros.float().repeat_interleave(group_size, dim=0).T
    return (q - z) * s


def int4_wo_mm_reference(
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """Plain PyTorch: dequantize in float32, matmul in float32, cast back to x.dtype."""
    y = x.float() @ dequantize_int4_reference(w_packed, scales, zeros, group_size).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------- op
def _check(
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
) -> tuple[int, int, int]:
    _checks.check_matrix(OP, "x", x, _checks.FLOAT_DTYPES, "[M, K]")
    m, k = x.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{OP}: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(
            f"{OP}: K = {k} (columns of x) must be a multiple of group_size = {group_size}"
        )
    _checks.check_matrix(OP, "w_packed", w_packed, (torch.uint8,), "[N, K // 2] (see pack_int4)")
    n = w_packed.shape[0]
    if w_packed.shape[1] * 2 != k:
        raise ValueError(
            f"{OP}: w_packed must have K // 2 = {k // 2} columns for K = {k}, "
            f"got {w_packed.shape[1]}"
        )
    groups = k // group_size
    _checks.check_matrix(
        OP, "scales", scales, _checks.FLOAT_DTYPES, f"[K // G, N] = [{groups}, {n}]"
    )
    _checks.check_matrix(
        OP, "zeros", zeros, (scales.dtype,), f"[K // G, N] = [{groups}, {n}] in the scales' dtype"
    )
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (groups, n):
            raise ValueError(
                f"{OP}: {name} must have shape [K // G, N] = [{groups}, {n}], got {tuple(t.shape)}"
            )
    _checks.check_bias(OP, bias, n)
    _checks.check_devices(
        OP, {"x": x, "w_packed": w_packed, "scales": scales, "zeros": zeros, "bias": bias}
    )
    return m, n, k


def _launch(
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
    out: Tensor,
) -> None:
    kernels = load_kernels(_KERNEL_MODULE, OP)
    check_launchable(kernels.KERNEL, x.device, OP)
    from ._triton_common import grid_2d

    m, k = x.shape
    n = w_packed.shape[0]
    if use_gemv(m) and _launch_gemv(kernels.GEMV_KERNEL, x, w_packed, scales, zeros, group_size, bias, out):
        return
    launcher(kernels.KERNEL, x.device)[grid_2d(m, n)](
        x, w_packed, scales, zeros, scales if bias is None else bias, out,
        m, n, k, m_bucket(m),
        x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        out.stride(0), out.stride(1),
        group_size,
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST_DOT=is_interpreted(kernels.KERNEL),
    )  # fmt: skip


def _launch_gemv(
    kernel: object,
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
    out: Tensor,
) -> bool:
    """Decode rows (see _gemv.py): K split on group boundaries, splits summed into ``out``. Returns
    False, launching nothing, where K would not be split (the tensor-core kernel is faster there)."""
    m, k = x.shape
    n = w_packed.shape[0]
    groups = k // group_size
    per_split = -(-groups // gemv_splits(-(-n // 32), k, x.device))
    splits = -(-groups // per_split)
    if splits < 2:
        return False
    target, stride_os, stride_om, stride_on = split_output(out, splits)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (-(-n // meta["BLOCK_N"]), splits, m)

    launcher(kernel, x.device)[grid](
        x, w_packed, scales, zeros, scales if bias is None else bias, target,
        n, k, per_split,
        x.stride(0), x.stride(1), w_packed.stride(0), w_packed.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        stride_os, stride_om, stride_on,
        group_size,
        HAS_BIAS=bias is not None,
    )  # fmt: skip
    reduce_splits(target, out)
    return True


@torch.library.custom_op("autoquant::_int4_wo_mm_opaque", mutates_args=())
def _int4_wo_mm_opaque(
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    out = x.new_empty((x.shape[0], w_packed.shape[0]))
    _launch(x, w_packed, scales, zeros, group_size, bias, out)
    return out


@_int4_wo_mm_opaque.register_fake
def _(
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    return x.new_empty((x.shape[0], w_packed.shape[0]))


@define_op(OP)
def _int4_wo_mm_op(
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    m, n, _ = _check(x, w_packed, scales, zeros, group_size, bias)
    if m == 0 or n == 0:  # an empty output: nothing to launch
        return x.new_empty((m, n))
    bias = None if bias is None else bias.contiguous()
    if not launches_inline(_KERNEL_MODULE, OP, x.device):
        return torch.ops.autoquant._int4_wo_mm_opaque(x, w_packed, scales, zeros, group_size, bias)
    out = x.new_empty((m, n))
    _launch(x, w_packed, scales, zeros, group_size, bias, out)
    return out


def int4_wo_mm(
    x: Tensor,
    w_packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ ((unpack_int4(w_packed) - zeros) * scales).T + bias, groups of G along K."""
    require_triton("int4_wo_mm")
    return torch.ops.autoquant.int4_wo_mm(x, w_packed, scales, zeros, group_size, bias)
