"""When and how int4 weight-only launches its GEMV kernel (decode: one row, K split).

The tensor-core kernel pads a decode call up to a 16-row tile and gives each program a whole K, so
at M = 1 it launches one program per BLOCK_N columns. ``GEMV_KERNEL`` in ``_int4_wo_kernel.py``
uses no tensor cores, gives each program one row and splits K over several programs
(``gemv_splits``); the split partial sums go to a float32 [splits, M, N] workspace that one
``sum`` reduces (deterministic, no atomics).

Where it runs follows the H200 measurements (benchmarks/results/gpu/h200-2026-11-30 and
h200-2026-11-30-rerun, bench_triton.json, bf16, G=128): at M = 1 the GEMV beat the tensor-core
kernel where K was split (4096x4096: 22.4 vs 37.4 us; K=14336, N=4096: 53.2 vs 119.5 us) and lost
where N alone filled the GPU and K was not split (K=4096, N=14336: 54.0 vs 49.5 us); at M = 4 it
lost everywhere (49.5-146.8 us, the weight re-read once per row). An int8 weight-only GEMV built
the same way lost at M = 1 (16.9-35.5 us vs 13.8-33.8) and was removed. So: M == 1 and at least
two K splits, else the tensor-core kernel.

Only a concrete ``int`` M takes this path: a symbolic M (torch.compile with dynamic shapes, export)
keeps the tensor-core kernel, so no guard on M is added to a traced graph.
"""

from __future__ import annotations

import functools

import torch

# Rows up to which a call may take the GEMV kernel (each row is one program; see the module doc).
GEMV_MAX_M = 1
# Programs per SM the K split aims for, and the least K one split covers on a GPU.
_PROGRAMS_PER_SM = 4
_MIN_K_PER_SPLIT_CUDA = 1024
# The Triton interpreter (CPU) counts as a tiny GPU that splits small K too, so the CPU tests run the
# split path (the workspace and its reduction) on their small shapes.
_INTERPRETER_SMS = 8
_MIN_K_PER_SPLIT_INTERPRETER = 64


def use_gemv(m: object) -> bool:
    """True for a concrete M in 1..GEMV_MAX_M (a SymInt never: see the module doc)."""
    return type(m) is int and 0 < m <= GEMV_MAX_M


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once per device), or the interpreter's
    stand-in for any other device."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def gemv_splits(n_programs: int, k: int, device: torch.device) -> int:
    """How many programs share one row's K: the largest power of two that keeps the grid at or
    under ``_PROGRAMS_PER_SM`` programs per SM with each split covering at least the minimum K.

    ``n_programs`` is the number of column tiles (N / BLOCK_N for a typical BLOCK_N)."""
    min_k = _MIN_K_PER_SPLIT_CUDA if device.type == "cuda" else _MIN_K_PER_SPLIT_INTERPRETER
    target = _PROGRAMS_PER_SM * sm_count(device)
    splits = 1
    while n_programs * splits * 2 <= target and k // (splits * 2) >= min_k:
        splits *= 2
    return splits


def split_output(out: torch.Tensor, splits: int) -> tuple[torch.Tensor, int, int, int]:
    """Where a GEMV kernel writes: ``out`` itself for one split, else a new float32 [splits, M, N]
    workspace; with its (split, row, column) strides."""
    if splits == 1:
        return out, 0, out.stride(0), out.stride(1)
    m, n = out.shape
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=out.device)
    return ws, ws.stride(0), ws.stride(1), ws.stride(2)


def reduce_splits(target: torch.Tensor, out: torch.Tensor) -> None:
    """Sum a workspace's splits into ``out`` (nothing to do when the kernel wrote ``out``)."""
    if target is not out:
        out.copy_(target.sum(dim=0))
