"""Triton kernel for grouped asymmetric int4 weight-only matmul (see int4_weight_only.py).

Packed layout (from pack_int4): ``w_packed[n, j]`` (uint8, [N, K // 2]) holds q[n, 2j] in its low
nibble and q[n, 2j + 1] in its high nibble. The kernel never re-interleaves the nibbles: it splits
the activation tile into its even and odd columns instead and issues two dots per K tile,

    acc += x[:, even k] @ dequant(low nibbles) + x[:, odd k] @ dequant(high nibbles),

which is the same sum over k in a different order.

Groups: when BLOCK_K <= GROUP_SIZE (what the pruning hook picks in eager mode, clamping BLOCK_K to
the group size) a K tile lies inside one group and loads one row of scales and zeros. torch.compile
(inductor) autotunes user kernels over all configs without the pruning hook, so the kernel also
handles BLOCK_K > GROUP_SIZE, gathering a scale and zero per (k, n) and masking the K tail.
"""

from typing import Any

import triton
import triton.language as tl

from ._triton_common import Tile, dot_acc, interpreting, make_configs, prune_by_m, tile_coords

TILES = [
    # decode: narrow N, long K per trip (BLOCK_K is clamped to the group size by _prune)
    Tile(16, 16, 128, 2, 4),
    Tile(16, 32, 128, 4, 4),
    Tile(16, 64, 128, 4, 4),
    Tile(16, 128, 128, 4, 2),
    Tile(16, 64, 64, 4, 4),
    Tile(32, 64, 128, 4, 3),
    Tile(32, 128, 64, 4, 4),
    Tile(64, 64, 128, 4, 3),
    Tile(64, 128, 64, 4, 3),  # 4 stages: 176 KiB of shared memory in float32 on sm_80 (over 163)
    Tile(64, 256, 64, 8, 2),
    Tile(128, 128, 64, 8, 3),
    Tile(128, 64, 128, 4, 2),
]


