"""C++ kernels for the CPU ops of ``_cpu_ops`` (``_cpu_ops.cpp``), built on first use.

Contract: :func:`load` compiles ``_cpu_ops.cpp`` against the running torch (once per machine and
torch version: torch's extension cache keeps the library, ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``) and loads it; from then on each ``autoquant::cpu_*`` op runs its
C++ kernel instead of its Python body, with the same result bit for bit (the same ATen / fbgemm /
oneDNN call on the same prepacked handle, which ``PrepackCache`` still owns). Reason: a compiled
or exported graph calls these ops once per layer call, and each call into a Python body costs
microseconds, more than fbgemm's int8 kernel at M=1 (benchmarks/results/
compile_cpu_amd-epyc-2core.txt, "python op bodies" vs the default). Eager layers do not use
the ops (their closures call fbgemm / oneDNN directly).

It is tried once per process: the first time one of these ops is traced (``torch.compile``,
``torch.export``: their fake impls call :func:`load`; inductor needs the same C++ compiler), or
called through the dispatcher (a loaded exported program: its first call runs the Python
bodies). Eager layers never trigger it, so tuning is never held up by a build. It never fails a
model: where the build fails (no compiler, no ninja), one warning says so and the Python bodies
serve. ``AUTOQUANT_NATIVE_OPS=0`` skips it.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["ENV", "KINDS", "STATE", "load", "loaded", "stats"]

ENV = "AUTOQUANT_NATIVE_OPS"
# PrepackCache's kinds, numbered as _cpu_ops.cpp's `Kind`.
KINDS = {"onednn": 0, "fbgemm_fp16": 1, "fbgemm_int8": 2, "onednn_int8": 3, "int4pack": 4}
_SOURCE = Path(__file__).with_name("_cpu_ops.cpp")

_lock = threading.Lock()
# None: not tried in this process. A dict, not a function: the Python kernels read it per call.
STATE: dict[str, bool | None] = {"loaded": None}


def loaded() -> bool:
    """Whether the C++ kernels serve the ops in this process."""
    return bool(STATE["loaded"])


def load() -> bool:
    """Build (or find built) and load the C++ kernels; False, with one warning, where that fails.

    Only tried once per process: a second call returns the first one's answer at once."""
    if STATE["loaded"] is not None:
        return bool(STATE["loaded"])
    with _lock:
        if STATE["loaded"] is None:
            STATE["loaded"] = _build_and_load()
    return bool(STATE["loaded"])


def _build_and_load() -> bool:
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    from torch.utils.cpp_extension import load as load_extension  # noqa: PLC0415 - first use only

    # One library per torch version: they share the extension folder, and a library built against
    # another torch's headers must never be loaded.
    name = "autoquant_cpu_ops_" + re.sub(r"\W", "_", torch.__version__)
    try:
        with warnings.catch_warnings():
            # Its kernels take over the CPU key from the Python kernels on purpose.
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            load_extension(name=name, sources=[str(_SOURCE)], extra_cflags=["-O2"],
                           is_python_module=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - a missing compiler, a failed build: fall back, say so
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        warnings.warn(
            f"autoquant could not build its C++ CPU kernels ({first[:300]}); compiled and exported "
            "models call the Python op bodies instead, a few microseconds more per layer call. "
            "The build needs a C++ compiler (the one torch.compile's inductor uses) and ninja on "
            f"PATH (pip install ninja), as any torch C++ extension does; {ENV}=0 skips the attempt.",
            RuntimeWarning, stacklevel=3)
        return False
    return True


def stats() -> tuple[int, int]:
    """(handles the C++ side holds now, times a C++ kernel had to ask PrepackCache); (0, 0) when
    not loaded. Tests read it: a warm compiled model asks nothing."""
    if not loaded():
        return 0, 0
    entries, misses = torch.ops.autoquant._native_stats()
    return int(entries), int(misses)
