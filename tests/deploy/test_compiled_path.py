"""The compiled call path: both orders of autoquant and torch.compile, fullgraph for every CPU
kernel and for M-dispatch, no per-layer recompiles, export bit-exact, gradients under compile.

Plans are hand-written (``_plans``) or tuned with a deterministic fake timer: nothing is timed.
aot_eager runs the very ops eager mode runs (bit-exact checks); one test goes through inductor.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from autoquant import FakeTimer, MemoryStore, autoquant
from autoquant.candidates import QuantizedLinear
from autoquant.finalize import DispatchLinear
from autoquant.plan import apply_plan, plan_of
from helpers import sqnr

from ._plans import WIDTH, chain, dispatch_entry, dispatch_pair, entry, mlp_with_plan, plan

DTYPES = (torch.float32, torch.bfloat16)
DT_IDS = ("float32", "bfloat16")


def _x(dtype: torch.dtype, m: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, WIDTH, generator=torch.Generator().manual_seed(seed)).to(dtype)


class CountingBackend:
    """A dynamo backend that runs the captured graph as is and counts compilations (a recompile
    is one more)."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiles += 1
        return gm.forward


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) + x


def _blocks(n: int, dtype: torch.dtype, cands: list, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(*[Block() for _ in range(n)]).eval().to(dtype)
    return apply_plan(model, plan({f"{i}.fc": entry(cands[i % len(cands)]) for i in range(n)}))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_48_layers_compile_once_without_recompiles(dtype):
    """A 48-layer model cycling through every CPU kernel compiles into ONE graph (fullgraph), and
    a second model of the same classes compiles to the same guards' worth: one frame each."""
    torch._dynamo.reset()
    backend = CountingBackend()
    for seed in (0, 1):
        model = _blocks(48, dtype, chain(dtype), seed)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        x = _x(dtype, 3)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert backend.compiles == 1  # the second model reuses the first one's graph: no guard is per layer


def test_blocks_compiled_one_by_one_recompile_per_kernel_not_per_layer():
    """Each of 48 blocks compiled on its own (one shared forward code object): dynamo compiles once
    per kernel kind, never once per layer, and a second model of the same kinds adds nothing."""
    dtype = torch.float32
    cands = chain(dtype)[:4]
    torch._dynamo.reset()
    backend = CountingBackend()
    for seed in (0, 1):
        model = _blocks(48, dtype, cands, seed)
        x = _x(dtype, 2)
        with torch.no_grad():
            want = model(x)
            for i in range(len(model)):
                model[i] = torch.compile(model[i], fullgraph=True, backend=backend)
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert backend.compiles == len(cands) < torch._dynamo.config.recompile_limit


def _tune(model: nn.Module, x: torch.Tensor, store: MemoryStore) -> nn.Module:
    # int8 fbgemm cheapest everywhere, then the onednn float kernel: a real plan, no timing.
    def cost(key) -> float:
        kernel = json.loads(key.params).get("kernel")
        return {("int8_dynamic", "fbgemm"): 1e-6, ("float", "onednn"): 2e-6}.get((key.candidate, kernel), 1e-3)

    return autoquant(model, x, cache=store, progress=False, timer=FakeTimer(cost))


def test_compile_then_autoquant_matches_autoquant_then_compile():
    """``autoquant(torch.compile(model))`` (the torchao tutorial's order) tunes the eager module
    under the wrapper and runs the same plan, compiled, bit for bit as the other order."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(WIDTH, 96), nn.GELU(), nn.Linear(96, WIDTH)).eval()
    x = _x(torch.float32, 4)
    store = MemoryStore()
    first = _tune(copy.deepcopy(base), x, store)
    then_compile = torch.compile(first, fullgraph=True, backend="aot_eager")
    compile_first = _tune(torch.compile(copy.deepcopy(base), fullgraph=True, backend="aot_eager"), x, store)
    assert plan_of(compile_first)["layers"] == plan_of(first)["layers"]
    assert any(isinstance(m, QuantizedLinear) for m in compile_first.modules())
    with torch.no_grad():
        want = first(x)
        torch.testing.assert_close(then_compile(x), want, rtol=0, atol=0)
        torch.testing.assert_close(compile_first(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_every_cpu_kernel_and_dispatch_fullgraph_with_gradient(dtype):
    """fullgraph=True traces every CPU kernel and the M-dispatch on both sides, with autograd on:
    the compiled input gradient equals eager's bit for bit."""
    model, _ = mlp_with_plan(dtype, threshold=4)
    assert any(isinstance(m, DispatchLinear) for m in model.modules())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for m in (2, 9):
        x = _x(dtype, m, seed=m).requires_grad_()
        xc = x.detach().clone().requires_grad_()
        model(x).sum().backward()
        compiled(xc).sum().backward()
        torch.testing.assert_close(xc.grad, x.grad, rtol=0, atol=0)


def test_inductor_fp32_kernels_fullgraph():
    """inductor lowers the fp32 kernels (fbgemm int8, oneDNN float and int8, fbgemm fp16, casts)
    and an int8 M-dispatch in one fullgraph compile, matching eager within rounding."""
    dtype = torch.float32
    torch.manual_seed(0)
    cands = chain(dtype)
    small, large = dispatch_pair(dtype)
    layers = {str(i): entry(c) for i, c in enumerate(cands)}
    layers[str(len(cands))] = dispatch_entry(small, large, 4)
    model = apply_plan(nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(len(cands) + 1)]).eval(), plan(layers))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for m in (1, 9):
            x = _x(dtype, m, seed=m)
            assert sqnr(model(x), compiled(x)) > 30


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_export_of_48_layers_bit_exact(dtype):
    model = _blocks(48, dtype, chain(dtype))
    x = _x(dtype, 5)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
