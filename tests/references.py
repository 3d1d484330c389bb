"""Independent float64 references for every weight and activation format, written from each format's
definition (the module docstrings of autoquant.candidates), sharing no code with autoquant.

Why a second implementation: a kernel compared with a ``reference()`` built from its own helpers
cannot show an error the two share (a scale off by 3% on both sides passes). Everything here is
plain torch in float64; the only values taken from the formats are their constants (127, 448, 8).

Each quantizer returns the integer (or fp8) codes and the qparams as the format stores them, so the
tests can compare codes and scales, and the dequantized weight / activation in float64 for the
matmul references.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "E4M3_MAX",
    "WEIGHT_SCALE_FLOOR",
    "ACT_SCALE_FLOOR",
    "FLOOR_DB",
    "GAIN_TOL",
    "e4m3_decode",
    "e4m3_near_tie",
    "expected_output",
    "floor_db",
    "gain_tol",
    "e4m3_encode",
    "fp8_rows",
    "gain",
    "int4_grouped",
    "int4_unpack",
    "int8_rows",
    "linear64",
    "near_tie",
    "rounding_dtype",
    "smooth_inv",
    "snr_db",
    "to_dtype64",
    "uint8_tensor_asym",
]

E4M3_MAX = 448.0
# Scale floors the formats document: weights use float32 epsilon, activations and fp8 rows 1e-12.
WEIGHT_SCALE_FLOOR = 2.0 ** -23
ACT_SCALE_FLOOR = 1e-12


def to_dtype64(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` rounded to `dtype` (round to nearest even, as a cast does), returned in float64."""
    return t.to(dtype).double()


def near_tie(quotient: Tensor, tol: float = 1e-5) -> Tensor:
    """Where round(quotient) is decided by less than `tol`: the float32 division a kernel does and
    this float64 division may round to neighbouring codes there, and nowhere else."""
    frac = quotient - torch.floor(quotient)
    return (frac - 0.5).abs() < tol * quotient.abs().clamp_min(1.0)


# ---- symmetric int8 rows (weights per output channel, activations per token) ----------------------
def int8_rows(t: Tensor, qmax: int = 127, floor: float = WEIGHT_SCALE_FLOOR) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric per-row int8: ``scale = max(max|t[r]| / qmax, floor)`` stored as float32,
    ``code = round_half_even(t / scale)`` in [-qmax, qmax]. Returns (codes int64, scale float64
    holding the float32 value, quotient t / scale in float64 for tie checks)."""
    t64 = t.double()
    scale = (t64.abs().amax(dim=1) / qmax).clamp_min(floor).float().double()
    quotient = t64 / scale[:, None]
    codes = torch.round(quotient).clamp(-qmax, qmax).long()
    return codes, scale, quotient


# ---- fp8 e4m3fn ---------------------------------------------------------------------------------------
def e4m3_decode(bits: Tensor) -> Tensor:
    """float64 value of each float8_e4m3fn bit pattern (uint8): sign, 4 exponent bits with bias 7,
    3 mantissa bits; exponent 0 is subnormal (m / 8 * 2^-6); S.1111.111 is NaN; there is no inf."""
    b = bits.long()
    sign = torch.where(b >> 7 == 1, -1.0, 1.0).double()
    e = (b >> 3) & 0xF
    m = (b & 0x7).double()
    normal = (1.0 + m / 8.0) * torch.pow(2.0, (e - 7).double())
    sub = m / 8.0 * 2.0 ** -6
    val = sign * torch.where(e == 0, sub, normal)
    return torch.where((e == 15) & (b & 0x7 == 7), torch.full_like(val, float("nan")), val)


_POSITIVE_E4M3 = None


def _positive_grid() -> Tensor:
    global _POSITIVE_E4M3
    if _POSITIVE_E4M3 is None:
        _POSITIVE_E4M3 = e4m3_decode(torch.arange(0, 127))  # 0x00..0x7E: every finite value >= 0, increasing
    return _POSITIVE_E4M3


def e4m3_encode(v: Tensor) -> Tensor:
    """uint8 e4m3fn bit patterns of float64 `v` (finite, |v| <= 448): round to the nearest value,
    ties to the even pattern (even mantissa)."""
    grid = _positive_grid()
    mag = v.double().abs()
    hi = torch.searchsorted(grid, mag).clamp(max=grid.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    pick = torch.where(mag == grid[hi], hi, pick)
    sign = torch.signbit(v).long() << 7  # the sign survives rounding to zero (-0 is 0x80)
    return (pick | sign).to(torch.uint8)


def fp8_rows(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row fp8: ``scale = max(max|t[r]| / 448, 1e-12)`` stored as float32, codes =
    e4m3(t / scale) (saturated at 448). Returns (bits uint8, scale float64, t / scale float64)."""
    t64 = t.double()
    scale = (t64.abs().amax(dim=1) / E4M3_MAX).clamp_min(ACT_SCALE_FLOOR).float().double()
    quotient = (t64 / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX)
    return e4m3_encode(quotient), scale, quotient


