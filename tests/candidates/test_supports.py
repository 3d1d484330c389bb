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
        (Fp8Dynamic("scaled_mm"), op(m=1, k=96, n=50)),  # row-wise _scaled_mm runs on CPU in 2.13
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
    assert cand.supports(CPU, shape) is None


def test_cpu_scalar_paths_declined_below_avx512():
    slow = torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX")
    for c in (Int8WeightOnly("int8pack"), Int4WeightOnly("tinygemm_cpu", 64)):
        reason = c.supports(CPU, op(dtype="float32"))
        assert (reason is not None and "not worth timing" in reason) == slow, reason
        assert c.supports(CPU, op(dtype="bfloat16")) is None


def test_onednn_low_precision_follows_the_cpu():
    bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert (FloatCandidate("onednn").supports(CPU, op(dtype="bfloat16")) is None) == bf16_ok


@needs_cuda
@pytest.mark.parametrize(
    "cand, shape, expect",
    [
        (Int8Dynamic("int_mm"), op(m=16), "M > 16"),
        (Int8Dynamic("int_mm"), op(m=33, k=100), "multiples of 8"),
        (Int8Dynamic("int_mm"), op(m=33, n=50), "multiples of 8"),
        (Fp8Dynamic("scaled_mm"), op(k=96 + 8), "multiples of 16"),
        (Fp8Dynamic("scaled_mm"), op(n=50, dtype="bfloat16"), "multiples of 16"),
        (Int4WeightOnly("tinygemm", 64), op(dtype="float32"), "bfloat16"),
        (Int4WeightOnly("tinygemm", 32), op(n=50, dtype="bfloat16"), "N % 8"),
        (Int4WeightOnly("triton", 256), op(), "group sizes"),
        (FloatCandidate("fbgemm_fp16"), op(), "CPU kernel"),
        (Int4WeightOnly("tinygemm_cpu", 32), op(dtype="bfloat16"), "CPU kernel"),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else (v.label() if isinstance(v, OpShape) else str(v)),
)
def test_cuda_reasons(cand, shape, expect):
    cap = torch.cuda.get_device_capability()
    if (cand.family == "fp8_dynamic" and cap < (8, 9)) or (cand.kernel == "tinygemm" and cap < (8, 0)):
        expect = "compute capability"  # the capability rule comes first on older GPUs
    reason = cand.supports(CUDA, shape)
    assert isinstance(reason, str) and expect in reason


@needs_cuda
def test_cuda_runs():
    for c in (Int8Dynamic("int_mm"), Int8WeightOnly("int8pack"), Int8WeightOnly("dequant"),
              Fp8WeightOnly("dequant"), FloatCandidate("aten", "bfloat16")):
        assert c.supports(CUDA, op(m=33, k=256, n=64, dtype="bfloat16")) is None, c.name
    assert Int4WeightOnly("tinygemm", 64).supports(CUDA, op(dtype="bfloat16")) is None
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    assert (Fp8Dynamic("scaled_mm").supports(CUDA, op(dtype="bfloat16")) is None) == fp8_ok


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
