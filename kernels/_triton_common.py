"""Triton helpers shared by the kernel modules: tile scheduling, autotune config lists and pruning.

Imported only by the private ``_*_kernel.py`` modules, i.e. only when Triton is installed and a
kernel is first used.

Autotuning: each kernel is keyed on (M_BUCKET, N, K) plus the operand dtypes (triton adds those;
int4 adds GROUP_SIZE), where M_BUCKET is ``_registry.m_bucket(M)``. ``prune_by_m`` keeps only the
configs whose BLOCK_M suits the bucket, so an M=1 decode call tries a handful of BLOCK_M=16 configs
instead of the whole list. Under the interpreter (TRITON_INTERPRET=1) every list collapses to a single small config: the
interpreter would otherwise time every config on the CPU, which takes minutes.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import triton
import triton.language as tl


class Tile(NamedTuple):
    """One autotune candidate: block sizes plus launch parameters."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The interpreter runs one program at a time on the CPU; small tiles keep masked work low.
INTERPRETER_TILE = Tile(16, 32, 32, 4, 1)


def interpreting() -> bool:
    """True when @triton.jit returns interpreted functions (TRITON_INTERPRET=1 at decoration)."""
    return bool(triton.knobs.runtime.interpret)


def make_configs(tiles: Sequence[Tile], group_m: int = 8) -> list[triton.Config]:
    """triton.Config objects for ``tiles``, or the single interpreter tile when interpreting."""
    chosen = [INTERPRETER_TILE] if interpreting() else list(tiles)
    return [
        triton.Config(
            {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "GROUP_M": group_m},
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        for t in chosen
    ]


def allowed_block_m(m_bucket: int) -> tuple[int, ...]:
    """BLOCK_M values worth trying for an M bucket: none much taller than M, none tiny for big M."""
    if m_bucket <= 16:
        return (16,)
    if m_bucket <= 32:
        return (16, 32)
    if m_bucket <= 64:
        return (32, 64)
    return (64, 128)


def prune_by_m(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """early_config_prune hook: keep configs whose BLOCK_M suits M_BUCKET (never an empty list)."""
    allowed = allowed_block_m(int(named_args["M_BUCKET"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] in allowed]
    if kept:
        return kept
    # Lists without a fitting BLOCK_M (e.g. fp8, whose smallest tile is 64) keep their smallest
    # tiles.
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] == smallest]


@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (row tile, column tile) pair, GROUP_M row tiles at a time.

    Programs launched close in time then share the same few weight column tiles and activation row
    tiles, which raises L2 hit rates for large M; for M <= BLOCK_M it degenerates to pid_n = pid.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    local = pid % per_group
    pid_m = first_m + local % rows_in_group
    pid_n = local // rows_in_group
    return pid_m, pid_n


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST_DOT is set only under the interpreter: triton 3.9's interpreter keeps bfloat16 as raw
    uint16 and multiplies those bits in tl.dot, so 16-bit operands are widened to float32 first. A
    bf16 x bf16 product is exact in float32 and the GPU accumulates in float32 too, so the widened
    dot computes the same sums.
    """
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def grid_2d(M: int, N: int):
    """1-D launch grid covering all (BLOCK_M, BLOCK_N) output tiles of whichever config runs."""

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    return grid