def e4m3_near_tie(quotient: Tensor, tol: float = 1e-5) -> Tensor:
    """Where the quotient sits within `tol` (relative) of a midpoint between two e4m3 values."""
    grid = _positive_grid()
    mids = (grid[1:] + grid[:-1]) / 2
    mag = quotient.abs()
    idx = torch.searchsorted(mids, mag).clamp(max=mids.numel() - 1)
    near = (mag - mids[idx]).abs()
    near_lo = (mag - mids[(idx - 1).clamp(min=0)]).abs()
    return torch.minimum(near, near_lo) <= tol * mag.clamp_min(2.0 ** -9)


# ---- uint8 per tensor, asymmetric (fbgemm dynamic quantization) ----------------------------------
def uint8_tensor_asym(x: Tensor, qmax: int) -> Tensor:
    """Dequantized activation of a per-tensor asymmetric uint8 quantization with codes 0..qmax and
    qparams from torch's own chooser (``torch._choose_qparams_per_tensor``, reduce_range for qmax
    127): ``(clamp(round(x / s) + zp, 0, qmax) - zp) * s`` in float64."""
    scale, zp = torch._choose_qparams_per_tensor(x.float(), qmax == 127)
    codes = (torch.round(x.double() / scale) + zp).clamp(0, qmax)
    return (codes - zp) * scale


# ---- int4 grouped asymmetric (tinygemm convention) -----------------------------------------------
def int4_unpack(packed: Tensor) -> Tensor:
    """int64 codes [N, K] of a uint8 [N, K // 2] whose LOW nibble holds the even k."""
    p = packed.long()
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.long)
    out[:, 0::2] = p & 0xF
    out[:, 1::2] = p >> 4
    return out


