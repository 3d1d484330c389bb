"""Triton availability, lazy kernel loading and launch routing shared by the kernel families.

Import-time behaviour: this module tries ``import triton`` once to fill ``HAS_TRITON`` and nothing
else. It queries no device and decorates or compiles no kernel. Each family keeps its Triton source
in a private ``_*_kernel.py`` module that is imported on first use (``load_kernels``), so the Triton
interpreter switch ``TRITON_INTERPRET=1`` (read by ``@triton.jit`` when it decorates) only has to be
set before the first kernel launch, not before ``import autoquant.kernels``.

Launch routing. Every public op is a ``torch.library.triton_op`` (a ``custom_op`` when Triton is
missing, see ``define_op``). Its body runs the kernel inline through ``torch.library.wrap_triton``
only where that is traceable: compiled (not interpreted) kernels on CUDA tensors. Everything else
goes through a private opaque ``custom_op`` (``autoquant::_<op>_opaque``) with a fake impl:

- interpreted kernels (``TRITON_INTERPRET=1``, CPU or CUDA tensors): ``wrap_triton`` hands back the
  raw interpreted kernel, which would read data pointers of fake tensors while tracing and vanish
  from a compiled graph, so it must stay behind an opaque op, which launches it directly (never
  through ``wrap_triton``: see ``launcher``);
- no Triton, or a non-CUDA tensor without the interpreter: the opaque op's fake impl still lets
  torch.compile / export trace shapes, and its real impl raises a clear RuntimeError.
"""

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

TRITON_IMPORT_ERROR: str | None
try:
    import triton  # noqa: F401  (only to learn whether it imports)

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001  (a broken triton must not break our import)
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

INTERPRETER_HINT = (
    "set TRITON_INTERPRET=1 before the first kernel launch to run the kernels on CPU through the "
    "Triton interpreter (slow, for tests), or pass CUDA tensors"
)


def require_triton(what: str) -> None:
    """Raise a RuntimeError naming Triton and the remedy when ``import triton`` failed."""
    if not HAS_TRITON:
        short = what.split("::")[-1]
        raise RuntimeError(
            f"{what} needs Triton, which could not be imported ({TRITON_IMPORT_ERROR}). "
            "Install it with `pip install triton` (CUDA builds of torch ship a matching one), "
            f"or use autoquant.kernels.{short}_reference, the plain-PyTorch implementation of the "
            "same contract."
        )


def unavailable_reason(device: torch.device | str, *, fp8: bool = False) -> str | None:
    """Why the Triton kernels cannot run on ``device`` now, or None when they can.

    Meant for a candidate family's ``supports()``. It reads the interpreter switch as it stands
    (kernels are decorated on first launch) and queries the GPU only when asked about CUDA. ``fp8``
    adds the compute-capability requirement of fp8_rowwise_mm.
    """
    device = torch.device(device)
    if not HAS_TRITON:
        return f"Triton is not importable ({TRITON_IMPORT_ERROR}); pip install triton"
    import triton

    interpreted = bool(triton.knobs.runtime.interpret)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if fp8 and not interpreted and torch.cuda.get_device_capability(device) < (8, 9):
            return "fp8 tensor cores need CUDA compute capability >= 8.9"
        return interpreter_problem() if interpreted else None
    if interpreted:
        return interpreter_problem()
    return f"Triton kernels need CUDA tensors on {device.type}; {INTERPRETER_HINT}"


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run the kernels here (None when it can; see _interpreter)."""
    from ._interpreter import interpreter_problem as probe

    return probe()


def define_op(qualname: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator registering a public op: ``torch.library.triton_op`` when Triton is installed.

    Without Triton the op becomes a ``custom_op`` whose fake impl is the same function (it only
    routes to the opaque op, whose fake impl gives shapes); that keeps torch.compile / export
    tracing working and avoids triton_op's "Triton not available" warning at import, while a real
    call raises through ``require_triton``.
    """

    def register(fn: Callable[..., Any]) -> Any:
        if HAS_TRITON:
            return torch.library.triton_op(qualname, mutates_args=())(fn)
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register


def load_kernels(module: str, what: str) -> ModuleType:
    """Import the private Triton module ``kernels/<module>.py`` (decorating its kernels)."""
    require_triton(what)
    return importlib.import_module(f".{module}", __package__)


@functools.cache
def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a jit function, maybe under autotune/heuristics) runs interpreted.

    Cached: a kernel object never changes mode, and this sits on every launch's path.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(kernel, (InterpretedFunction, JITFunction)) and seen < 8:
        kernel = getattr(kernel, "fn", None)
        seen += 1
    return isinstance(kernel, InterpretedFunction)


def launches_inline(kernel_module: str, what: str, device: torch.device) -> bool:
    """Whether a triton_op body may launch the kernel via wrap_triton (traceable) on ``device``.

    False means: route through the family's opaque custom op (interpreter, or a clear error).
    """
    if not HAS_TRITON or device.type != "cuda":
        return False
    module = load_kernels(kernel_module, what)
    return not is_interpreted(module.KERNEL)


def check_launchable(kernel: object, device: torch.device, what: str) -> None:
    """Raise a RuntimeError when ``kernel`` cannot run on ``device``: a compiled kernel off CUDA,
    or an interpreted one where the interpreter fails its probe (named instead of a numpy error
    from deep inside the interpreter)."""
    interpreted = is_interpreted(kernel)
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"{what}: Triton kernels are compiled for CUDA but the tensors are on {device}; "
            f"{INTERPRETER_HINT}."
        )
    problem = interpreter_problem() if interpreted else None
    if problem:
        raise RuntimeError(f"{what}: {problem}")


def launcher(kernel: Any, device: torch.device) -> Any:
    """What to index with a grid and call to launch ``kernel`` on ``device``'s tensors.

    ``torch.library.wrap_triton(kernel)`` where a triton_op body launches inline (a compiled kernel
    on CUDA, so torch.compile sees the kernel), the kernel itself everywhere else (inside the opaque
    ops). wrap_triton must never see an interpreted kernel: torch 2.11 rejects a plain interpreted
    ``@triton.jit`` ("wrap_triton only works on functions annotated with triton.jit or
    triton.autotune") and, while its tracing switch is on, follows ``.fn`` from an interpreted
    autotuner down to a bare Python function ("'function' object has no attribute 'fn'").
    """
    if device.type == "cuda" and not is_interpreted(kernel):
        return torch.library.wrap_triton(kernel)
    return kernel


def m_bucket(m: int) -> int:
    """Autotuning key for M: the next power of two, at least 16 and at most 1024.

    Keying the autotuner on M itself would re-tune for every new batch size seen while decoding; a
    bucket re-tunes at most 7 times per (N, K). Written with comparisons only, so a symbolic M under
    torch.compile turns into range guards instead of a specialization on its exact value.
    """
    bucket = 16
    while bucket < 1024 and m > bucket:
        bucket *= 2
    return bucket
