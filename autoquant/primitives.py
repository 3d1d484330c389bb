"""Pure-PyTorch quantize / dequantize / pack math shared by the candidate families and the tests.

Every function here is plain tensor code that runs on any device. The kernels' exact conventions
(rounding, scale dtypes, zero-point placement) are pinned down here once, so a family's
``reference()`` and its ``quantize()`` cannot drift apart.

Conventions used throughout:

- Quantization math runs in float32 whatever the input dtype (a bf16 weight is upcast first), so a
  bf16 and an fp32 copy of the same weight give the same integers.
- Rounding is ``torch.round``: round half to even, which is what the vectorised CPU kernels
  (``_mm256_cvtps_epi32`` / ``nearbyint``) and CUDA's ``rint`` do.
- Weight scales are clamped from below by ``SCALE_EPS`` (float32 machine epsilon) so an all-zero
  row gives q = 0 with a finite, positive scale that survives a cast to fp16 (int4 qparams may be
  stored in fp16). Activation scales (per token) and fp8 row scales use ``ACT_EPS`` = 1e-12, the
  floor ``autoquant.kernels`` uses, so the Triton kernels and the torch kernels quantize alike.

>>> w = torch.randn(4, 64)
>>> q, s = int8_weight_per_channel(w)
>>> q.dtype, s.shape, bool(sqnr(w, dequant_int8_per_channel(q, s)) > 35)
(torch.int8, torch.Size([4]), True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ACT_EPS",
    "FP8_DTYPE",
    "FP8_MAX",
    "INT4_MID",
    "INT4_QMAX",
    "INT8_QMAX",
    "SCALE_EPS",
    "dequant_fp8_per_row",
    "dequant_int8_per_channel",
    "fp8_per_row",
    "fp8_weight_per_row",
    "int4_grouped_asym",
    "int4_grouped_dequant",
    "int8_act_per_token",
    "int8_weight_per_channel",
    "pack_int4_lo_first",
    "row_blocks",
    "smoothing_inv",
    "sqnr",
    "swap_nibbles",
    "uint8_act_per_tensor",
    "uint8_act_per_tensor_qparams",
    "uint8_act_per_token_offset",
    "unpack_int4_lo_first",
]

# float32 eps (1.19e-7): the floor for every scale. Small enough never to bind on real weights,
# large enough that 1/scale is finite and that the scale survives a cast to fp16 (as a subnormal).
SCALE_EPS = torch.finfo(torch.float32).eps
# Per-token / fp8 row floor, equal to autoquant.kernels' PER_TOKEN_EPS and ROWWISE_EPS: touches
# only rows with amax < 1.3e-10, keeps them finite (q = 0).
ACT_EPS = 1e-12
INT8_QMAX = 127  # symmetric int8 uses -127..127 (not -128) so the grid is symmetric about zero
INT4_QMAX = 15  # unsigned int4 codes 0..15
INT4_MID = 8  # tinygemm subtracts 8 from every code before scaling (see int4_grouped_asym)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; e4m3fn has no inf, overflow becomes NaN, so clamp


def sqnr(ref: Tensor, actual: Tensor) -> float:
    """Signal-to-quantization-noise ratio of `actual` against `ref` in dB (float64 math).

    inf when identical; nan when `actual` is not finite.
    """
    r = ref.detach().double()
    err = (r - actual.detach().double()).pow(2).sum().item()
    if not math.isfinite(err):
        return math.nan
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(max(r.pow(2).sum().item(), 1e-300) / err)


# ---- int8, symmetric per output channel (weights) -------------------------------------------------
# Weights are quantized a block of rows at a time. Every row's codes and scale depend on that row
# alone, so the result is the same bit for bit, while the float32 temporaries (the cast, |w|, w /
# scale) stay under a few times the block instead of growing with the weight: for a 4096 x 14336
# bf16 weight they would be ~0.7 GiB, more than the weight and its quantized copy together. On a
# GPU the blocks are larger: each costs a few kernel launches, and its memory is plentiful.
ROW_BLOCK_BYTES = 2 << 20
ROW_BLOCK_BYTES_CUDA = 64 << 20


def row_blocks(n: int, k: int, device: torch.device | None = None) -> list[slice]:
    """Slices of consecutive rows of an [n, k] weight, each about ROW_BLOCK_BYTES (CPU) or
    ROW_BLOCK_BYTES_CUDA in float32."""
    block = ROW_BLOCK_BYTES_CUDA if device is not None and device.type == "cuda" else ROW_BLOCK_BYTES
    rows = max(1, block // (4 * max(k, 1)))
    return [slice(r, min(n, r + rows)) for r in range(0, n, rows)]


def int8_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-row int8: ``scale[n] = max|w[n]| / 127``, ``q = round(w / scale)``.

    Returns q int8 [N, K] (values in -127..127) and scale float32 [N]. Scales stay float32 in the
    packed state; a kernel that wants them in the activation dtype casts them (and its reference
    mirrors that cast). Computed by blocks of rows (see ROW_BLOCK_BYTES).
    """
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for rows in row_blocks(n, k, w.device):
        wf = w[rows].float()
        s = (wf.abs().amax(dim=1) / wf.new_full((1,), INT8_QMAX)).clamp_min(SCALE_EPS)
        q[rows] = torch.div(wf, s[:, None]).round_().clamp_(-INT8_QMAX, INT8_QMAX)
        scale[rows] = s
    return q, scale


