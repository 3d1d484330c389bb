"""Memory of a planned model: parameter + buffer bytes per scheme, no float copy of a quantized
weight left behind, and what runtime state (prepacked weights) adds on top.

A Linear-only MLP (K = 256, so per-row scales cost 4/256 of a float32 weight row) keeps the
ratios readable: int8 is ~0.5x the bf16 model (0.25x float32, + scales), int4 (G=64, bf16
scales and zeros) ~0.28x the bf16 model.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from autoquant.candidates import (
    Candidate,
    FloatCandidate,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    QuantizedLinear,
)
from autoquant.candidates import _cpu_ops as ops
from autoquant.plan import apply_plan

from ._plans import entry, plan, runs_here

WIDTH = 256
LAYERS = 4


def _mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))).to(dtype).eval()


def state_bytes(model: nn.Module) -> int:
    """Parameter + buffer bytes, each storage counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _planned(dtype: torch.dtype, cand: Candidate) -> tuple[nn.Sequential, list[weakref.ref]]:
    if not runs_here(cand, dtype, WIDTH, WIDTH):
        pytest.skip(f"missing CPU feature: {cand.name} cannot run {dtype} on this CPU")
    model = _mlp(dtype)
    float_weights = [weakref.ref(m.weight) for m in model]
    apply_plan(model, plan({str(i): entry(cand) for i in range(LAYERS)}))
    return model, float_weights


CASES = [
    # (model dtype, candidate, expected bytes vs the same model in bf16): int8 N*K + 4N (float32
    # scales), int4 N*K/2 + 4N*K/G (bf16 scale and zero per group), against 2N*K
    pytest.param(torch.bfloat16, Int8WeightOnly("int8pack"), 0.5 + 2 / WIDTH, id="bf16-int8_weight_only"),
    pytest.param(torch.float32, Int8Dynamic("fbgemm"), 0.5 + 2 / WIDTH, id="fp32-int8_dynamic_fbgemm"),
    pytest.param(torch.float32, Int8Dynamic("onednn"), 0.5 + 2 / WIDTH, id="fp32-int8_dynamic_onednn"),
    pytest.param(torch.bfloat16, Int4WeightOnly("tinygemm_cpu", 64), 0.25 + 2 / 64, id="bf16-int4_g64"),
    pytest.param(torch.bfloat16, Int4WeightOnly("tinygemm_cpu", 128), 0.25 + 2 / 128, id="bf16-int4_g128"),
]


@pytest.mark.parametrize("dtype, cand, expected", CASES)
def test_planned_bytes_and_no_float_copy_left(dtype, cand, expected):
    bf16_bytes = state_bytes(_mlp(torch.bfloat16))
    model, float_weights = _planned(dtype, cand)
    ratio = state_bytes(model) / bf16_bytes
    assert ratio == pytest.approx(expected, rel=0.02), f"{cand.name}: {ratio:.3f}x the bf16 model"
    assert ratio < (0.55 if cand.family != "int4_weight_only" else 0.32)
    for layer in model:
        assert isinstance(layer, QuantizedLinear)
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            # A float tensor with as many elements as the weight would be a float copy of it.
            assert not (t.is_floating_point() and t.numel() >= WIDTH * WIDTH // 4), f"{cand.name}: {name} {t.shape}"
    gc.collect()
    assert all(ref() is None for ref in float_weights), "the float weights must be freed once planned"


def _runtime_tensor_bytes(layer: QuantizedLinear) -> int:
    """Bytes of the tensors in a layer's runtime state and prepack-cache entry (opaque fbgemm
    handles report none: benchmarks/bench_memory.py measures those from RSS)."""
    total = 0
    rt = layer._runtime
    values = rt.values() if isinstance(rt, dict) else [rt]
    total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    for (kind, ident), e in list(ops.PREPACK_CACHE._entries.items()):
        if any(ident == id(b) for b in layer.buffers()):
            for h in e.handle if isinstance(e.handle, tuple) else (e.handle,):
                if isinstance(h, torch.Tensor):
                    total += h.numel() * h.element_size()
    return total


@pytest.mark.parametrize("dtype, cand, extra", [
    # int8pack keeps the scales once per float dtype: no weight copy.
    pytest.param(torch.bfloat16, Int8WeightOnly("int8pack"), 0.0, id="int8pack-scales-only"),
    # These hold a prepacked copy of the weight next to the plain buffer (see _cpu_ops).
    pytest.param(torch.bfloat16, Int4WeightOnly("tinygemm_cpu", 64), 0.5 / 2, id="int4-cpu-layout"),
    pytest.param(torch.float32, Int8Dynamic("onednn"), 1.0 / 4, id="onednn-int8-reorder"),
    pytest.param(torch.float32, FloatCandidate("onednn"), 1.0, id="onednn-float-reorder"),
])
def test_runtime_copies_are_what_the_docs_say(dtype, cand, extra):
    """Runtime state per layer, as a fraction of the layer's float weight in the model dtype."""
    model, _ = _planned(dtype, cand)
    weight_bytes = WIDTH * WIDTH * torch.finfo(dtype).bits // 8
    for layer in model:
        got = _runtime_tensor_bytes(layer) / weight_bytes
        # + per-row metadata (scales per dtype, zero points): well under 5% of the weight.
        assert extra <= got <= extra + 0.05, f"{cand.name}: runtime {got:.3f}x the weight"
