"""supports(): the documented rules, and never an exception whatever the device and shape."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoquant.candidates import (
    FloatCandidate,
    Fp8Dynamic,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
)
from autoquant.candidates.fp8 import cpu_rowwise_scaled_mm_reason
from autoquant.keys import OpShape

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU in this process")
ALL_KERNELS = (
    [FloatCandidate(k, cd) for k in ("aten", "onednn", "fbgemm_fp16")
     for cd in (None, "float32", "bfloat16", "float16")]
    + [Int8WeightOnly(k) for k in ("int8pack", "dequant", "triton")]
    + [Int8Dynamic(k) for k in ("int_mm", "fbgemm", "onednn", "triton")]
    + [Int4WeightOnly(k, g) for k in ("tinygemm_cpu", "tinygemm", "triton") for g in (32, 64, 128, 256)]
    + [Fp8WeightOnly("dequant"), Fp8Dynamic("scaled_mm"), Fp8Dynamic("triton")]
)


def op(m=33, k=256, n=64, dtype="float32", bias=True):
    return OpShape(m, k, n, bias, dtype)


@pytest.mark.parametrize(
    "cand, device, shape, expect",
    [
        (Int4WeightOnly("tinygemm_cpu", 64), CPU, op(k=96, dtype="bfloat16"), "not a multiple of group_size"),
        (Int4WeightOnly("tinygemm_cpu", 128), CPU, op(k=96, dtype="bfloat16"), "not a multiple of group_size"),
        (Int4WeightOnly("tinygemm_cpu", 32), CPU, op(k=96, n=50, dtype="bfloat16"), "N % 16"),
        (Int4WeightOnly("tinygemm", 32), CPU, op(dtype="bfloat16"), "CUDA kernel"),
        (Int4WeightOnly("triton", 64), CPU, op(), "CUDA kernel"),
        (Int8Dynamic("int_mm"), CPU, op(), "not worth timing"),
        (Int8Dynamic("triton"), CPU, op(), "CUDA kernel"),
        (Int8Dynamic("fbgemm"), CUDA, op(), "CPU kernel"),
        (Int8WeightOnly("triton"), CPU, op(), "CUDA kernel"),
        (FloatCandidate("onednn"), CUDA, op(), "CPU kernel"),
        (FloatCandidate("fbgemm_fp16"), CPU, op(dtype="bfloat16"), "float32"),
        (Fp8Dynamic("triton"), CPU, op(), "CUDA kernel"),
        (Int8WeightOnly("dequant"), CPU, op(dtype="int8"), "activations"),
        (Fp8WeightOnly("dequant"), CPU, op(dtype="no_such_dtype"), "activations"),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else (v.label() if isinstance(v, OpShape) else str(v)),
)
def test_reasons(cand, device, shape, expect):
    reason = cand.supports(device, shape)
    assert isinstance(reason, str) and expect in reason


@pytest.mark.parametrize(
    "cand, shape",
    [
        (Int8Dynamic("fbgemm"), op(m=1, k=96, n=50)),
        (Int8Dynamic("onednn"), op(m=7, k=96, n=50, dtype="bfloat16")),
        (Fp8Dynamic("scaled_mm"), op(m=1, k=96, n=50)),  # where CPU _scaled_mm takes row-wise scales
        (Fp8WeightOnly("dequant"), op(m=3, k=5, n=3)),
        (FloatCandidate("onednn"), op(m=1, k=96, n=50)),
        (FloatCandidate("onednn", "float32"), op(dtype="bfloat16")),
        (FloatCandidate("fbgemm_fp16", "float32"), op(dtype="bfloat16")),
        (Int4WeightOnly("tinygemm_cpu", 32), op(k=96, n=64, dtype="bfloat16")),
        (Int8WeightOnly("int8pack"), op(dtype="bfloat16")),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else v.label(),
)
def test_cpu_runs(cand, shape):
    # Every one runs on CPU, except fp8_dynamic/scaled_mm on a build whose CPU _scaled_mm takes
    # per-tensor scales only (torch 2.11): it says so (the probe itself is checked just below).
    rowwise = isinstance(cand, Fp8Dynamic) and cand.kernel == "scaled_mm"
    assert cand.supports(CPU, shape) == (cpu_rowwise_scaled_mm_reason() if rowwise else None)


def _cpu_rowwise_scaled_mm_runs() -> bool:
    """Whether this build's CPU torch._scaled_mm takes row-wise scales: a 2x16 @ 16x2 e4m3 product
    with scale_a [2, 1] and scale_b [1, 2], checked against the float product it stands for."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(2, 16, generator=gen).to(torch.float8_e4m3fn)
    scale_a, scale_b = torch.tensor([[0.5], [2.0]]), torch.tensor([[0.25, 4.0]])
    try:
        y = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    except RuntimeError:
        return False
    torch.testing.assert_close(y, (a.float() * scale_a) @ (b.float() * scale_b.t()).t())
    return True