def int4_grouped(w: Tensor, group: int, qdtype: torch.dtype) -> dict[str, Tensor]:
    """Grouped asymmetric int4 of w [N, K] per (row, group of `group` inputs):
    ``scale = max((max - min) / 15, eps)`` and ``zero = min + 8 * scale``, both rounded to `qdtype`;
    ``code = clamp(round((w - zero) / scale) + 8, 0, 15)``; ``w_hat = (code - 8) * scale + zero``.
    Returns float64 scale / zero [N, K // group], codes [N, K], w_hat [N, K], and the quotient."""
    n, k = w.shape
    wg = w.double().reshape(n, k // group, group)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scale = to_dtype64(((hi - lo) / 15).clamp_min(WEIGHT_SCALE_FLOOR), qdtype)
    zero = to_dtype64(lo + 8 * scale, qdtype)
    quotient = (wg - zero[..., None]) / scale[..., None] + 8
    codes = torch.round(quotient).clamp(0, 15)
    w_hat = (codes - 8) * scale[..., None] + zero[..., None]
    return {"scale": scale, "zero": zero, "codes": codes.long().reshape(n, k),
            "w_hat": w_hat.reshape(n, k), "quotient": quotient.reshape(n, k)}


# ---- matmul and comparison ----------------------------------------------------------------------------
def linear64(x_hat: Tensor, w_hat: Tensor, bias: Tensor | None) -> Tensor:
    """``x_hat @ w_hat.T + bias`` in float64."""
    y = x_hat.double() @ w_hat.double().T
    return y if bias is None else y + bias.double()


def snr_db(ref: Tensor, actual: Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - actual)^2) in float64: inf when equal, nan when `actual` is
    not finite (so any comparison with a floor fails)."""
    r, a = ref.double(), actual.double()
    err = float(((r - a) ** 2).sum())
    if err != err or err == float("inf"):
        return float("nan")
    return float("inf") if err == 0 else 10 * math.log10(max(float((r * r).sum()), 1e-300) / err)


def gain(ref: Tensor, actual: Tensor) -> float:
    """Least-squares gain g of `actual` ~ g * `ref`: 1.0 without a systematic scale error."""
    r, a = ref.double().flatten(), actual.double().flatten()
    return float((r @ a) / (r @ r))


# ---- what each kernel computes, from the definitions ----------------------------------------------------
# Kernel output vs the definition, in dB by the narrowest dtype the output passes through. What
# separates them: the output's rounding (bf16 ~52 dB, fp16 ~68 dB on the tests' shapes), a kernel
# reading its scales in the activation dtype (bf16 scales: ~2^-9 per channel), and codes a float32
# division rounds to the other side of a tie. float32 measures >= 128 dB on CPU.
FLOOR_DB = {torch.float32: 100.0, torch.bfloat16: 40.0, torch.float16: 55.0}
# |gain - 1| allowed: rounding noise averages out; a systematic error does not.
GAIN_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}
# CUDA float32: Triton's tl.dot multiplies float32 tiles in TF32 (10-bit mantissa) by default, so
# float32 outputs are held to a TF32-class floor there (not measured yet: no GPU run so far).
CUDA_FP32_FLOOR_DB = 55.0
CUDA_FP32_GAIN_TOL = 1e-3


def floor_db(device_type: str, dtype: torch.dtype) -> float:
    return CUDA_FP32_FLOOR_DB if device_type == "cuda" and dtype == torch.float32 else FLOOR_DB[dtype]


def gain_tol(device_type: str, dtype: torch.dtype) -> float:
    return CUDA_FP32_GAIN_TOL if device_type == "cuda" and dtype == torch.float32 else GAIN_TOL[dtype]


def smooth_inv(act_absmax: Tensor, w: Tensor, alpha: float) -> Tensor:
    """int8_smooth's 1/s (float32, as stored): s_k = a_k^alpha / max_n|w[n,k]|^(1-alpha), clamped to
    [1, 1e4] (no channel amplified); s = 1 where a_k = 0, 1e4 where the weight column is 0."""
    a, wmax = act_absmax.double(), w.double().abs().amax(0)
    s = torch.where(wmax > 0, a.pow(alpha) / wmax.pow(1 - alpha), torch.full_like(a, 1e4))
    s = torch.where(a > 0, s, torch.ones_like(a)).clamp(1.0, 1e4)
    return (1.0 / s).float()


def expected_output(cand, x: Tensor, w: Tensor, b: Tensor | None, act_absmax: Tensor | None = None) -> Tensor:
    """float64 output of the kernel `cand` (read for its family, kernel and params only) on x [M, K]
    for the float layer (w, b), from the format definitions. `act_absmax`: the calibration of a
    calibrated family (int8_smooth)."""
    family, kernel = cand.family, cand.kernel
    if family == "int8_smooth":  # x * inv per channel, W / inv per column, then int8_dynamic fbgemm
        inv = smooth_inv(act_absmax, w, cand.alpha)
        xs = (x.float() * inv).double()
        codes, scale, _ = int8_rows((w.float() / inv).double())
        return linear64(uint8_tensor_asym(xs, 127), codes.double() * scale[:, None], b)
    if family == "float":
        cd = getattr(torch, cand.compute_dtype) if cand.compute_dtype else x.dtype
        if kernel == "fbgemm_fp16":  # fp16 weight, float32 activation and accumulation
            return linear64(to_dtype64(x, torch.float32), to_dtype64(w, torch.float16), b)
        return linear64(to_dtype64(x, cd), to_dtype64(w, cd), None if b is None else to_dtype64(b, cd))
    if family in ("int8_weight_only", "int8_dynamic"):
        codes, scale, _ = int8_rows(w)
        w_hat = codes.double() * scale[:, None]
        if family == "int8_weight_only":
            return linear64(x, w_hat, b)
        if kernel == "fbgemm":  # per-tensor asymmetric uint8, 7-bit codes (reduce_range)
            x_hat = uint8_tensor_asym(x, 127)
        else:  # per-token symmetric; oneDNN with 7-bit codes (-63..63)
            xq, xs, _ = int8_rows(x, 63 if kernel == "onednn" else 127, ACT_SCALE_FLOOR)
            x_hat = xq.double() * xs[:, None]
        return linear64(x_hat, w_hat, b)
    if family == "int4_weight_only":  # qparams stored in the weight's dtype
        return linear64(x, int4_grouped(w, cand.group_size, w.dtype)["w_hat"], b)
    if family in ("fp8_weight_only", "fp8_dynamic"):
        bits, scale, _ = fp8_rows(w)
        w_hat = e4m3_decode(bits) * scale[:, None]
        if family == "fp8_weight_only":
            return linear64(x, w_hat, b)
        xb, xs, _ = fp8_rows(x)
        return linear64(e4m3_decode(xb) * xs[:, None], w_hat, b)
    raise AssertionError(f"no definition for {cand.name}: add it to tests/references.py")


def rounding_dtype(cand, dtype: torch.dtype, device_type: str = "cpu") -> torch.dtype:
    """The narrowest float dtype a kernel's output passes through: the activation dtype, a
    lower-precision compute dtype (float with compute_dtype bfloat16 / float16), or bf16 for
    CUDA row-wise ``_scaled_mm`` (it writes bf16 whatever the activation dtype)."""
    if device_type == "cuda" and (cand.family, cand.kernel) == ("fp8_dynamic", "scaled_mm"):
        return torch.bfloat16
    cd = getattr(cand, "compute_dtype", None)
    if cd is None or dtype != torch.float32:
        return dtype
    return getattr(torch, cd)
