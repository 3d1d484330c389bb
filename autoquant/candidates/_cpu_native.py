"""C++ kernels for the CPU ops of ``_cpu_ops`` (``_cpu_ops.cpp``), built on first use.

Contract: :func:`load` compiles ``_cpu_ops.cpp`` against the running torch (once per machine and
torch version, kept in :func:`build_directory`) and loads it; from then on each
``autoquant::cpu_*`` op runs its C++ kernel instead of its Python body, with the same result bit
for bit (the same ATen / fbgemm / oneDNN call on the same prepacked handle, which
``PrepackCache`` still owns). Reason: a compiled
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

import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["ENV", "KINDS", "STALE_LOCK_S", "build_directory", "load", "loaded", "stats"]

log = logging.getLogger(__name__)

ENV = "AUTOQUANT_NATIVE_OPS"
# PrepackCache's kinds, numbered as _cpu_ops.cpp's `Kind`.
KINDS = {"onednn": 0, "fbgemm_fp16": 1, "fbgemm_int8": 2, "onednn_int8": 3, "int4pack": 4}
_SOURCE = Path(__file__).with_name("_cpu_ops.cpp")
STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build (one takes ~10 s)

_lock = threading.Lock()
_state: dict[str, bool | None] = {"loaded": None}  # None: not tried in this process


def loaded() -> bool:
    """Whether the C++ kernels serve the ops in this process."""
    return bool(_state["loaded"])


def load() -> bool:
    """Build (or find built) and load the C++ kernels; False, with one warning, where that fails.

    Only tried once per process: a second call returns the first one's answer at once."""
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    with _lock:
        if _state["loaded"] is None:
            _state["loaded"] = _build_and_load()
    return bool(_state["loaded"])


def build_directory() -> Path:
    """Where the library is built and kept: ``$TORCH_EXTENSIONS_DIR/<name>`` (torch's own setting
    for extension builds) or autoquant's cache folder ``<user cache>/autoquant/cpp/<name>``, the
    name carrying the torch version: a library built against another torch's headers must never
    be loaded."""
    import platformdirs  # noqa: PLC0415 - first use only

    base = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(platformdirs.user_cache_dir("autoquant")) / "cpp")
    return Path(base) / ("autoquant_cpu_ops_" + re.sub(r"\W", "_", torch.__version__))


def _waits_on_lock_files() -> bool:
    """Whether this torch's extension build waits on the mere existence of ``<folder>/lock``
    (``FileBaton``: torch 2.11-2.13). Newer ones hold an OS advisory lock on that file (which
    dies with its process, and whose file stays after a normal build): never to be removed."""
    import torch.utils.cpp_extension as cpp_extension  # noqa: PLC0415 - first use only

    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


def _remove_stale_lock(folder: Path) -> None:
    """torch's extension build (where it uses lock files, see _waits_on_lock_files) holds
    ``<folder>/lock`` while it builds and waits, forever, while that file exists: a build killed
    midway (SIGKILL, a lost machine) would hang every later compile. A build takes seconds; a
    lock older than STALE_LOCK_S is such a leftover."""
    if not _waits_on_lock_files():
        return
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s: left %.0f s ago by a C++ kernel build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


def _build_and_load() -> bool:
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    from torch.utils.cpp_extension import load as load_extension  # noqa: PLC0415 - first use only

    started = time.perf_counter()
    try:
        folder = build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(folder)
        load_extension(name=folder.name, sources=[str(_SOURCE)], extra_cflags=["-O2"],
                       build_directory=str(folder), is_python_module=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - a missing compiler, a failed build: fall back, say so
        # A failed build's message starts with the compiler's command line: quote its first error.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "error:" in line), lines[0] if lines else type(exc).__name__)
        warnings.warn(
            f"autoquant could not build its C++ CPU kernels ({first[:300]}); compiled and exported "
            "models call the Python op bodies instead, a few microseconds more per layer call. "
            "The build needs a C++ compiler (the one torch.compile's inductor uses) and ninja on "
            f"PATH (pip install ninja), as any torch C++ extension does; {ENV}=0 skips the attempt.",
            RuntimeWarning, stacklevel=3)
        return False
    log.info("C++ CPU kernels loaded from %s in %.1f s", folder, time.perf_counter() - started)
    return True


def stats() -> tuple[int, int]:
    """(handles the C++ side holds now, times a C++ kernel had to ask PrepackCache); (0, 0) when
    not loaded. Tests read it: a warm compiled model asks nothing."""
    if not loaded():
        return 0, 0
    entries, misses = torch.ops.autoquant._native_stats()
    return int(entries), int(misses)
