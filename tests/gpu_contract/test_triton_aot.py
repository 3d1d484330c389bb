"""Every autoquant Triton kernel compiles for sm_80 (A100) and sm_90 (H100 / H200) on this CPU.

``triton.compile`` with ``GPUTarget("cuda", arch, 32)`` runs the whole NVIDIA pipeline, ptxas
included (the triton wheel ships it), so a kernel that Triton cannot lower for a target, or whose
tiles need more shared memory than that GPU gives one block, fails here instead of on the GPU.
The compilations run in one child process without TRITON_INTERPRET (the `aot_child` fixture of
conftest.py; _aot.py says why).
Registers and local memory (spills) are collected and printed at the end of the run (and written as
JSON to $AUTOQUANT_AOT_REPORT when set); they fail a test only where clearly wrong: a 16-bit
kernel spilling more than SPILL_LIMIT_16BIT bytes per thread in a config an eager launch runs.

Which configs: every kernel x dtype x group size x architecture, with (by default) two launch
configs each, the first of the autotune list (a decode tile) and the one with the largest tiles
(the shared-memory worst case); ``AUTOQUANT_AOT_CONFIGS=all`` compiles every config the autotuner
or the eager pruning hook can launch (267 variants, ~500 compilations: tens of minutes on 2 cores).
fp8 kernels need sm_89+ and are compiled for sm_90 only.
"""

from __future__ import annotations

import os

import pytest

from . import _aot

triton = pytest.importorskip("triton", reason="Triton is not installed: nothing to compile")

# A 16-bit kernel that spills this much per thread is broken (tiles far too large for the register
# file); float32 activations use IEEE FMA dots (no tensor cores), whose spills are reported only.
SPILL_LIMIT_16BIT = 1024


def known_defect(variant: _aot.Variant, arch: int) -> str | None:  # noqa: ARG001
    """Failures reported and awaiting a fix in kernels/ (strict xfail: the test says when fixed).
    None at present; return the report's text for a (variant, arch) that fails for a known reason."""
    return None


def launched_eagerly(variant: _aot.Variant) -> bool:
    """Whether an eager launch can run this config (the pruning hook keeps it at some M bucket),
    as opposed to a config only torch.compile's autotuner, which ignores the hook, may try."""
    return bool({"eager", "fixed"} & set(variant.origins))


def _variants() -> list:
    try:
        every = [v for spec in _aot.SPECS for v in _aot.variants(spec)]
    except Exception as exc:  # noqa: BLE001 - shown as one failing test, not a collection error
        return [pytest.param(None, f"{type(exc).__name__}: {exc}", id="enumeration-failed")]
    chosen = every if os.environ.get("AUTOQUANT_AOT_CONFIGS") == "all" else _aot.sampled(every)
    out = []
    for v in chosen:
        for arch in _aot.ARCHS:
            if arch < v.spec.min_arch:
                continue
            defect = known_defect(v, arch)
            marks = [pytest.mark.xfail(reason=defect, strict=True)] if defect else []
            out.append(pytest.param(v, arch, id=f"sm{arch}-{v.id}", marks=marks))
    return out


@pytest.mark.parametrize(("variant", "arch"), _variants())
def test_kernel_compiles_within_the_target_limits(variant, arch, aot_child, aot_results):
    assert variant is not None, f"enumerating the kernels' configs failed: {arch}"
    compiled, error = aot_child.outcome(variant, arch)  # compiled in a child process (see _aot)
    if error is not None:
        pytest.fail(error, pytrace=False)
    aot_results.append(compiled)
    limit = _aot.SMEM_LIMIT_BYTES[arch]
    assert compiled.shared_bytes <= limit, (
        f"{variant.id} needs {compiled.shared_bytes} bytes of shared memory per block on sm_{arch}, "
        f"over the {limit} a block may opt into: Triton would refuse to launch it there (shrink "
        "BLOCK_* or num_stages for this config in kernels/)")
    if variant.dtype != "float32" and compiled.local_bytes is not None and launched_eagerly(variant):
        assert compiled.local_bytes <= SPILL_LIMIT_16BIT, (
            f"{variant.id} spills {compiled.local_bytes} bytes per thread to local memory on sm_{arch} "
            f"({compiled.registers} registers): its tiles are too large for the register file")


def test_every_kernel_module_is_covered():
    """A new Triton kernel in kernels/ must get a KernelSpec, or it is never compiled here."""
    import pkgutil

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    covered = {(s.module, s.attr) for s in _aot.SPECS}
    found = set()
    for info in pkgutil.iter_modules([_aot.kernels_dir()]):
        if not info.name.endswith("_kernel"):
            continue
        module = _aot.kernel_module(info.name)
        for attr, value in vars(module).items():
            if attr.isupper() and isinstance(value, (Autotuner, JITFunction)):
                found.add((info.name, attr))
    assert found, "no kernel modules found in autoquant.kernels"
    assert found <= covered, f"kernels without a KernelSpec in tests/gpu_contract/_aot.py: {sorted(found - covered)}"
