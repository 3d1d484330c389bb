"""Candidate families behind one protocol (DESIGN.md section 3), and the default list per device.

Importing this package registers every family (float, int8_weight_only, int8_dynamic, int8_smooth,
int4_weight_only, fp8_weight_only, fp8_dynamic) and, for the first four, one class per kernel
(``register_kernel``): ``Int8Dynamic("fbgemm")`` is an ``Int8DynamicFbgemm``, with the family's
params and JSON identity. It queries no device: device facts are read when
``default_candidates`` or a ``supports()`` is called.

>>> import torch
>>> cands = default_candidates(torch.device("cpu"), torch.float32)
>>> cands[0].name
'float(kernel=aten, compute_dtype=None)'
>>> all(candidate_from_json(c.family, c.params_json()) == c for c in cands)
True
"""

from __future__ import annotations

import torch

from . import float as _float  # noqa: F401  (registers the family)
from . import fp8 as _fp8  # noqa: F401
from . import int4_weight_only as _int4  # noqa: F401
from . import int8_dynamic as _int8_dynamic  # noqa: F401
from . import int8_smooth as _int8_smooth  # noqa: F401
from . import int8_weight_only as _int8_weight_only  # noqa: F401
from .base import CalibrationMissing, Candidate, QuantizedLinear, candidate_from_json, families, get_family, register, register_kernel
from .float import FloatCandidate, is_baseline
from .fp8 import Fp8Dynamic, Fp8WeightOnly
from .int4_weight_only import Int4WeightOnly
from .int8_dynamic import Int8Dynamic
from .int8_smooth import Int8Smooth
from .int8_weight_only import Int8WeightOnly

__all__ = [
    "CalibrationMissing",
    "Candidate",
    "FloatCandidate",
    "Fp8Dynamic",
    "Fp8WeightOnly",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8Smooth",
    "Int8WeightOnly",
    "QuantizedLinear",
    "candidate_from_json",
    "default_candidates",
    "families",
    "get_family",
    "is_baseline",
    "register",
    "register_kernel",
]

INT4_GROUP_SIZES = (32, 64, 128)
# int8_smooth's alpha in the CPU float32 defaults: on MiniLM, 0.75 beat 0.5 in held-out SQNR on most
# layers and end to end, where 0.5 was worse than no smoothing (benchmarks/results/smooth_minilm_cpu.txt).
SMOOTH_ALPHA = 0.75


def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether oneDNN reports native bf16 / fp16 compute on this CPU (AMX, avx512_bf16, ...)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def _float_cpu(dtype: torch.dtype) -> list[Candidate]:
    out: list[Candidate] = [FloatCandidate("aten")]
    if dtype == torch.float32:
        out += [FloatCandidate("onednn"), FloatCandidate("fbgemm_fp16")]
        out += [FloatCandidate("aten", name) for name, dt in (("bfloat16", torch.bfloat16),
                                                               ("float16", torch.float16))
                if _cpu_has_native(dt)]
    else:
        # bf16 / fp16 models: float32 compute is often far faster on CPUs without native units.
        out += [FloatCandidate("aten", "float32"), FloatCandidate("onednn", "float32"),
                FloatCandidate("fbgemm_fp16", "float32")]
        if _cpu_has_native(dtype):
            out.append(FloatCandidate("onednn"))
    return out


def _float_cuda(dtype: torch.dtype) -> list[Candidate]:
    out: list[Candidate] = [FloatCandidate("aten")]
    if dtype == torch.float32:
        out += [FloatCandidate("aten", "bfloat16"), FloatCandidate("aten", "float16")]
    return out


def default_candidates(device: torch.device, dtype: torch.dtype) -> list[Candidate]:
    """Every (family, params, kernel) instance worth timing on `device` for `dtype` activations.

    The float baseline ``float(kernel=aten)`` comes first. Kernels for another device type are left
    out; instances that cannot run some shape stay in and say why through ``supports()``, and a few
    are in the list knowing ``supports()`` declines them here (e.g. CPU int_mm), so the report
    names the reason. Left out everywhere: ``int8_weight_only(kernel=dequant)``, which
    materializes the float weight on every call and can never beat the baseline (build it
    explicitly when wanted). fp8_weight_only keeps its dequant kernel, its only one, on CUDA.
    Left out on CUDA: ``int8_weight_only(kernel=int8pack)``: torch's CUDA ``_weight_int8pack_mm`` is a
    naive kernel (one thread per output, float32 upcast) that never beats bf16 ``F.linear``.
    Left out on CPU: both fp8 families. A CPU has no fp8 arithmetic: ``_scaled_mm`` is a reference
    loop and the dequant kernel does F.linear plus a cast of the whole weight per call; measured
    with benchmarks/bench_e2e.py (DemoMLP h=1024) they run 9-13x slower than fp32 F.linear at
    M=1 and 2.5-3.2x slower at M=128, so timing them only cost tuning time and memory (two more
    weight builds per op). Pass them in ``candidates=`` to time them anyway.
    """
    device = torch.device(device)
    if device.type == "cuda":
        out = _float_cuda(dtype)
        out += [Int8WeightOnly("triton")]
        out += [Int8Dynamic("int_mm"), Int8Dynamic("triton")]
        out += [Int4WeightOnly(k, g) for k in ("tinygemm", "triton") for g in INT4_GROUP_SIZES]
        out += [Fp8WeightOnly("dequant"), Fp8Dynamic("scaled_mm"), Fp8Dynamic("triton")]
        return out
    out = _float_cpu(dtype)
    out += [Int8WeightOnly("int8pack")]
    out += [Int8Dynamic("fbgemm"), Int8Dynamic("onednn"), Int8Dynamic("int_mm")]
    if dtype == torch.float32:
        # Calibrated on the recorded activations (see int8_smooth): fbgemm's speed, per-token accuracy.
        out += [Int8Smooth("fbgemm", SMOOTH_ALPHA)]
    out += [Int4WeightOnly("tinygemm_cpu", g) for g in INT4_GROUP_SIZES]
    return out