def test_cpu_rowwise_scaled_mm_reason_matches_the_build():
    """The fp8 probe says None exactly where row-wise _scaled_mm runs on this CPU build, and where
    it does not, a reason naming the rejection and torch's own words."""
    reason = cpu_rowwise_scaled_mm_reason()
    assert (reason is None) == _cpu_rowwise_scaled_mm_runs(), reason
    if reason is not None:
        assert "rejects row-wise scales" in reason and "per-tensor scaling" in reason, reason
        assert Fp8Dynamic("scaled_mm").supports(CPU, op(dtype="bfloat16")) == reason


def test_cpu_scalar_paths_declined_below_avx512():
    slow = torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX")
    for c in (Int8WeightOnly("int8pack"), Int4WeightOnly("tinygemm_cpu", 64)):
        reason = c.supports(CPU, op(dtype="float32"))
        assert (reason is not None and "not worth timing" in reason) == slow, reason
        assert c.supports(CPU, op(dtype="bfloat16")) is None


def test_onednn_low_precision_follows_the_cpu():
    bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert (FloatCandidate("onednn").supports(CPU, op(dtype="bfloat16")) is None) == bf16_ok


CUDA_RULES = [
    (Int8Dynamic("int_mm"), op(m=16), "M > 16"),
    (Int8Dynamic("int_mm"), op(m=33, k=100), "multiples of 8"),
    (Int8Dynamic("int_mm"), op(m=33, n=50), "multiples of 8"),
    # At small M too: the hard rule before the M > 16 speed decline, whose forced run zero-pads M
    # but cannot fix N (the H200 run: _int_mm raised on N=50 where the reason said "not worth timing").
    (Int8Dynamic("int_mm"), op(m=1, n=50), "multiples of 8"),
    (Fp8Dynamic("scaled_mm"), op(k=96 + 8), "multiples of 16"),
    (Fp8Dynamic("scaled_mm"), op(n=50, dtype="bfloat16"), "multiples of 16"),
    (Int4WeightOnly("tinygemm", 64), op(dtype="float32"), "bfloat16"),
    (Int4WeightOnly("tinygemm", 32), op(n=50, dtype="bfloat16"), "N % 8"),
    (Int4WeightOnly("triton", 256), op(), "group sizes"),
    (FloatCandidate("fbgemm_fp16"), op(), "CPU kernel"),
    (Int4WeightOnly("tinygemm_cpu", 32), op(dtype="bfloat16"), "CPU kernel"),
]
_IDS = lambda v: v.name if hasattr(v, "name") else (v.label() if isinstance(v, OpShape) else str(v))  # noqa: E731


def _expect_on(cand, cap, expect):
    if (cand.family == "fp8_dynamic" and cap < (8, 9)) or (cand.kernel == "tinygemm" and cap < (8, 0)
                                                             and expect != "bfloat16"):
        return "compute capability"  # the capability rule comes first on older GPUs (after dtype)
    return expect


