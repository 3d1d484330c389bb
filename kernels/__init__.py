"""autoquant.kernels: Triton kernels for quantized matmuls, registered as ``torch.ops.autoquant.*``.

Public ops (each a ``torch.library.triton_op`` with a fake impl, so torch.compile and export trace
it)::

    autoquant::int8_wo_mm(x, w_int8, w_scale, bias) -> y                  int8_weight_only.py
    autoquant::quantize_per_token_int8(x) -> (x_int8, x_scale)            int8_dynamic.py
    autoquant::int8_dyn_mm(x_int8, x_scale, w_int8, w_scale, bias, out_dtype) -> y   (same)
    autoquant::int4_wo_mm(x, w_packed, scales, zeros, group_size, bias) -> y   int4_weight_only.py
    autoquant::fp8_rowwise_mm(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype) -> y  fp8_rowwise.py

The Python wrappers below check arguments (ValueError naming the argument) and raise RuntimeError
when Triton is missing. Every op has a ``*_reference`` twin in plain PyTorch with the same contract.

Importing this package has no side effects beyond registering the ops: it queries no device and
compiles nothing; it imports ``triton`` only to set ``HAS_TRITON``. Kernels are decorated on first
use, so ``TRITON_INTERPRET=1`` (run on CPU through the interpreter) must be set before the first
launch. Kernels run on CUDA tensors, or on CPU tensors under the interpreter.
"""

from ._registry import HAS_TRITON, unavailable_reason
from .fp8_rowwise import fp8_rowwise_mm, fp8_rowwise_mm_reference, quantize_rowwise_fp8_reference
from .int4_weight_only import (
    dequantize_int4_reference,
    int4_wo_mm,
    int4_wo_mm_reference,
    pack_int4,
    unpack_int4,
)
from .int8_dynamic import (
    PER_TOKEN_EPS,
    int8_dyn_mm,
    int8_dyn_mm_reference,
    int8_dynamic_linear,
    int8_dynamic_linear_reference,
    quantize_per_token_int8,
    quantize_per_token_int8_reference,
)
from .int8_weight_only import int8_wo_mm, int8_wo_mm_reference

__all__ = [
    "HAS_TRITON",
    "PER_TOKEN_EPS",
    "dequantize_int4_reference",
    "fp8_rowwise_mm",
    "fp8_rowwise_mm_reference",
    "int4_wo_mm",
    "int4_wo_mm_reference",
    "int8_dyn_mm",
    "int8_dyn_mm_reference",
    "int8_dynamic_linear",
    "int8_dynamic_linear_reference",
    "int8_wo_mm",
    "int8_wo_mm_reference",
    "pack_int4",
    "quantize_per_token_int8",
    "quantize_per_token_int8_reference",
    "quantize_rowwise_fp8_reference",
    "unavailable_reason",
    "unpack_int4",
]
