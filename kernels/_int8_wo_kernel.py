"""Triton kernel for int8 weight-only matmul (see int8_weight_only.py for the contract).

Imported lazily (first use) by int8_weight_only.py; importing it decorates the kernel, which is when
Triton reads TRITON_INTERPRET.
"""

import triton
import triton.language as tl

from ._triton_common import Tile, dot_acc, make_configs, prune_by_m, tile_coords

# Memory-bound small-M tiles first: BLOCK_M=16 is the smallest tensor-core tile, narrow BLOCK_N
# gives enough programs to cover every SM at M=1 without split-K, long BLOCK_K keeps many loads in
# flight.
TILES = [
    # M <= 16 (decode); with the next group also M <= 32
    Tile(16, 16, 256, 2, 4),
    Tile(16, 32, 512, 4, 3),
    Tile(16, 32, 128, 4, 4),
    Tile(16, 64, 128, 4, 4),
    Tile(16, 32, 256, 4, 3),
    Tile(16, 64, 256, 4, 3),
    Tile(16, 128, 128, 4, 4),
    # M in (16, 64]
    Tile(32, 64, 128, 4, 4),
    Tile(32, 128, 64, 4, 4),
    Tile(64, 64, 128, 4, 3),
    Tile(64, 128, 64, 4, 4),
    # M > 64: compute-bound tiles
    Tile(64, 256, 64, 8, 3),
    Tile(128, 64, 64, 4, 4),
    Tile(128, 128, 64, 8, 3),
    Tile(128, 256, 64, 8, 3),
]


@triton.autotune(
    configs=make_configs(TILES),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune_by_m},
)
@triton.jit
def int8_wo_mm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, o_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # The weight is [N, K] (nn.Linear layout); address it as a [BLOCK_K, BLOCK_N] tile of W^T.
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_tile in range(tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k_tile * BLOCK_K
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        # int8 -> activation dtype is exact (|q| <= 128 fits the 8-bit bf16 mantissa). The detour
        # via float32 is because the triton 3.9 interpreter bit-casts a direct int8 -> bf16
        # conversion.
        w = q.to(tl.float32).to(a.dtype)
        acc = dot_acc(a, w, acc, DOT_PRECISION, UPCAST_DOT)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # The scale is per output column, so it factors out of the K sum: apply it once, after
    # accumulation.
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = o_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


KERNEL = int8_wo_mm_kernel

