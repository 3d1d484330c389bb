"""Hand-written plans for the deployment tests: one layer per CPU kernel, chosen without timing.

``chain(dtype)`` lists the CPU kernels a model of that dtype can run here (``supports()`` says
None, or declines only for speed: such kernels still run); ``mlp_with_plan`` builds a Sequential
of 64-wide layers and applies a plan giving each layer one of them, plus one DispatchLinear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoquant.candidates import (
    Candidate,
    FloatCandidate,
    Fp8Dynamic,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
)
from autoquant.keys import OpShape
from autoquant.plan import PLAN_FORMAT, PLAN_VERSION, apply_plan

WIDTH = 64
CPU = torch.device("cpu")

_FP32 = (
    FloatCandidate("onednn"), FloatCandidate("fbgemm_fp16"), FloatCandidate("aten", "bfloat16"),
    Int8Dynamic("fbgemm"), Int8Dynamic("onednn"), Fp8WeightOnly("dequant"), Fp8Dynamic("scaled_mm"),
)
_BF16 = (
    FloatCandidate("aten", "float32"), FloatCandidate("onednn", "float32"), FloatCandidate("fbgemm_fp16", "float32"),
    Int8WeightOnly("int8pack"), Int4WeightOnly("tinygemm_cpu", 32), Int4WeightOnly("tinygemm_cpu", 64),
    Int8Dynamic("fbgemm"), Int8Dynamic("onednn"), Fp8WeightOnly("dequant"), Fp8Dynamic("scaled_mm"),
)


def runs_here(c: Candidate, dtype: torch.dtype, k: int = WIDTH, n: int = WIDTH) -> bool:
    reason = c.supports(CPU, OpShape(8, k, n, True, str(dtype).removeprefix("torch.")))
    return reason is None or "not worth timing" in reason


def chain(dtype: torch.dtype) -> list[Candidate]:
    return [c for c in (_FP32 if dtype == torch.float32 else _BF16) if runs_here(c, dtype)]


def dispatch_pair(dtype: torch.dtype) -> tuple[Candidate, Candidate]:
    """Two kernels over one packed int8 weight: weight-only below the threshold, dynamic above."""
    small = Int8WeightOnly("int8pack") if dtype == torch.bfloat16 else Int8Dynamic("onednn")
    return small, Int8Dynamic("fbgemm")


def entry(c: Candidate) -> dict[str, Any]:
    return {"kind": "candidate", "family": c.family, "params": c.params()}


def plan(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "environment": None, "layers": layers}


def dispatch_entry(small: Candidate, large: Candidate, threshold: int) -> dict[str, Any]:
    return {"kind": "dispatch", "small": {"family": small.family, "params": small.params()},
            "large": {"family": large.family, "params": large.params()}, "threshold": threshold}


def mlp_with_plan(dtype: torch.dtype, threshold: int = 4, seed: int = 0,
                  cands: list[Candidate] | None = None) -> tuple[nn.Sequential, list[str]]:
    """Sequential(Linear, GELU, Linear, GELU, ...): one layer per kernel of `cands` (default
    ``chain(dtype)``) then a DispatchLinear; returns the model (plan applied) and a label per
    planned layer."""
    torch.manual_seed(seed)
    cands = chain(dtype) if cands is None else [c for c in cands if runs_here(c, dtype)]
    mods: list[nn.Module] = []
    for _ in range(len(cands) + 1):
        mods += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    model = nn.Sequential(*mods).to(dtype).eval()
    layers = {str(2 * i): entry(c) for i, c in enumerate(cands)}
    small, large = dispatch_pair(dtype)
    layers[str(2 * len(cands))] = dispatch_entry(small, large, threshold)
    apply_plan(model, plan(layers))
    return model, [c.name for c in cands] + [f"dispatch({small.name} | {large.name})"]
