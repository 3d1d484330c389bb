"""Triton kernel for float8 e4m3 row-wise scaled matmul (see fp8_rowwise.py); imported lazily."""

import triton
import triton.language as tl

from ._triton_common import Tile, make_configs, prune_by_m, tile_coords

# BLOCK_M starts at 64: that is the Hopper wgmma tile height, and smaller fp8 tiles would depend on
# the mma.sync fp8 fallback; at M = 1 the idle rows cost tensor-core time only, not memory traffic.
# fp8 mma consumes K in steps of 32, so BLOCK_K >= 64 keeps the pipeline full.
TILES = [
    Tile(64, 32, 256, 4, 4),
    Tile(64, 64, 128, 4, 4),
    Tile(64, 64, 256, 4, 3),
    Tile(64, 128, 128, 4, 4),
    Tile(64, 256, 128, 8, 3),
    Tile(128, 128, 128, 8, 3),
    Tile(128, 256, 128, 8, 3),
    Tile(128, 128, 64, 4, 4),
]


# fp8 wgmma (sm_90) accumulates in a narrower-than-fp32 register unless Triton promotes the partial
# sums; Triton's sm_90 default is never (2**30 products), which drifts from the reference and from
# torch._scaled_mm (both accumulate in fp32). 32, the K of one fp8 wgmma instruction, adds every
# instruction's result into the fp32 accumulator; below 32 Triton gives up wgmma altogether.
# Every tile's BLOCK_K is a multiple of it (tl.dot requires <= BLOCK_K). Other GPUs ignore it.
PRECISE_ACC_EVERY: tl.constexpr = tl.constexpr(32)


@triton.autotune(
    configs=make_configs(TILES),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune_by_m},
)
@triton.jit
def fp8_rowwise_mm_kernel(
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
    # [N, K] row-major weight read as a K-major [BLOCK_K, BLOCK_N] operand: the layout fp8 wgmma
    # wants.
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_tile in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k_tile * BLOCK_K
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=PRECISE_ACC_EVERY)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = o_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, y.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


KERNEL = fp8_rowwise_mm_kernel
