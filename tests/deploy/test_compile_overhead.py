"""Per-call overhead of the fbgemm kernels in eager and compiled models: no argument check that
throws per call.

Calling an op with fbgemm's prepacked handle (a TorchScript object) from Python looks up
``__torch_function__`` on the handle, which ScriptObject answers with a thrown C++ exception, on
every call. The layers, the public helpers and the registered ops call the kernels with that check
off (``_cpu_ops._no_torch_function``). These tests record ScriptObject attribute lookups while
real fbgemm layers run, eager and compiled, and check that a tensor subclass still gets its own
``__torch_function__``. Plans are hand-written (``_plans``): nothing is timed.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from autoquant.candidates import FloatCandidate, Int8Dynamic
from autoquant.candidates import _cpu_ops as ops
from autoquant.plan import apply_plan

from ._plans import WIDTH, entry, plan, runs_here

FBGEMM = (Int8Dynamic("fbgemm"), FloatCandidate("fbgemm_fp16"))
FBGEMM_IDS = ("int8_dynamic-fbgemm", "float-fbgemm_fp16")


@pytest.fixture
def handle_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names looked up on any ScriptObject through its ``__getattr__`` (a missing attribute: the
    thrown-exception path) while the test runs."""
    seen: ClassVar[list[str]] = []
    original = torch.ScriptObject.__getattr__

    def recording(self: torch.ScriptObject, name: str) -> object:
        seen.append(name)
        return original(self, name)

    monkeypatch.setattr(torch.ScriptObject, "__getattr__", recording)
    return seen


def _model(cand, n_layers: int = 3, seed: int = 0) -> nn.Sequential:
    if not runs_here(cand, torch.float32):
        pytest.skip(f"{cand.name} does not run on this CPU")
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(n_layers)]).eval()
    return apply_plan(model, plan({str(i): entry(cand) for i in range(n_layers)}))


def _x(m: int = 3) -> torch.Tensor:
    return torch.randn(m, WIDTH, generator=torch.Generator().manual_seed(m))


def test_the_recorder_sees_the_lookup_a_plain_call_makes(handle_lookups):
    """The check this file is about exists: a plain call of fbgemm's op looks the name up."""
    w = torch.randint(-127, 128, (WIDTH, WIDTH), dtype=torch.int8)
    s = torch.rand(WIDTH) / 100
    ops.prepack("fbgemm_int8", w, s)
    handle = ops.PREPACK_CACHE.get("fbgemm_int8", (w, s), ops._build_fbgemm_int8)
    ops.c_op("quantized::linear_dynamic")(_x(), handle, True)
    assert "__torch_function__" in handle_lookups


@pytest.mark.parametrize("cand", FBGEMM, ids=FBGEMM_IDS)
def test_eager_layers_skip_the_handle_lookup(cand, handle_lookups):
    model = _model(cand)
    with torch.no_grad():
        model(_x())  # prepared, then warm
        handle_lookups.clear()
        y = model(_x())
    assert handle_lookups == []
    assert y.shape == (3, WIDTH)


@pytest.mark.parametrize("cand", FBGEMM, ids=FBGEMM_IDS)
def test_registered_ops_skip_the_handle_lookup_compiled(cand, handle_lookups):
    """The compiled graph calls the registered op; its body calls fbgemm with the check off, and
    the compiled output equals eager's bit for bit."""
    model = _model(cand)
    x = _x()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(x)
        compiled(x)
        handle_lookups.clear()
        got = compiled(x)
    assert handle_lookups == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_public_helpers_skip_the_handle_lookup(handle_lookups):
    w = torch.randint(-127, 128, (WIDTH, WIDTH), dtype=torch.int8)
    s = torch.rand(WIDTH) / 100
    w16 = torch.randn(WIDTH, WIDTH).half()
    x = _x()
    # The first calls build the handles (and hand them to the C++ kernels' mirror, whose argument
    # conversion looks at the handle once per build): the per-call check is what counts.
    ops.fbgemm_int8_linear(x, w, s)
    ops.fbgemm_fp16_linear(x, w16)
    handle_lookups.clear()
    y8 = ops.fbgemm_int8_linear(x, w, s)
    y16 = ops.fbgemm_fp16_linear(x, w16)
    assert handle_lookups == []
    # The same kernels as the registered ops, which the compiled path runs.
    torch.testing.assert_close(y8, torch.ops.autoquant.cpu_fbgemm_int8_linear(x, w, s), rtol=0, atol=0)
    torch.testing.assert_close(y16, torch.ops.autoquant.cpu_fbgemm_fp16_linear(x, w16), rtol=0, atol=0)


class _Traced(torch.Tensor):
    """A tensor subclass that records the functions its ``__torch_function__`` sees."""

    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_subclass_input_still_gets_its_torch_function():
    """The check is skipped only for plain tensors: a subclass's ``__torch_function__`` runs for
    the fbgemm call, as before."""
    w = torch.randint(-127, 128, (WIDTH, WIDTH), dtype=torch.int8)
    s = torch.rand(WIDTH) / 100
    x = _x()
    _Traced.seen = []
    y = ops.fbgemm_int8_linear(x.as_subclass(_Traced), w, s)
    assert any("linear_dynamic" in name for name in _Traced.seen), _Traced.seen
    torch.testing.assert_close(y.as_subclass(torch.Tensor), ops.fbgemm_int8_linear(x, w, s), rtol=0, atol=0)
