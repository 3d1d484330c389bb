"""int8 dynamic quantization (per-token activations x per-channel weights).

Ops and contracts::

    autoquant::quantize_per_token_int8(x [M, K] float32|bfloat16|float16)
        -> (x_int8 [M, K] int8, x_scale [M] float32)
        x_scale = max(amax(|x|, row) / 127, PER_TOKEN_EPS)
        x_int8 = clamp(round(x / x_scale), -127, 127)
        in float32 with IEEE division; round is ties-to-even like torch.round. Implemented as a
        Triton kernel (one program per row, two passes over the row) that matches
        quantize_per_token_int8_reference bit for bit.

    autoquant::int8_dyn_mm(x_int8 [M, K] int8, x_scale [M] float32, w_int8 [N, K] int8,
                           w_scale [N] float32, bias [N] float | None, out_dtype)
        -> [M, N] out_dtype
        y = float32(x_int8 @ w_int8.T) * x_scale[:, None] * w_scale[None, :] + bias
        with exact int32 accumulation on int8 tensor cores and the rescale in the epilogue.

    int8_dynamic_linear(x, w_int8, w_scale, bias) = int8_dyn_mm(*quantize_per_token_int8(x), ...,
        out_dtype=x.dtype): two kernel launches, the activation round-trips through memory as int8.

Symmetric int8 uses [-127, 127] (not -128) so that negation is exact and the scale maps amax to 127.
Example (CUDA, or CPU with TRITON_INTERPRET=1)::

    y = int8_dynamic_linear(x, w_int8, w_scale, bias)
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

MM_OP = "autoquant::int8_dyn_mm"
QUANT_OP = "autoquant::quantize_per_token_int8"
_KERNEL_MODULE = "_int8_dyn_kernel"
# Lower bound of a per-token scale: keeps all-zero rows finite (q = 0) without touching real data
# (a row needs amax < 1.27e-10 to be affected). Exported so plain-PyTorch quantizers can match.
PER_TOKEN_EPS = 1e-12


# ---------------------------------------------------------------------------------------- reference
def quantize_per_token_int8_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Plain PyTorch per-row symmetric int8 quantization: the quantize_per_token_int8 contract."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    # Divide by a tensor, not by the Python number 127: CUDA turns tensor / scalar into a multiply
    # by the reciprocal, which can be one ulp off the IEEE division the kernel (div_rn) performs.
    scale = (amax / torch.full_like(amax, 127.0)).clamp_min(PER_TOKEN_EPS)
    q = torch.round(xf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_dyn_mm_reference(
    x_int8: Tensor,
    x_scale: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Plain PyTorch: exact integer product (float64 holds it exactly, on CPU and CUDA), then
    the float32 rescale in the kernel's order."""
    acc = (x_int8.double() @ w_int8.double().T).float()
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_dynamic_linear_reference(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    q, s = quantize_per_token_int8_reference(x)
    return int8_dyn_mm_reference(q, s, w_int8, w_scale, bias, x.dtype)


# ---------------------------------------------------------------------------------------- quantize
def _launch_quantize(x: Tensor, q: Tensor, scale: Tensor) -> None:
    kernels = load_kernels(_KERNEL_MODULE, QUANT_OP)
    check_launchable(kernels.QUANTIZE_KERNEL, x.device, QUANT_OP)
    import triton

    m, k = x.shape
    interpreted = is_interpreted(kernels.QUANTIZE_KERNEL)
    # 1024 float32 values are 8 per thread at the default 4 warps; longer rows loop.
    block_k = min(triton.next_power_of_2(k), 64 if interpreted else 1024)
    launcher(kernels.QUANTIZE_KERNEL, x.device)[(m,)](
        x, q, scale, k, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        EPS=PER_TOKEN_EPS, BLOCK_K=block_k,
    )  # fmt: skip


def _empty_quantized(x: Tensor) -> tuple[Tensor, Tensor]:
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((x.shape[0],), dtype=torch.float32, device=x.device),
    )


@torch.library.custom_op("autoquant::_quantize_per_token_int8_opaque", mutates_args=())
def _quantize_opaque(x: Tensor) -> tuple[Tensor, Tensor]:
    q, scale = _empty_quantized(x)
    _launch_quantize(x, q, scale)
    return q, scale


@_quantize_opaque.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return _empty_quantized(x)


