"""Triton kernels for int8 dynamic quantization (see int8_dynamic.py for the contract).

Two kernels: ``int8_dyn_mm_kernel`` (int8 x int8 -> int32 on tensor cores, float32 rescale epilogue)
and ``quantize_rows_kernel`` (symmetric per-row int8 quantization of the activation). Imported
lazily.
"""

import triton
import triton.language as tl

from ._triton_common import Tile, make_configs, prune_by_m, tile_coords

# int8 mma needs BLOCK_K >= 32; deep BLOCK_K halves the loop trips for the same bytes.
TILES = [
    Tile(16, 64, 128, 4, 4),
    Tile(16, 64, 256, 4, 3),
    Tile(16, 128, 128, 4, 4),
    Tile(16, 32, 256, 4, 4),
    Tile(32, 64, 128, 4, 4),
    Tile(32, 128, 128, 4, 3),
    Tile(64, 64, 128, 4, 4),
    Tile(64, 128, 128, 4, 3),
    Tile(64, 256, 128, 8, 3),
    Tile(128, 128, 64, 4, 4),
    Tile(128, 128, 128, 8, 3),
    Tile(128, 256, 128, 8, 3),
]


@triton.autotune(
    configs=make_configs(TILES),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune_by_m},
)
@triton.jit
def int8_dyn_mm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, o_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # int32 accumulation is exact: |sum| <= K * 127 * 127 < 2**31 for K < 133,000.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_tile in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k_tile * BLOCK_K
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue in float32, in the same order as the reference: (acc * x_scale) * w_scale + bias.
    x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = o_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, y.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# 1.5 * 2**23: for float32 |v| < 2**22, v + MAGIC lands where the float32 spacing is 1, so IEEE
# round-to-nearest-even rounds v to an integer there, and subtracting MAGIC is exact. This is
# torch.round's ties-to-even, in plain float32 adds that behave the same compiled (no fast-math
# reassociation in Triton; no multiply, so no FMA contraction) and in the interpreter (numpy),
# so one code path serves both (libdevice.rint does not exist in the interpreter).
_RNE_MAGIC: tl.constexpr = tl.constexpr(12582912.0)


@triton.jit
def _round_half_even(v):
    """torch.round semantics (ties to even) for float32 values well inside int8 range."""
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr,
    K, stride_xm, stride_xk, stride_qm, stride_qk,
    EPS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program per row: pass 1 finds amax, pass 2 quantizes (re-reading the row, mostly L2)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    # IEEE division (div_rn), not the approximate `/`, so scale and q match torch bit for bit.
    scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), 127.0), EPS)
    tl.store(s_ptr + row, scale)
    q_row = q_ptr + row * stride_qm
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs < K
        v = tl.load(x_row + (k0 + offs) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        q = _round_half_even(tl.div_rn(v, scale))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_row + (k0 + offs) * stride_qk, q.to(tl.int8), mask=k_ok)


KERNEL = int8_dyn_mm_kernel
QUANTIZE_KERNEL = quantize_rows_kernel