def _prune(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """prune_by_m, then clamp BLOCK_K to the group size so a K tile never straddles two groups."""
    group = int(named_args.get("GROUP_SIZE", kwargs.get("GROUP_SIZE", 32)))
    kept: dict[tuple, triton.Config] = {}
    for c in prune_by_m(configs, named_args, **kwargs):
        block_k = min(c.kwargs["BLOCK_K"], group)
        params = {**c.kwargs, "BLOCK_K": block_k}
        key = (tuple(sorted(params.items())), c.num_warps, c.num_stages)
        kept.setdefault(key, triton.Config(params, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(kept.values())


@triton.jit
def _accumulate_tile(
    x_even,
    w_ptrs,
    scale,
    zero,
    acc,
    a_mask,
    w_mask,
    stride_xk,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """acc + x[:, even k] @ dequant(low nibbles) + x[:, odd k] @ dequant(high nibbles), one K tile.

    ``a_mask`` broadcasts against the [BLOCK_M, BLOCK_K // 2] activation tiles, ``w_mask``,
    ``scale`` and ``zero`` against the [BLOCK_K // 2, BLOCK_N] packed tile.
    """
    a_even = tl.load(x_even, mask=a_mask, other=0.0)
    a_odd = tl.load(x_even + stride_xk, mask=a_mask, other=0.0)
    packed = tl.load(w_ptrs, mask=w_mask, other=0)
    # Dequantize in float32 ((q - zero) * scale; zero may be fractional), then round once to the
    # activation dtype for the tensor-core dot.
    w_lo = (((packed & 0xF).to(tl.float32) - zero) * scale).to(a_even.dtype)
    w_hi = (((packed >> 4).to(tl.float32) - zero) * scale).to(a_even.dtype)
    acc = dot_acc(a_even, w_lo, acc, DOT_PRECISION, UPCAST_DOT)
    return dot_acc(a_odd, w_hi, acc, DOT_PRECISION, UPCAST_DOT)


# GROUP_SIZE is part of the key: the pruning hook clamps BLOCK_K to the group, so each group size has
# its own config set, and a winner tuned for G=32 (BLOCK_K <= 32) would run G=64 / G=128 with tiles
# half or a quarter as deep (and a config timed for one group size is no measurement of another).
@triton.autotune(
    configs=make_configs(TILES),
    key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def int4_wo_mm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wj, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF_K)  # byte index inside the K tile: covers k = 2j and 2j + 1
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_even = x_ptr + offs_m[:, None] * stride_xm + (2 * offs_j)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_j[:, None] * stride_wj + offs_n[None, :] * stride_wn
    s_ptrs = s_ptr + offs_n * stride_sn
    z_ptrs = z_ptr + offs_n * stride_zn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCK_K <= GROUP_SIZE:
        # Both are powers of two, so BLOCK_K divides GROUP_SIZE, which divides K: every K tile is
        # full (no K masks) and lies inside one group (one row of scales and zeros per tile).
        for k_tile in range(K // BLOCK_K):
            group = (k_tile * BLOCK_K) // GROUP_SIZE
            scale = tl.load(s_ptrs + group * stride_sg, mask=n_ok, other=0.0).to(tl.float32)[
                None, :
            ]
            zero = tl.load(z_ptrs + group * stride_zg, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc = _accumulate_tile(
                x_even,
                w_ptrs,
                scale,
                zero,
                acc,
                m_ok[:, None],
                n_ok[None, :],
                stride_xk,
                DOT_PRECISION,
                UPCAST_DOT,
            )
            x_even += BLOCK_K * stride_xk
            w_ptrs += HALF_K * stride_wj
    else:
        # Wider tiles (which torch.compile may pick, since inductor ignores the pruning hook) span
        # several groups and may overhang K: gather a scale per (k, n) and mask the tail.
        for k_tile in range(tl.cdiv(K, BLOCK_K)):
            k_even = k_tile * BLOCK_K + 2 * offs_j
            k_ok = k_even < K
            group = (k_even // GROUP_SIZE)[
                :, None
            ]  # k and k + 1 share a group (GROUP_SIZE is even)
            kn_ok = k_ok[:, None] & n_ok[None, :]
            scale = tl.load(s_ptrs[None, :] + group * stride_sg, mask=kn_ok, other=0.0).to(
                tl.float32
            )
            zero = tl.load(z_ptrs[None, :] + group * stride_zg, mask=kn_ok, other=0.0).to(
                tl.float32
            )
            acc = _accumulate_tile(
                x_even,
                w_ptrs,
                scale,
                zero,
                acc,
                m_ok[:, None] & k_ok[None, :],
                kn_ok,
                stride_xk,
                DOT_PRECISION,
                UPCAST_DOT,
            )
            x_even += BLOCK_K * stride_xk
            w_ptrs += HALF_K * stride_wj

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = o_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


KERNEL = int4_wo_mm_kernel


# ---------------------------------------------------------------------------------------- GEMV
# Decode (M <= int4_weight_only.GEMV_MAX_M): no tensor cores, one activation row per program, the
# weight streamed once in [BLOCK_N, BLOCK_K // 2] byte tiles (16-byte loads along K) and K split
# over several programs when N alone leaves SMs idle (int4_weight_only.gemv_splits picks how many).
# (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K is clamped to the group size by _prune_gemv.
GEMV_TILES = [
    (16, 128, 2, 2),
    (32, 128, 4, 2),
    (64, 128, 4, 2),
    (32, 64, 2, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
]
# Under the interpreter one small tile (every config would be timed on the CPU otherwise).
GEMV_INTERPRETER_TILE = (16, 32, 4, 1)


def _gemv_configs() -> list[triton.Config]:
    tiles = [GEMV_INTERPRETER_TILE] if interpreting() else GEMV_TILES
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for n, k, w, st in tiles
    ]


def _prune_gemv(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """Clamp BLOCK_K to the group size (a K tile then lies inside one group), dropping duplicates."""
    group = int(named_args.get("GROUP_SIZE", kwargs.get("GROUP_SIZE", 32)))
    kept: dict[tuple, triton.Config] = {}
    for c in configs:
        params = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], group)}
        key = (tuple(sorted(params.items())), c.num_warps, c.num_stages)
        kept.setdefault(key, triton.Config(params, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(kept.values())


@triton.autotune(
    configs=_gemv_configs(),
    key=["N", "K", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune_gemv},
)
@triton.jit
def int4_wo_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr,
    N, K, GROUPS_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wj, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_os, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (n tile, K split, row): o[split, row, n tile] = x[row, split's K] @ w^T (+ bias on
    split 0). ``o`` is the output itself (one split) or a float32 [splits, M, N] workspace that the
    launch wrapper sums. Each K tile lies inside one group (BLOCK_K <= GROUP_SIZE, both powers of
    two, GROUP_SIZE divides K), so no K masks are needed. The dequantized weight is rounded to the
    activation dtype before the multiply, as the tensor-core kernel above does."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row = tl.program_id(2)
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF_K)
    n_ok = offs_n < N
    g_start = pid_s * GROUPS_PER_SPLIT
    g_end = tl.minimum(g_start + GROUPS_PER_SPLIT, K // GROUP_SIZE)
    x_row = x_ptr + row * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, HALF_K), dtype=tl.float32)
    for k0 in range(g_start * GROUP_SIZE, g_end * GROUP_SIZE, BLOCK_K):
        group = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + group * stride_sg + offs_n * stride_sn, mask=n_ok, other=0.0)
        zero = tl.load(z_ptr + group * stride_zg + offs_n * stride_zn, mask=n_ok, other=0.0)
        scale = scale.to(tl.float32)[:, None]
        zero = zero.to(tl.float32)[:, None]
        packed = tl.load(w_rows + (k0 // 2 + offs_j)[None, :] * stride_wj, mask=n_ok[:, None], other=0)
        x_even = tl.load(x_row + (k0 + 2 * offs_j) * stride_xk)
        x_odd = tl.load(x_row + (k0 + 2 * offs_j + 1) * stride_xk)
        w_lo = (((packed & 0xF).to(tl.float32) - zero) * scale).to(x_even.dtype).to(tl.float32)
        w_hi = (((packed >> 4).to(tl.float32) - zero) * scale).to(x_even.dtype).to(tl.float32)
        acc += w_lo * x_even.to(tl.float32)[None, :] + w_hi * x_odd.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        y += tl.where(pid_s == 0, bias, 0.0)
    o_ptrs = o_ptr + pid_s * stride_os + row * stride_om + offs_n * stride_on
    tl.store(o_ptrs, y.to(o_ptr.dtype.element_ty), mask=n_ok)


GEMV_KERNEL = int4_wo_gemv_kernel