@pytest.fixture(params=[(9, 0), (8, 0), (7, 5)], ids=lambda c: f"sm{c[0]}{c[1]}")
def fake_cuda(request, monkeypatch):
    """A process that believes it has one CUDA GPU of the given compute capability: the CUDA rules
    of supports() run on a CPU machine. (supports() reads only these facts; nothing launches.)"""
    from autoquant.candidates import _util

    cap = request.param
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    cached = getattr(_util, "_capability", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
        request.addfinalizer(cached.cache_clear)  # no faked capability outlives the test
    return cap


@pytest.mark.parametrize("cand, shape, expect", CUDA_RULES, ids=_IDS)
def test_cuda_reasons_on_a_faked_gpu(fake_cuda, cand, shape, expect):
    reason = cand.supports(CUDA, shape)
    assert isinstance(reason, str) and _expect_on(cand, fake_cuda, expect) in reason, reason


def test_cuda_runs_on_a_faked_gpu(fake_cuda):
    cap = fake_cuda
    for c in (Int8Dynamic("int_mm"), Int8WeightOnly("int8pack"), Int8WeightOnly("dequant"), Int8WeightOnly("triton"),
              Int8Dynamic("triton"), Fp8WeightOnly("dequant"), FloatCandidate("aten", "bfloat16")):
        assert c.supports(CUDA, op(m=33, k=256, n=64, dtype="bfloat16")) is None, c.name
    assert (Int4WeightOnly("tinygemm", 64).supports(CUDA, op(dtype="bfloat16")) is None) == (cap >= (8, 0))
    assert Int4WeightOnly("triton", 64).supports(CUDA, op(dtype="bfloat16")) is None
    for c in (Fp8Dynamic("scaled_mm"), Fp8Dynamic("triton")):
        assert (c.supports(CUDA, op(dtype="bfloat16")) is None) == (cap >= (8, 9)), c.name
    # a device index the process does not have
    assert "no CUDA device 3" in Int8Dynamic("int_mm").supports(torch.device("cuda:3"), op())


@needs_cuda
@pytest.mark.parametrize("cand, shape, expect", CUDA_RULES, ids=_IDS)
def test_cuda_reasons(cand, shape, expect):
    reason = cand.supports(CUDA, shape)
    assert isinstance(reason, str) and _expect_on(cand, torch.cuda.get_device_capability(), expect) in reason


@needs_cuda
def test_cuda_runs():
    for c in (Int8Dynamic("int_mm"), Int8WeightOnly("int8pack"), Int8WeightOnly("dequant"),
              Fp8WeightOnly("dequant"), FloatCandidate("aten", "bfloat16")):
        assert c.supports(CUDA, op(m=33, k=256, n=64, dtype="bfloat16")) is None, c.name
    assert Int4WeightOnly("tinygemm", 64).supports(CUDA, op(dtype="bfloat16")) is None
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    assert (Fp8Dynamic("scaled_mm").supports(CUDA, op(dtype="bfloat16")) is None) == fp8_ok


# ---- Triton: a required dependency on Linux x86_64 -------------------------------------------------
def test_broken_triton_is_an_error_where_it_is_required(monkeypatch, fake_cuda):
    """A Triton that fails to import must not become a quiet "unavailable" where it is a declared
    dependency; elsewhere it is a reason, and supports() does not raise."""
    import autoquant.kernels as kernels
    from autoquant.candidates import _util

    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setattr(kernels._registry, "HAS_TRITON", False)
    monkeypatch.setattr(kernels._registry, "TRITON_IMPORT_ERROR", "ImportError: broken for this test")
    monkeypatch.setattr(_util, "triton_required", lambda: True)
    with pytest.raises(ImportError, match="broken for this test.*required dependency"):
        _util.triton_op("int8_wo_mm")
    with pytest.raises(ImportError, match="broken for this test"):
        Int8WeightOnly("triton").supports(CUDA, op())
    monkeypatch.setattr(_util, "triton_required", lambda: False)
    fn, reason = _util.triton_op("int8_wo_mm")
    assert fn is None and "broken for this test" in reason
    reason = Int8WeightOnly("triton").supports(CUDA, op())
    assert isinstance(reason, str) and "broken for this test" in reason


def test_triton_is_required_exactly_where_pyproject_says():
    import platform
    import sys

    from autoquant.candidates._util import triton_required

    assert triton_required() == (sys.platform.startswith("linux") and platform.machine() == "x86_64")


def test_unknown_triton_op_is_an_error():
    from autoquant.candidates._util import triton_op

    if triton_op("int8_wo_mm")[0] is None:
        pytest.skip("Triton is not available on this platform")
    with pytest.raises(AttributeError, match="no op 'no_such_op'"):
        triton_op("no_such_op")


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 5000), k=st.integers(1, 20000), n=st.integers(1, 20000), bias=st.booleans(),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "float64", "int8", "float8_e4m3fn", "nonsense"]),
    device=st.sampled_from(["cpu", "cuda", "cuda:7", "meta", "mps"]),
)
def test_supports_never_raises(m, k, n, bias, dtype, device):
    shape = OpShape(m, k, n, bias, dtype)
    for c in ALL_KERNELS:
        reason = c.supports(torch.device(device), shape)
        assert reason is None or (isinstance(reason, str) and reason.strip()), (c.name, reason)
        if dtype not in ("float32", "bfloat16", "float16"):
            assert reason is not None, (c.name, dtype)
