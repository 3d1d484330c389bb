"""Whether this process's Triton interpreter can run the kernels (``TRITON_INTERPRET=1``, on CPU).

Two known breaks, each found by looking at what the process has, not at version strings:

- Triton decorates its own language library (``tl.zeros``, ``tl.max``, ``tl.cdiv``, ...) once, when
  ``triton`` is first imported, for the interpreter or for the compiler, whichever
  ``TRITON_INTERPRET`` says at that moment. Imported before the switch was set, the library is
  compiler-only and every interpreted kernel fails with "Cannot call @triton.jit'd outside of the
  scope of a kernel". So one process either interprets kernels or compiles them (e.g. ahead of time
  for a GPU target), never both, and the switch must be set before the first ``import triton``.
- Every kernel here loops over K with a bound that is a runtime argument. The interpreter runs a
  kernel as Python over numpy, and turns such a bound into an ``int`` from a one-element array.
  triton 3.6's interpreter does that with ``int(array)`` on a 1-D array, which numpy 2.4 rejects,
  so with that pair every launch fails with ``InterpreterError: TypeError('only 0-dimensional
  arrays can be converted to Python scalars')``; triton 3.8 squeezes the array first. Compiled
  kernels (CUDA) never touch numpy and are not affected.

The first is read off the library's type; for the second, one tiny kernel with such a loop runs once
per process through the interpreter (about a millisecond), and whatever stops it is the reason.
Imported lazily (it imports triton), only when an interpreted kernel is about to run or a family
asks.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# What numpy says when a 1-D one-element array is converted with int() (numpy >= 2.4).
_NUMPY_SCALAR_ERROR = "only 0-dimensional arrays can be converted"


def _loop_probe(out_ptr, n):
    """Count to ``n`` in a loop whose bound is a runtime argument, as the kernels' K loops are.

    Plain Python, wrapped by InterpretedFunction on demand: ``@triton.jit`` would decide between
    the interpreter and the compiler at import, from the environment.
    """
    count = tl.zeros((1,), dtype=tl.int32)
    for _ in range(n):
        count += 1
    tl.store(out_ptr + tl.arange(0, 1), count)


@functools.cache
def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run the kernels in this process, or None when it can.

    Cached: the answer depends only on the installed triton and numpy and on how triton was first
    imported, none of which changes within a process.
    """
    if isinstance(tl.zeros, JITFunction):  # the library was decorated for the compiler
        return (
            "triton was imported before TRITON_INTERPRET=1 was set, so its language library "
            "(tl.zeros, tl.max, ...) is decorated for the compiler and interpreted kernels cannot "
            "call it: set TRITON_INTERPRET=1 before the first `import triton` of the process (one "
            "process either interprets kernels or compiles them, not both)"
        )
    out = torch.zeros(1, dtype=torch.int32)
    try:
        InterpretedFunction(_loop_probe)[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - whatever stops the probe is the reason
        import numpy

        cause = f"{type(exc).__name__}: {exc}"
        if _NUMPY_SCALAR_ERROR in str(exc):
            return (
                f"the Triton interpreter of triton {triton.__version__} cannot run loops with a "
                f"runtime bound under numpy {numpy.__version__} ({cause}): install numpy<2.4 or "
                "triton>=3.8 to run the kernels on CPU (compiled CUDA kernels are not affected)"
            )
        return (
            f"the Triton interpreter of triton {triton.__version__} failed a probe kernel ({cause})"
        )
    if int(out.item()) != 3:
        return (
            f"the Triton interpreter of triton {triton.__version__} miscounted a probe loop "
            f"({int(out.item())} instead of 3)"
        )
    return None
