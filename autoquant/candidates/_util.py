"""Small helpers shared by the family modules: dtype names, device facts, lazy Triton ops.

Nothing here runs at import time: device facts are read when a family's ``supports()`` asks, and
``autoquant.kernels`` is imported on first use (it pulls in Triton).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..keys import parse_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_NAMES = ("float32", "bfloat16", "float16")


def op_dtype(op_dtype_name: str) -> torch.dtype | None:
    """The torch dtype an OpShape names, or None for a name torch does not know."""
    try:
        return parse_dtype(op_dtype_name)
    except ValueError:
        return None


def bad_dtype_reason(name: str, dtype: torch.dtype | None, allowed: tuple[torch.dtype, ...]) -> str | None:
    if dtype in allowed:
        return None
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    return f"{name} takes {names} activations, not {str(dtype).removeprefix('torch.')}"


def not_cpu_reason(name: str, device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"{name} is a CPU kernel (device is {device.type})"


def not_cuda_reason(name: str, device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"{name} is a CUDA kernel (device is {device.type})"
    if not torch.cuda.is_available():
        return f"{name}: CUDA is not available in this process"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{name}: no CUDA device {device.index} (this process sees {torch.cuda.device_count()})"
    return None


def cpu_scalar_only_reason(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Reason to skip CPU int8pack / int4pack kernels for non-bf16 activations below AVX-512.

    torch's CPU ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` have AVX2 micro-kernels
    for bf16 activations only. Measured on this AVX2 CPU against float32 F.linear (K=N=1024):
    float32 activations 7-13x slower at M=1 and up to 66x at M=128, float16 1.2-5x slower, while
    bf16 runs 3-5x faster. Timing the losers at large M would cost minutes per op.
    """
    if device.type != "cpu" or dtype == torch.bfloat16:
        return None
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    return (f"{name}: on this CPU ({torch.backends.cpu.get_cpu_capability()}) only bf16 activations have a "
            "vectorized kernel; float32 / float16 take a slow path (measured 7-66x / 1.2-5x slower than "
            "F.linear): not worth timing")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (cached; queried on first use, never at import)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)


def min_capability_reason(name: str, device: torch.device, need: tuple[int, int]) -> str | None:
    cap = cuda_capability(device)
    if cap < need:
        return f"{name} needs compute capability sm{need[0]}{need[1]}+, this GPU is sm{cap[0]}{cap[1]}"
    return None


def triton_required() -> bool:
    """Whether this platform declares Triton a hard dependency (pyproject.toml: Linux x86_64)."""
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def triton_op(name: str) -> tuple[Callable[..., Any] | None, str | None]:
    """(the ``autoquant.kernels`` function `name`, None), or (None, why it is unavailable).

    Where Triton is a declared dependency (Linux x86_64), a broken install is an error, raised as
    ImportError naming the cause: turning it into a quiet "unavailable" would hide it behind
    float fallbacks and skipped tests. Elsewhere a missing Triton is a reason, never an error.
    """
    from .. import kernels  # our own package: failing to import it is a bug, never a reason

    if not kernels.HAS_TRITON:
        why = kernels.unavailable_reason("cpu")  # names the import error
        if triton_required():
            raise ImportError(f"{why}. Triton is a required dependency on {platform.system()} "
                              f"{platform.machine()}: reinstall it (the version your torch build pins)")
        return None, f"not available on {platform.system()} {platform.machine()}: {why}"
    fn = getattr(kernels, name, None)
    if fn is None:
        raise AttributeError(f"autoquant.kernels has no op {name!r}: the candidate and the kernels "
                             "package disagree (a stale or partial install? reinstall autoquant)")
    return fn, None


def require_triton_op(name: str) -> Callable[..., Any]:
    fn, reason = triton_op(name)
    if fn is None:
        raise RuntimeError(reason)
    return fn


class ScalesByDtype:
    """A float scale vector cast to each activation dtype once, not per call, and recast when the
    scale tensor changes (replaced, written in place: its version moves, or ``.data`` swapped).

    Kernels such as CPU ``_weight_int8pack_mm`` insist the scales share the activation dtype; the
    packed state keeps them float32 and each reference mirrors the cast. Eager closures read
    ``source`` / ``stamp`` / ``casts`` inline (a method call per layer call costs a frame).
    """

    __slots__ = ("casts", "source", "stamp")

    def __init__(self, scale: Tensor) -> None:
        self.refill(scale)

    def refill(self, scale: Tensor) -> None:
        self.source = scale
        try:
            self.stamp: tuple[int, int] | None = (scale._version, scale.data_ptr())
        except RuntimeError:  # an inference tensor has no version: only a new tensor is noticed
            self.stamp = None
        self.casts = {dt: scale.to(dt) for dt in FLOAT_DTYPES}

    def get(self, scale: Tensor, dtype: torch.dtype) -> Tensor:
        if scale is not self.source or (self.stamp is not None and self.stamp != (scale._version, scale.data_ptr())):
            self.refill(scale)
        cast = self.casts.get(dtype)
        return scale.to(dtype) if cast is None else cast


def add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """``y + bias`` in y's dtype (bias cast when the model keeps it in another dtype)."""
    if bias is None:
        return y
    # The dtype test skips a no-op `.to` call: it costs ~1 us of dispatch in eager mode.
    return y.add_(bias if bias.dtype == y.dtype else bias.to(y.dtype))


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Pin torch's quantized engine while prepacking, so a kernel named "fbgemm" gets an fbgemm
    handle whatever engine the process chose (the handle, not the engine, picks the kernel later).
    The previous engine is restored on exit."""
    before = torch.backends.quantized.engine
    switch = name in torch.backends.quantized.supported_engines and before != name
    if switch:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        if switch:
            torch.backends.quantized.engine = before
