"""Input gradients through finalized layers (frozen quantized bases under trainable adapters).

For every CPU kernel: ``x.grad`` is ``(grad_y.float() @ W).to(x.dtype)`` with W the weight the
kernel's plain-PyTorch ``reference`` multiplies by, read off that reference itself (its output on
the identity matrix), not off the layer's own ``dequantize``; the weights get no gradient, and
asking for one raises. Also: no "autograd kernel was not registered" warning, the eager shortcut
still runs for inputs that need no gradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from autoquant.candidates import (
    FloatCandidate,
    Fp8Dynamic,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8Smooth,
    Int8WeightOnly,
)
from autoquant.candidates.fp8 import cpu_rowwise_scaled_mm_reason
from autoquant.finalize import DispatchLinear
from autoquant.selection import Dispatch
from helpers import act_absmax, sqnr

K, N = 64, 48
CPU_CASES = [
    (FloatCandidate("aten", "bfloat16"), torch.float32),
    (FloatCandidate("onednn"), torch.float32),
    (FloatCandidate("fbgemm_fp16"), torch.float32),
    (FloatCandidate("aten", "float32"), torch.bfloat16),
    (FloatCandidate("onednn", "float32"), torch.bfloat16),
    (FloatCandidate("fbgemm_fp16", "float32"), torch.bfloat16),
    (Int8WeightOnly("int8pack"), torch.bfloat16),
    (Int8WeightOnly("dequant"), torch.float32),
    (Int8WeightOnly("dequant"), torch.bfloat16),
    (Int8Dynamic("fbgemm"), torch.float32),
    (Int8Dynamic("onednn"), torch.float32),
    (Int8Dynamic("int_mm"), torch.float32),
    (Int8Dynamic("fbgemm"), torch.bfloat16),
    (Int8Smooth("fbgemm", 0.75), torch.float32),
    (Int8Smooth("fbgemm", 0.5), torch.bfloat16),
    (Int4WeightOnly("tinygemm_cpu", 32), torch.bfloat16),
    (Int4WeightOnly("tinygemm_cpu", 64), torch.float32),
    (Fp8WeightOnly("dequant"), torch.float32),
    pytest.param((Fp8Dynamic("scaled_mm"), torch.float32), marks=pytest.mark.skipif(
        cpu_rowwise_scaled_mm_reason() is not None,
        reason=f"this build's CPU _scaled_mm runs no row-wise scales: {cpu_rowwise_scaled_mm_reason()}")),
]


def _ids(case) -> str:
    cand, dtype = case
    return f"{cand.name}-{str(dtype).removeprefix('torch.')}"


def _weights(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=gen) / 8).to(dtype), torch.randn(N, generator=gen).to(dtype)


def _reference_weight(cand, layer) -> torch.Tensor:
    """W as the reference computes it: reference(I) = I @ W.T, for activations of the layer's dtype."""
    eye = torch.eye(K, dtype=layer.act_dtype)
    return cand.reference(eye, layer.packed(), None).float().t().contiguous()  # same layout: same sums


@pytest.mark.parametrize("case", CPU_CASES, ids=_ids)
def test_input_grad_is_grad_y_times_dequantized_weight(case):
    cand, dtype = case
    w, b = _weights(dtype)
    layer = cand.build(w, b, act_absmax=act_absmax(K))
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    g = torch.randn(2, 3, N, generator=torch.Generator().manual_seed(2)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns where an op has no autograd formula
        y = layer(x)
        y.backward(g)
    with torch.no_grad():
        assert torch.equal(y, layer(x.detach()))  # the forward is the kernel's, unchanged
    w_layer = layer.dequantized_weight(dtype)
    assert torch.equal(x.grad, (g.reshape(-1, N).float() @ w_layer).to(dtype).reshape(x.shape))
    # ... and that W is the reference's: read off reference(I) = I @ W.T independently.
    w_ref = _reference_weight(cand, layer)
    if dtype == torch.float32 and not cand.dynamic_activation:
        assert torch.equal(w_layer, w_ref)  # one rounding of each product, in float32 both ways
    else:
        # bf16: reference(I) rounds W to bf16; dynamic schemes: I's rows are quantized with a
        # scale that is not exactly 1. Within that rounding.
        assert sqnr(w_ref, w_layer) > 45
        want = (g.reshape(-1, N).float() @ w_ref).to(dtype).reshape(x.shape)
        assert sqnr(want.float(), x.grad.float()) > 40
    assert all(t is None or t.grad is None for t in layer._buffers.values())


def test_dispatch_linear_gradient_follows_the_kernel_of_each_side():
    dtype = torch.bfloat16
    w, b = _weights(dtype)
    small, large = Int8WeightOnly("int8pack"), Int8Dynamic("fbgemm")
    packed = small.quantize(w)
    layer = DispatchLinear(Dispatch(small, large, 4), packed, b.clone(), K, N, act_dtype=dtype)
    for m, cand in ((2, small), (6, large)):
        x = torch.randn(m, K).to(dtype).requires_grad_()
        g = torch.randn(m, N).to(dtype)
        layer(x).backward(g)
        want = (g.float() @ cand.dequantize(packed, dtype)).to(dtype)
        assert torch.equal(x.grad, want)


def test_weight_gradient_raises_a_clear_error():
    layer = FloatCandidate("onednn").build(*_weights(torch.float32))
    layer.weight.requires_grad_(True)
    x = torch.randn(3, K, requires_grad=True)
    with pytest.raises(ValueError, match=r"gradient was asked for its weight.*frozen.*LoRA"):
        layer(x)
    layer.weight.requires_grad_(False)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is None


def test_lora_adapter_on_a_frozen_quantized_base_trains():
    """The use case: a trainable low-rank adapter next to a frozen int8 base gets gradients."""
    torch.manual_seed(0)
    base = Int8Dynamic("fbgemm").build(*_weights(torch.float32))
    a, b = nn.Linear(K, 4, bias=False), nn.Linear(4, N, bias=False)
    nn.init.normal_(b.weight)
    x = torch.randn(5, K, requires_grad=True)
    y = base(x)
    y += b(a(x))  # in place, as adapters often add: the base's output is its own tensor, not a view
    y.square().mean().backward()
    assert a.weight.grad is not None and a.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_no_grad_calls_take_the_eager_shortcut():
    """Inputs that need no gradient never reach the autograd wrapper (inference cost unchanged)."""
    layer = Int8Dynamic("fbgemm").build(*_weights(torch.float32))
    calls = []
    layer._run = lambda x2: calls.append(x2) or torch.zeros(x2.shape[0], N)  # type: ignore[method-assign]
    with torch.no_grad():
        layer(torch.randn(3, K, requires_grad=True))
    layer(torch.randn(3, K))
    assert not calls
    layer(torch.randn(3, K, requires_grad=True))
    assert len(calls) == 1