def dequant_int8_per_channel(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale[:, None]`` in float32, then cast to `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


# ---- per-input-channel smoothing of activation outliers (SmoothQuant) ------------------------------
# The factors are clamped to [1, SMOOTH_MAX]: outlier channels are scaled down, and no channel is
# ever scaled UP (s < 1), because a channel quiet during calibration may not be quiet later: an
# amplified channel with an outlier on new inputs would set the per-tensor activation scale alone.
# Measured on held-out MiniLM sentences: uniform alpha=0.75 cosine 0.99309 / 0.98867 (mean / min)
# with s in [1e-4, 1e4], 0.99627 / 0.99278 with s >= 1 (benchmarks/results/smooth_minilm_cpu.txt
# is the latter). A channel whose recorded absmax is 0 keeps s = 1 (no information), a dead weight
# column (absmax 0) takes SMOOTH_MAX.
SMOOTH_MIN, SMOOTH_MAX = 1.0, 1e4


def smoothing_inv(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """The inverse smoothing factors ``1 / s`` (float32 [K]) for `weight` [N, K] whose activations
    have per-input-channel absmax `act_absmax` [K]: ``s_k = a_k^alpha / w_k^(1 - alpha)`` with
    ``w_k = max_n |W[n, k]|``, clamped to [SMOOTH_MIN, SMOOTH_MAX]. ``x * inv`` then has its outlier
    channels scaled down and ``W / inv`` (columns) takes them up, with ``(x * inv) @ (W / inv)^T ==
    x @ W^T`` in exact arithmetic. Computed by blocks of rows, as the weight quantizers are.

    >>> inv = smoothing_inv(torch.tensor([8.0, 0.5, 0.0]), torch.ones(2, 3), 0.5)
    >>> inv.tolist()
    [0.3535533845424652, 1.0, 1.0]
    """
    n, k = weight.shape
    if act_absmax.shape != (k,):
        raise ValueError(f"act_absmax has shape {tuple(act_absmax.shape)}, the weight's K is {k}: pass the "
                         "per-input-channel absmax of this layer's activations (float32 [K])")
    w_max = torch.zeros(k, dtype=torch.float32, device=weight.device)
    for rows in row_blocks(n, k, weight.device):
        torch.maximum(w_max, weight[rows].float().abs().amax(dim=0), out=w_max)
    a = act_absmax.to(device=weight.device, dtype=torch.float32)
    s = a.pow(alpha) / w_max.pow(1.0 - alpha)  # w_max = 0: inf (clamped), a = 0 with w = 0: nan
    s = torch.where(w_max > 0, s, torch.full_like(s, SMOOTH_MAX))
    s = torch.where((a > 0) & torch.isfinite(a), s, torch.ones_like(s))
    return torch.reciprocal(s.clamp(SMOOTH_MIN, SMOOTH_MAX)).contiguous()


# ---- int8 activations -----------------------------------------------------------------------------
def int8_act_per_token(x: Tensor, qmax: int = INT8_QMAX) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (per-token) int8 of a 2-D activation [M, K].

    ``scale[m] = max(max|x[m]| / qmax, 1e-12)`` (float32, [M]), ``q = round(x / scale)`` in
    -qmax..qmax, IEEE float32 division (by a tensor: CUDA turns ``/ number`` into a multiply by the
    reciprocal, one ulp off in ~4.5% of scales): with qmax=127 this is bit for bit
    ``autoquant.kernels.quantize_per_token_int8``. `qmax` < 127 serves kernels whose int8 dot
    saturates on full-range inputs (oneDNN on AVX2 without VNNI: see int8_dynamic.py).
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=1) / xf.new_full((1,), qmax)).clamp_min(ACT_EPS)
    q = torch.round(xf / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def uint8_act_per_token_offset(x: Tensor, qmax: int, offset: int) -> tuple[Tensor, Tensor]:
    """:func:`int8_act_per_token` codes shifted into uint8: ``round(x / scale) + offset``.

    With qmax=63 and offset=64 the codes lie in 1..127: per-token symmetric quantization fed to a
    kernel that takes one (uint8) zero point per tensor, as onednn.qlinear_pointwise does.
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=1) / xf.new_full((1,), qmax)).clamp_min(ACT_EPS)
    q = torch.round(xf / scale[:, None]).clamp_(-qmax, qmax).add_(offset).to(torch.uint8)
    return q, scale


# Below this scale fbgemm's ChooseQuantizationParams widens the range (quant_utils.h).
_FBGEMM_SMALL_SCALE = 6.1e-5


def uint8_act_per_tensor_qparams(x: Tensor, qmax: int) -> tuple[float, int]:
    """Scale and zero point of PyTorch's dynamic per-tensor uint8 quantization (codes 0..qmax).

    Mirrors ``quant_utils::ChooseQuantizationParams`` as ``quantized::linear_dynamic`` calls it:
    the range is widened to contain 0, scale = (max - min) / qmax computed in double and stored as
    float32, a zero or overflowing scale becomes 0.1, scales below 6.1e-5 are widened, and the zero
    point is taken from whichever end of the range has the smaller rounding error, then clamped and
    rounded to nearest even. (reduce_range=True is qmax=127.) Reads two scalars back to the host.
    """
    lo = min(float(x.min()), 0.0)
    hi = max(float(x.max()), 0.0)
    scale = float(torch.tensor((hi - lo) / qmax, dtype=torch.float32))
    # 1/scale overflows float32 (where fbgemm computes it) for denormal scales: those become 0.1 too
    if scale == 0.0 or 1.0 / scale > torch.finfo(torch.float32).max:
        scale = float(torch.tensor(0.1, dtype=torch.float32))
    if scale < _FBGEMM_SMALL_SCALE:
        org = scale
        scale = _FBGEMM_SMALL_SCALE
        if lo == 0.0:
            hi = _FBGEMM_SMALL_SCALE * qmax
        elif hi == 0.0:
            lo = -_FBGEMM_SMALL_SCALE * qmax
        else:
            lo, hi = lo * (scale / org), hi * (scale / org)
        scale = float(torch.tensor(scale, dtype=torch.float32))
    zp_from_min = 0 - lo / scale
    zp_from_max = qmax - hi / scale
    err_min = 0 - abs(lo / scale)
    err_max = qmax - abs(hi / scale)
    zp = zp_from_min if err_min < err_max else zp_from_max
    zp_int = 0 if zp < 0 else qmax if zp > qmax else round(zp)  # Python round: half to even
    return scale, zp_int


def uint8_act_per_tensor(x: Tensor, qmax: int) -> tuple[Tensor, float, int]:
    """Per-tensor asymmetric uint8 (codes 0..qmax): ``q = clamp(round(x / scale) + zp, 0, qmax)``.

    fbgemm multiplies by a float32 ``1 / scale`` rather than dividing; ties can land one code apart
    from this division in rare elements, which the tests' tolerances allow for.
    """
    scale, zp = uint8_act_per_tensor_qparams(x, qmax)
    q = (torch.round(x.float() * (1.0 / scale)) + zp).clamp_(0, qmax).to(torch.uint8)
    return q, scale, zp


# ---- int4, grouped asymmetric (tinygemm convention) ----------------------------------------------
def int4_grouped_asym(w: Tensor, group_size: int, qparam_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped asymmetric int4 along K in the tinygemm convention.

    For each output row n and group g of `group_size` consecutive inputs::

        lo, hi = min(w[n, g]), max(w[n, g])
        scale  = max((hi - lo) / 15, eps)                  # rounded to `qparam_dtype`
        zero   = lo + 8 * scale                            # rounded to `qparam_dtype`
        q      = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)
        w_hat  = (q - 8) * scale + zero

    `zero` is a float offset at the centre of the grid (tinygemm computes ``(q - 8) * s + z``;
    verified numerically against ``_weight_int4pack_mm_for_cpu``), not an integer zero point. The
    range is the group's own [min, max] (not widened to contain 0) for the finest grid. q is
    computed from the *rounded* scale and zero so the codes fit the qparams the kernel will see.

    Returns q int32 [N, K] (0..15), scales and zeros of `qparam_dtype`, both [K // G, N] (the
    transposed layout tinygemm's ``scales_and_zeros`` [K // G, N, 2] is stacked from).
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4 grouping: K={k} is not a multiple of group_size={group_size}")
    wg = w.float().reshape(n, k // group_size, group_size)
    lo = wg.amin(dim=2)
    hi = wg.amax(dim=2)
    scale = ((hi - lo) / wg.new_full((1,), INT4_QMAX)).clamp_min(SCALE_EPS).to(qparam_dtype)
    zero = (lo + INT4_MID * scale.float()).to(qparam_dtype)
    s = scale.float()[..., None]
    base = zero.float()[..., None] - INT4_MID * s
    q = torch.round((wg - base) / s).clamp_(0, INT4_QMAX).to(torch.int32).reshape(n, k)
    return q, scale.t().contiguous(), zero.t().contiguous()


def int4_grouped_dequant(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """``(q - 8) * scale + zero`` in float32 for q [N, K] and scales / zeros [K // G, N]."""
    s = scales.float().t().repeat_interleave(group_size, dim=1)
    z = zeros.float().t().repeat_interleave(group_size, dim=1)
    return (q.float() - INT4_MID) * s + z


def pack_int4_lo_first(q: Tensor) -> Tensor:
    """uint8 [N, K // 2] with ``byte[n, j] = q[n, 2j] | q[n, 2j + 1] << 4`` (even k in the LOW nibble).

    The portable int4 layout of the packed state: the byte layout of ``autoquant.kernels.pack_int4``
    (its Triton kernel reads it as is). ISA- or GPU-specific layouts (tinygemm) are derived from it
    in ``prepare``.
    """
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4_lo_first(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4_lo_first`: int32 [N, K] codes 0..15."""
    p = packed.to(torch.int32)
    return torch.stack([p & 0xF, p >> 4], dim=2).reshape(packed.shape[0], -1)


def swap_nibbles(packed: Tensor) -> Tensor:
    """Low-first bytes to high-first (and back): the uint8 [N, K // 2] input layout CUDA
    ``_convert_weight_to_int4pack`` expects since torch 2.5 (even k in the HIGH nibble)."""
    return ((packed >> 4) | (packed << 4)).to(torch.uint8)


# ---- fp8 e4m3, per row ----------------------------------------------------------------------------
def fp8_per_row(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row float8_e4m3fn: ``scale[r] = max(max|t[r]| / 448, 1e-12)`` (float32, [R]).

    The division runs in float32 and is clamped to +-448 before the cast, since e4m3fn has no inf
    and an overflowing cast would give NaN; the cast rounds to nearest even. The scale is an IEEE
    division by a tensor, not by a Python number: CUDA turns ``/ number`` into a multiply by the
    reciprocal, one ulp off in some scales, which moved every exact-tie code of those rows (fp16
    weights on an H200: 49.8 dB against the format's definition instead of >= 55). Bit for bit
    ``autoquant.kernels.quantize_rowwise_fp8_reference``; used for weights and activations alike.
    """
    tf = t.float()
    scale = (tf.abs().amax(dim=1) / tf.new_full((1,), FP8_MAX)).clamp_min(ACT_EPS)
    q = (tf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_weight_per_row(w: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`fp8_per_row` of a weight [N, K], by blocks of rows (see ROW_BLOCK_BYTES): the same
    tensors bit for bit, with bounded temporaries."""
    n, k = w.shape
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for rows in row_blocks(n, k, w.device):
        q[rows], scale[rows] = fp8_per_row(w[rows])
    return q, scale


def dequant_fp8_per_row(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale[:, None]`` in float32, then cast to `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)