@define_op(QUANT_OP)
def _quantize_op(x: Tensor) -> tuple[Tensor, Tensor]:
    _checks.check_matrix(QUANT_OP, "x", x, _checks.FLOAT_DTYPES, "[M, K]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        q, scale = _empty_quantized(x)
        # An empty row has amax 0, so its scale is the floor; q has no elements to write.
        return q, scale.fill_(PER_TOKEN_EPS)
    if not launches_inline(_KERNEL_MODULE, QUANT_OP, x.device):
        return torch.ops.autoquant._quantize_per_token_int8_opaque(x)
    q, scale = _empty_quantized(x)
    _launch_quantize(x, q, scale)
    return q, scale


# ---------------------------------------------------------------------------------------- matmul op
def _check_mm(
    x_int8: Tensor,
    x_scale: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[int, int, int]:
    _checks.check_matrix(MM_OP, "x_int8", x_int8, (torch.int8,), "[M, K]")
    _checks.check_matrix(MM_OP, "w_int8", w_int8, (torch.int8,), "[N, K]")
    m, k = x_int8.shape
    n = w_int8.shape[0]
    _checks.check_same_k(MM_OP, "x_int8", k, "w_int8", w_int8.shape[1])
    _checks.check_vector(MM_OP, "x_scale", x_scale, m, (torch.float32,))
    _checks.check_vector(MM_OP, "w_scale", w_scale, n, (torch.float32,))
    _checks.check_bias(MM_OP, bias, n)
    _checks.check_out_dtype(MM_OP, out_dtype)
    _checks.check_devices(
        MM_OP,
        {"x_int8": x_int8, "x_scale": x_scale, "w_int8": w_int8, "w_scale": w_scale, "bias": bias},
    )
    return m, n, k


def _launch_mm(
    x_int8: Tensor,
    x_scale: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out: Tensor,
) -> None:
    kernels = load_kernels(_KERNEL_MODULE, MM_OP)
    check_launchable(kernels.KERNEL, x_int8.device, MM_OP)
    from ._triton_common import grid_2d

    m, k = x_int8.shape
    n = w_int8.shape[0]
    launcher(kernels.KERNEL, x_int8.device)[grid_2d(m, n)](
        x_int8, x_scale, w_int8, w_scale, w_scale if bias is None else bias, out,
        m, n, k, m_bucket(m),
        x_int8.stride(0), x_int8.stride(1), w_int8.stride(0), w_int8.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
    )  # fmt: skip


def _empty_out(x_int8: Tensor, w_int8: Tensor, out_dtype: torch.dtype) -> Tensor:
    return torch.empty((x_int8.shape[0], w_int8.shape[0]), dtype=out_dtype, device=x_int8.device)


@torch.library.custom_op("autoquant::_int8_dyn_mm_opaque", mutates_args=())
def _int8_dyn_mm_opaque(
    x_int8: Tensor,
    x_scale: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    out = _empty_out(x_int8, w_int8, out_dtype)
    _launch_mm(x_int8, x_scale, w_int8, w_scale, bias, out)
    return out


@_int8_dyn_mm_opaque.register_fake
def _(
    x_int8: Tensor,
    x_scale: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return _empty_out(x_int8, w_int8, out_dtype)


@define_op(MM_OP)
def _int8_dyn_mm_op(
    x_int8: Tensor,
    x_scale: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    m, n, _ = _check_mm(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)
    if m == 0 or n == 0:  # an empty output: nothing to launch
        return _empty_out(x_int8, w_int8, out_dtype)
    x_scale = x_scale.contiguous()
    w_scale = w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not launches_inline(_KERNEL_MODULE, MM_OP, x_int8.device):
        return torch.ops.autoquant._int8_dyn_mm_opaque(
            x_int8, x_scale, w_int8, w_scale, bias, out_dtype
        )
    out = _empty_out(x_int8, w_int8, out_dtype)
    _launch_mm(x_int8, x_scale, w_int8, w_scale, bias, out)
    return out


# ---------------------------------------------------------------------------------------- public AP
def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization: x [M, K] -> (x_int8 [M, K], x_scale [M] float32)."""
    require_triton("quantize_per_token_int8")
    q, scale = torch.ops.autoquant.quantize_per_token_int8(x)
    return q, scale


def int8_dyn_mm(
    x_int8: Tensor,
    x_scale: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    out_dtype: torch.dtype,
) -> Tensor:
    """(x_int8 @ w_int8.T) * x_scale[:, None] * w_scale[None, :] + bias, as ``out_dtype`` [M, N]."""
    require_triton("int8_dyn_mm")
    return torch.ops.autoquant.int8_dyn_mm(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)


def int8_dynamic_linear(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Quantize ``x`` [M, K] per token, then int8_dyn_mm with out_dtype = x.dtype."""
    require_triton("int8_dynamic_linear")
    q, scale = torch.ops.autoquant.quantize_per_token_int8(x)
    return torch.ops.autoquant.int8_dyn_mm(q, scale, w_int8, w_scale, bias, x.dtype)
