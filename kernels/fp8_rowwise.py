"""float8 e4m3 row-wise scaled matmul: ``autoquant::fp8_rowwise_mm`` (a Triton alternative to
``torch._scaled_mm`` with row-wise scales).

Contract::

    fp8_rowwise_mm(x_fp8 [M, K] float8_e4m3fn, x_scale [M] float32,
                   w_fp8 [N, K] float8_e4m3fn, w_scale [N] float32,
                   bias [N] float | None, out_dtype float32|bfloat16|float16) -> [M, N] out_dtype
    y = float32(x_fp8 @ w_fp8.T) * x_scale[:, None] * w_scale[None, :] + bias

Scales are dequantization scales (x ~= x_fp8 * x_scale), as in torch._scaled_mm. Accumulation is in
float32 on fp8 tensor cores, which need CUDA compute capability 8.9 or newer (Ada, Hopper); older
GPUs get a RuntimeError. On CPU the Triton interpreter (TRITON_INTERPRET=1) runs it by widening fp8
to float16 in numpy, which is exact for e4m3 values.

``quantize_rowwise_fp8_reference`` is the matching plain-PyTorch per-row quantizer (amax -> 448).
"""

import torch
from torch import Tensor

from . import _checks
from ._registry import (
    check_launchable,
    define_op,
    launcher,
    launches_inline,
    load_kernels,
    m_bucket,
    require_triton,
)

OP = "autoquant::fp8_rowwise_mm"
_KERNEL_MODULE = "_fp8_kernel"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Scale floor for all-zero rows, as in int8_dynamic.PER_TOKEN_EPS.
ROWWISE_EPS = 1e-12
MIN_CAPABILITY = (8, 9)


def quantize_rowwise_fp8_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric e4m3 quantization of a 2-D float tensor -> (x_fp8, scale [rows] f32)."""
    xf = x.float()
    # A tensor divisor: CUDA computes `/ number` as a multiply by the reciprocal (one ulp off).
    scale = (xf.abs().amax(dim=1) / xf.new_full((1,), FP8_MAX)).clamp_min(ROWWISE_EPS)
    return (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_rowwise_mm_reference(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Plain PyTorch: widen to float32 (exact for e4m3), matmul, rescale in the kernel's order."""
    y = (x_fp8.float() @ w_fp8.float().T) * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _check(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[int, int, int]:
    _checks.check_matrix(OP, "x_fp8", x_fp8, (FP8_DTYPE,), "[M, K]")
    _checks.check_matrix(OP, "w_fp8", w_fp8, (FP8_DTYPE,), "[N, K]")
    m, k = x_fp8.shape
    n = w_fp8.shape[0]
    _checks.check_same_k(OP, "x_fp8", k, "w_fp8", w_fp8.shape[1])
    _checks.check_vector(OP, "x_scale", x_scale, m, (torch.float32,))
    _checks.check_vector(OP, "w_scale", w_scale, n, (torch.float32,))
    _checks.check_bias(OP, bias, n)
    _checks.check_out_dtype(OP, out_dtype)
    _checks.check_devices(
        OP, {"x_fp8": x_fp8, "x_scale": x_scale, "w_fp8": w_fp8, "w_scale": w_scale, "bias": bias}
    )
    return m, n, k


def _check_capability(device: torch.device) -> None:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            raise RuntimeError(
                f"{OP}: fp8 tensor cores need CUDA compute capability >= 8.9, "
                f"this GPU has {cap[0]}.{cap[1]}"
            )


def _launch(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out: Tensor,
) -> None:
    kernels = load_kernels(_KERNEL_MODULE, OP)
    check_launchable(kernels.KERNEL, x_fp8.device, OP)
    _check_capability(x_fp8.device)
    from ._triton_common import grid_2d

    m, k = x_fp8.shape
    n = w_fp8.shape[0]
    launcher(kernels.KERNEL, x_fp8.device)[grid_2d(m, n)](
        x_fp8, x_scale, w_fp8, w_scale, w_scale if bias is None else bias, out,
        m, n, k, m_bucket(m),
        x_fp8.stride(0), x_fp8.stride(1), w_fp8.stride(0), w_fp8.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
    )  # fmt: skip


def _empty_out(x_fp8: Tensor, w_fp8: Tensor, out_dtype: torch.dtype) -> Tensor:
    return torch.empty((x_fp8.shape[0], w_fp8.shape[0]), dtype=out_dtype, device=x_fp8.device)


@torch.library.custom_op("autoquant::_fp8_rowwise_mm_opaque", mutates_args=())
def _fp8_rowwise_mm_opaque(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    out = _empty_out(x_fp8, w_fp8, out_dtype)
    _launch(x_fp8, x_scale, w_fp8, w_scale, bias, out)
    return out


@_fp8_rowwise_mm_opaque.register_fake
def _(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return _empty_out(x_fp8, w_fp8, out_dtype)


@define_op(OP)
def _fp8_rowwise_mm_op(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    m, n, _ = _check(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
    if m == 0 or n == 0:  # an empty output: nothing to launch
        return _empty_out(x_fp8, w_fp8, out_dtype)
    x_scale = x_scale.contiguous()
    w_scale = w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not launches_inline(_KERNEL_MODULE, OP, x_fp8.device):
        return torch.ops.autoquant._fp8_rowwise_mm_opaque(
            x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype
        )
    out = _empty_out(x_fp8, w_fp8, out_dtype)
    _launch(x_fp8, x_scale, w_fp8, w_scale, bias, out)
    return out


def fp8_rowwise_mm(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    out_dtype: torch.dtype,
) -> Tensor:
    """(x_fp8 @ w_fp8.T) * x_scale[:, None] * w_scale[None, :] + bias as ``out_dtype`` [M, N]."""
    require_triton("fp8_rowwise_mm")
    return torch.ops.autoquant.fp8_rowwise_mm(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
