"""Helpers shared by the test packages: SQNR, seeded layers, and the tolerance tables.

Tolerances are SQNR floors in dB (signal = the reference output):

- KERNEL_VS_REFERENCE_DB: a kernel against its own plain-PyTorch ``reference()``, which mirrors its
  rounding. Measured on CPU (torch 2.13): bf16 bit-exact, fp32 >= 118 dB, fp16 >= 86 dB. The floors
  leave room for another summation order (CUDA: accumulation order can flip the last bit of a bf16
  output, one ulp = 2^-8 relative, ~48 dB even if every element flipped).
- OUTPUT_DTYPE_CAP_DB: the best any kernel can do against float32 math once its output is rounded
  to the activation dtype (bf16 rounding alone measures ~55 dB on these shapes, fp16 ~73 dB).
  Accuracy vs F.linear is checked against min(candidate.min_sqnr_db, this cap).
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import pytest
import torch
from torch import Tensor

from autoquant.primitives import sqnr

__all__ = [
    "DTYPES_BY_DEVICE",
    "KERNEL_VS_REFERENCE_DB",
    "OUTPUT_DTYPE_CAP_DB",
    "accuracy_floor",
    "dtype_id",
    "float_reference",
    "kernel_floor",
    "make_input",
    "make_linear",
    "require_module",
    "running_in_ci",
    "sqnr",
]

KERNEL_VS_REFERENCE_DB = {
    ("cpu", torch.float32): 100.0,
    ("cpu", torch.bfloat16): 60.0,
    ("cpu", torch.float16): 75.0,
    ("cuda", torch.float32): 80.0,
    ("cuda", torch.bfloat16): 40.0,
    ("cuda", torch.float16): 55.0,
}
OUTPUT_DTYPE_CAP_DB = {torch.float32: math.inf, torch.bfloat16: 40.0, torch.float16: 55.0}
# Activation dtypes exercised per device: fp16 only on CUDA (CPU fp16 matmuls are slow scalar loops).
DTYPES_BY_DEVICE = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}
# Eight sentences for the MiniLM tests (tests/test_e2e.py, tests/core/test_accuracy_budget.py).
SENTENCES = (
    "autoquant picks the fastest kernel for each layer.",
    "The cat sat on the mat while the rain fell outside.",
    "Quantized int8 matrix multiplication on a CPU.",
    "A short one.",
    "Tuning caches are shared across a team of engineers deploying models.",
    "Sentence embeddings compare meaning, not spelling.",
    "PostgreSQL and SQLite store the measurements.",
    "What is the capital of France?",
)


def running_in_ci() -> bool:
    """Whether the CI environment variable is set (to anything but "", "0", "false" or "no")."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_module(name: str) -> ModuleType:
    """Import `name`, a package of the [dev] extra. Missing: skip with the install command, or, in
    CI, fail: a CI run must never pass by skipping what it was meant to test."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        msg = (f"{name} is not installed ({exc}); it is in the [dev] extra: "
               "pip install -e '.[dev]'")
        if running_in_ci():
            pytest.fail(f"{msg}. CI is set, so a missing dev extra is a failure", pytrace=False)
        pytest.skip(msg)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_floor(device: torch.device, dtype: torch.dtype, cand=None) -> float:
    """Kernel-vs-own-reference floor. CUDA fp8 ``_scaled_mm`` writes bf16 whatever the activation
    dtype (row-wise scaling), so its floor is the bf16 one."""
    dev = torch.device(device).type
    if dev == "cuda" and cand is not None and (cand.family, cand.kernel) == ("fp8_dynamic", "scaled_mm"):
        dtype = torch.bfloat16
    return KERNEL_VS_REFERENCE_DB[(dev, dtype)]


def accuracy_floor(min_sqnr_db: float, dtype: torch.dtype) -> float:
    return min(min_sqnr_db, OUTPUT_DTYPE_CAP_DB[dtype])


def make_linear(k: int, n: int, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu",
                bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """A random normal nn.Linear weight [N, K] (and bias [N]) drawn on CPU from `seed`, then moved:
    the same numbers on every device."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    w = w.to(device=device, dtype=dtype)
    return w, None if b is None else b.to(device=device, dtype=dtype)


def make_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1,
               device: str | torch.device = "cpu") -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def act_absmax(k: int, device: str | torch.device = "cpu", seed: int = 9) -> Tensor:
    """Per-input-channel absmax (float32 [K]) of 256 seeded normal activation rows, like the inputs
    of make_input: the statistics calibrated candidates (int8_smooth) are built from in tests;
    other candidates ignore them (``Candidate.build(..., act_absmax=...)``)."""
    return make_input((256, k), torch.float32, seed=seed, device=device).abs().amax(dim=0)


def float_reference(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """F.linear in float64 on the (already rounded) inputs: the 'float32 math' accuracy yardstick."""
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


# ---- candidate instances under test ---------------------------------------------------------------
def all_instances(device_type: str, dtype: torch.dtype, calibrated: bool = False) -> list:
    """`default_candidates` for (device type, activation dtype) plus the instances it leaves out on
    purpose (dequant fallback, lossy float compute dtypes, fp8 on CPU), each once. Calibrated ones
    (int8_smooth), which need ``build(..., act_absmax=...)``, only with `calibrated`."""
    from autoquant.candidates import (
        FloatCandidate,
        Fp8Dynamic,
        Fp8WeightOnly,
        Int8Dynamic,
        Int8WeightOnly,
        default_candidates,
    )

    cands = list(default_candidates(torch.device(device_type), dtype))
    cands.append(Int8WeightOnly("dequant"))
    if device_type == "cpu":
        cands += [Int8Dynamic("int_mm"), Fp8WeightOnly("dequant"), Fp8Dynamic("scaled_mm")]
    if dtype == torch.float32:
        cands += [FloatCandidate("aten", "bfloat16"), FloatCandidate("aten", "float16")]
    return [c for c in dict.fromkeys(cands) if calibrated or not c.calibrated]


def candidate_id(c) -> str:
    inner = ",".join(f"{k}={v}" for k, v in c.params().items() if v is not None)
    return f"{c.family}[{inner}]"


def instance_params(shapes: tuple[tuple[int, int], ...]) -> list:
    """pytest params (device type, dtype, candidate, (K, N)) with readable ids, calibrated
    candidates included (build them with ``act_absmax=act_absmax(K)``); CUDA ones skip with a
    reason when no GPU is present."""
    import pytest

    out = []
    for dev, dtypes in DTYPES_BY_DEVICE.items():
        marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU in this process")] \
            if dev == "cuda" else []
        for dtype in dtypes:
            for c in all_instances(dev, dtype, calibrated=True):
                for k, n in shapes:
                    out.append(pytest.param(dev, dtype, c, (k, n), marks=marks,
                                            id=f"{dev}-{dtype_id(dtype)}-K{k}xN{n}-{candidate_id(c)}"))
    return out
