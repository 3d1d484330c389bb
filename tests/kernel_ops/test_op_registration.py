"""Registration of the autoquant::* ops: import behaviour, opcheck, torch.compile and export.

Compile coverage: on CPU (Triton interpreter) the kernels sit behind an opaque custom op, and the
graph is compiled with ``backend="aot_eager"`` for every op plus one full inductor run (inductor's
CPU backend builds C++ for the surrounding relu, which costs ~20 s the first time, so only once).
On CUDA every op goes through full inductor, which inlines the Triton kernels (triton_op).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch

import autoquant
from autoquant import kernels as K
from autoquant.candidates._util import triton_required

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
# Where Triton is a declared dependency (Linux x86_64) a broken install must fail these tests, not
# skip them: they run and raise the import error. Elsewhere a missing Triton is a skip.
needs_triton = pytest.mark.skipif(
    not K.HAS_TRITON and not triton_required(),
    reason="triton is not installed (not a dependency on this platform)",
)

_DEVICE_MARKS = {
    "cpu": pytest.mark.skipif(
        not INTERPRETER,
        reason="CPU runs need TRITON_INTERPRET=1 (tests/conftest.py sets it when CUDA is absent)",
    ),
    "cuda": pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
}
DEVICES = [pytest.param(d, id=d, marks=m) for d, m in _DEVICE_MARKS.items()]
PUBLIC_OPS = [
    "int8_wo_mm",
    "int8_dyn_mm",
    "quantize_per_token_int8",
    "int4_wo_mm",
    "fp8_rowwise_mm",
]


def _skip_without_fp8(op: str, device: str) -> None:
    if op == "fp8_rowwise_mm" and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need CUDA compute capability >= 8.9")


def op_inputs(op: str, device: str, m: int = 5) -> tuple:
    """Small inputs for ``torch.ops.autoquant.<op>`` (positional, schema order)."""
    g = torch.Generator().manual_seed(0)
    k, n = 64, 24
    x = torch.randn(m, k, generator=g).to(device)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    s = (torch.rand(n, generator=g) * 0.02).to(device)
    bias = torch.randn(n, generator=g).to(device)
    if op == "int8_wo_mm":
        return (x.bfloat16(), w, s, bias.bfloat16())
    if op == "quantize_per_token_int8":
        return (x.bfloat16(),)
    if op == "int8_dyn_mm":
        xq, xs = K.quantize_per_token_int8_reference(x)
        return (xq, xs, w, s, bias, torch.bfloat16)
    if op == "int4_wo_mm":
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scales = (torch.rand(k // 32, n, generator=g) * 0.02).bfloat16().to(device)
        zeros = (torch.rand(k // 32, n, generator=g) * 15).bfloat16().to(device)
        return (x.bfloat16(), K.pack_int4(q).to(device), scales, zeros, 32, None)
    if op == "fp8_rowwise_mm":
        xq, xs = K.quantize_rowwise_fp8_reference(x)
        wq, ws = K.quantize_rowwise_fp8_reference(torch.randn(n, k, generator=g).to(device))
        return (xq, xs, wq, ws, bias, torch.float32)
    raise AssertionError(op)


def reference_for(op: str) -> Callable:
    return {
        "int8_wo_mm": K.int8_wo_mm_reference,
        "int8_dyn_mm": K.int8_dyn_mm_reference,
        "quantize_per_token_int8": K.quantize_per_token_int8_reference,
        "int4_wo_mm": K.int4_wo_mm_reference,
        "fp8_rowwise_mm": K.fp8_rowwise_mm_reference,
    }[op]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    if y.dtype == torch.int8:
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    else:
        scale = max(ref.float().abs().max().item(), 1e-3)
        torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2 * scale)


# ------------------------------------------------------------------------------------ import
def _run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that can import autoquant the way this process does."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(autoquant.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_import_has_no_side_effects(tmp_path):
    proc = _run_python(
        """
        import sys, torch
        import autoquant.kernels as K
        loaded = [m for m in sys.modules if m.startswith("autoquant.kernels._") and "_kernel" in m]
        assert loaded == [], f"kernel modules imported (kernels decorated) at import: {loaded}"
        assert not torch.cuda.is_initialized(), "importing autoquant.kernels initialized CUDA"
        for name in ("int8_wo_mm", "int8_dyn_mm", "quantize_per_token_int8", "int4_wo_mm",
                     "fp8_rowwise_mm"):
            assert hasattr(torch.ops.autoquant, name), name
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_import_without_triton(tmp_path):
    proc = _run_python(
        """
        import sys

        # As if triton were not installed: `import triton` raises ImportError and
        # importlib.util.find_spec("triton") returns None (torch 2.14 asks it at import).
        sys.modules["triton"] = None
        import torch
        import autoquant.kernels as K
        from torch._subclasses.fake_tensor import FakeTensorMode

        assert K.HAS_TRITON is False
        x, w, s = torch.randn(2, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4)
        try:
            K.int8_wo_mm(x, w, s)
        except RuntimeError as exc:
            msg = str(exc)
            assert "Triton" in msg and "pip install triton" in msg and "_reference" in msg, msg
        else:
            raise AssertionError("int8_wo_mm ran without triton")
        with FakeTensorMode():  # shapes still propagate, so compile/export can trace the ops
            fx, fw, fs = torch.randn(2, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4)
            y = torch.ops.autoquant.int8_wo_mm(fx, fw, fs, None)
        assert tuple(y.shape) == (2, 4)
        loaded = [m for m, mod in sys.modules.items() if m.split(".")[0] == "triton" and mod]
        assert not loaded, loaded
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    assert "Triton not available" not in proc.stderr


# ------------------------------------------------------------------------------------ opcheck
@needs_triton
@pytest.mark.parametrize("op", PUBLIC_OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(op, device):
    _skip_without_fp8(op, device)
    utils = (
        "test_schema",
        "test_autograd_registration",
        "test_faketensor",
        "test_aot_dispatch_dynamic",
    )
    if op == "fp8_rowwise_mm":
        # test_schema looks for input mutation with torch.allclose, which has no float8 kernel on
        # any device; the other checks cover the fake impl and tracing.
        utils = utils[1:]
    torch.library.opcheck(
        getattr(torch.ops.autoquant, op).default, op_inputs(op, device), test_utils=utils
    )


# ------------------------------------------------------------------------------------ compile / exp
class _OpModule(torch.nn.Module):
    """forward(x...) = relu(op(x...)), the shape of a quantized linear inside a model."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, *args):
        out = _first(getattr(torch.ops.autoquant, self.op)(*args))
        return torch.relu(out) if out.is_floating_point() else out


def _expected(op: str, args: tuple) -> torch.Tensor:
    ref = _first(reference_for(op)(*args))
    return torch.relu(ref) if ref.is_floating_point() else ref


@needs_triton
@pytest.mark.parametrize("op", PUBLIC_OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(op, device):
    _skip_without_fp8(op, device)
    backend = "inductor" if device == "cuda" else "aot_eager"
    torch._dynamo.reset()
    args = op_inputs(op, device)
    compiled = torch.compile(_OpModule(op), backend=backend, fullgraph=True)
    _assert_close(compiled(*args), _expected(op, args))


class _DynamicLinear(torch.nn.Module):
    """A quantized linear built on the public Python wrappers, as candidate families call them."""

    def __init__(self, w: torch.Tensor, s: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.w, self.s, self.bias = w, s, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(K.int8_dynamic_linear(x, self.w, self.s, self.bias))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_through_python_wrappers(device):
    x, _, w, s, bias, _ = op_inputs("int8_dyn_mm", device)
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
    bias = bias.bfloat16()
    module = _DynamicLinear(w, s, bias)
    torch._dynamo.reset()
    backend = "inductor" if device == "cuda" else "aot_eager"
    y = torch.compile(module, backend=backend, fullgraph=True)(x)
    _assert_close(y, torch.relu(K.int8_dynamic_linear_reference(x, w, s, bias)))


@needs_triton
@pytest.mark.skipif(not INTERPRETER, reason="the CPU inductor run needs TRITON_INTERPRET=1")
@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="inductor's CPU backend needs a C++ compiler",
)
def test_compile_inductor_on_cpu():
    torch._dynamo.reset()
    args = op_inputs("int8_wo_mm", "cpu")
    compiled = torch.compile(_OpModule("int8_wo_mm"), backend="inductor", fullgraph=True)
    _assert_close(compiled(*args), _expected("int8_wo_mm", args))


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_export_keeps_the_custom_op(device):
    args = op_inputs("int4_wo_mm", device)
    exported = torch.export.export(_OpModule("int4_wo_mm"), args)
    assert "autoquant.int4_wo_mm" in str(exported.graph)
    _assert_close(exported.module()(*args), _expected("int4_wo_mm", args))


# ------------------------------------------------------------------------------------ availability
@needs_triton
def test_unavailable_reason_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.unavailable_reason("cpu") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = K.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_unavailable_reason_on_cuda():
    assert K.unavailable_reason("cuda") is None
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    assert (K.unavailable_reason("cuda", fp8=True) is None) == fp8_ok
