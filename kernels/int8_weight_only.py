"""int8 weight-only matmul: ``autoquant::int8_wo_mm``.

Contract::

    int8_wo_mm(x [M, K] float32|bfloat16|float16,
               w_int8 [N, K] int8,              # nn.Linear layout
               w_scale [N] float32 | x.dtype,   # symmetric, per output channel
               bias [N] float | None) -> y [M, N] x.dtype

    y = x @ (w_int8 * w_scale[:, None]).T + bias

The kernel loads int8 weight tiles, converts them in registers (exact) and accumulates in float32 on
tensor cores; the per-column scale and the bias are applied once in the epilogue. Float32
activations use IEEE float32 dots (no TF32), matching F.linear's default. Autotuned per (M bucket,
N, K) for M = 1..512 (small-BLOCK_M, narrow-N tiles for decode; a split-K GEMV measured slower
at M = 1 and 4 on an H200: see kernels/_gemv.py). M = 0 returns an empty [0, N]
tensor.

Example (CUDA, or CPU with TRITON_INTERPRET=1)::

    y = int8_wo_mm(x, w_int8, w_scale, bias)
    y_ref = int8_wo_mm_reference(x, w_int8, w_scale, bias)
"""

import torch
from torch import Tensor

from . import _checks
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

OP = "autoquant::int8_wo_mm"
_KERNEL_MODULE = "_int8_wo_kernel"


def int8_wo_mm_reference(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Plain PyTorch: dequantize in float32, matmul in float32, cast back to x.dtype."""
    w = w_int8.float() * w_scale.float()[:, None]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _check(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> tuple[int, int, int]:
    _checks.check_matrix(OP, "x", x, _checks.FLOAT_DTYPES, "[M, K]")
    _checks.check_matrix(OP, "w_int8", w_int8, (torch.int8,), "[N, K]")
    m, k = x.shape
    n = w_int8.shape[0]
    _checks.check_same_k(OP, "x", k, "w_int8", w_int8.shape[1])
    _checks.check_vector(OP, "w_scale", w_scale, n, (torch.float32, x.dtype))
    _checks.check_bias(OP, bias, n)
    _checks.check_devices(OP, {"x": x, "w_int8": w_int8, "w_scale": w_scale, "bias": bias})
    return m, n, k


def _launch(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """Launch the Triton kernel writing ``out`` (via wrap_triton where it traces: see launcher)."""
    kernels = load_kernels(_KERNEL_MODULE, OP)
    check_launchable(kernels.KERNEL, x.device, OP)
    from ._triton_common import grid_2d

    m, k = x.shape
    n = w_int8.shape[0]
    launcher(kernels.KERNEL, x.device)[grid_2d(m, n)](
        x, w_int8, w_scale, w_scale if bias is None else bias, out,
        m, n, k, m_bucket(m),
        x.stride(0), x.stride(1), w_int8.stride(0), w_int8.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST_DOT=is_interpreted(kernels.KERNEL),
    )  # fmt: skip


@torch.library.custom_op("autoquant::_int8_wo_mm_opaque", mutates_args=())
def _int8_wo_mm_opaque(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """Opaque twin of int8_wo_mm for launches that cannot be traced (interpreter) or cannot run."""
    out = x.new_empty((x.shape[0], w_int8.shape[0]))
    _launch(x, w_int8, w_scale, bias, out)
    return out


@_int8_wo_mm_opaque.register_fake
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], w_int8.shape[0]))


@define_op(OP)
def _int8_wo_mm_op(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    m, n, _ = _check(x, w_int8, w_scale, bias)
    if m == 0 or n == 0:  # an empty output: nothing to launch
        return x.new_empty((m, n))
    w_scale = w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not launches_inline(_KERNEL_MODULE, OP, x.device):
        return torch.ops.autoquant._int8_wo_mm_opaque(x, w_int8, w_scale, bias)
    out = x.new_empty((m, n))
    _launch(x, w_int8, w_scale, bias, out)
    return out


def int8_wo_mm(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ (w_int8 * w_scale[:, None]).T + bias through the Triton kernel (module docstring).

    Raises RuntimeError when Triton is unavailable, ValueError for a bad argument.
    """
    require_triton("int8_wo_mm")
    return torch.ops.autoquant.int8_wo_mm(x, w_int8, w_scale, bias)
