"""The C++ kernels of the CPU ops (autoquant/candidates/_cpu_ops.cpp, loaded by _cpu_native).

What compiled and exported graphs call once per layer call. Each must give its Python body's
bits (the registered op vs the body called directly), follow its weight through in-place writes,
swaps and replacements like PrepackCache does, let a handle die with its weight, ask PrepackCache
nothing once warm, and, where it cannot be built, leave the Python bodies serving with one warning.
CI has the C++ compiler inductor needs, so the build is asserted, not skipped.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch

from autoquant.candidates import Int4WeightOnly, Int8Dynamic
from autoquant.candidates import _cpu_native as native
from autoquant.candidates import _cpu_ops as ops

OPS = ("cpu_onednn_linear", "cpu_fbgemm_fp16_linear", "cpu_fbgemm_int8_linear", "cpu_onednn_qlinear",
       "cpu_int4pack_mm")


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert native.load(), "the C++ kernels must build where inductor's C++ compiler exists"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cases(seed: int, m: int = 5, k: int = 64, n: int = 48, lead: tuple[int, ...] = ()):
    """(op name, registered op, Python body, args) per op: new weights each call."""
    g = _gen(seed)
    x = torch.randn(*lead, m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    w_int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) / 64 + 1e-3
    x_u8 = torch.randint(0, 256, (*lead, m, k), dtype=torch.uint8, generator=g)
    w_int4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    sz = torch.randn(k // 32, n, 2, generator=g)
    x2 = x.reshape(-1, k)  # the int4 op takes 2-D x (its closure folds leading dims)
    return [
        ("cpu_onednn_linear", ops._onednn_linear_op, ops._onednn_linear_impl, (x, w, b)),
        ("cpu_onednn_linear", ops._onednn_linear_op, ops._onednn_linear_impl,
         (x.bfloat16(), w.bfloat16(), None)),
        ("cpu_fbgemm_fp16_linear", ops._fbgemm_fp16_op, ops._fbgemm_fp16_impl, (x, w.half())),
        ("cpu_fbgemm_int8_linear", ops._fbgemm_int8_op, ops._fbgemm_int8_impl, (x, w_int8, w_scale)),
        ("cpu_onednn_qlinear", ops._onednn_qlinear_op, ops._onednn_qlinear_impl, (x_u8, 128, w_int8, w_scale)),
        ("cpu_int4pack_mm", ops._int4pack_op, ops._int4pack_impl, (x2, w_int4, sz, 32)),
        ("cpu_int4pack_mm", ops._int4pack_op, ops._int4pack_impl, (x2.bfloat16(), w_int4, sz.bfloat16(), 32)),
    ]


def test_every_cpu_op_runs_its_cpp_kernel():
    for name in OPS:
        dump = torch._C._dispatch_dump(f"autoquant::{name}")
        cpu = [line for line in dump.splitlines() if line.startswith("CPU:")]
        assert cpu and "_cpu_ops.cpp" in cpu[0], dump


@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "3d"])
def test_cpp_kernels_give_the_python_bodies_bits(lead):
    for name, op, body, args in _cases(0, lead=lead):
        if name == "cpu_int4pack_mm" and lead:
            continue  # 2-D only (the same x either way, folded)
        want = body(*args)
        got = op(*args)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
        assert torch.equal(op(*args), want), f"{name}: the warm call differs from the first"


def test_warm_calls_ask_prepack_cache_nothing():
    cases = _cases(1)
    for _, op, _, args in cases:
        op(*args)
    entries, misses = native.stats()
    builds = ops.PREPACK_CACHE.builds
    for _ in range(3):
        for _, op, _, args in cases:
            op(*args)
    assert native.stats() == (entries, misses)
    assert ops.PREPACK_CACHE.builds == builds


def test_the_handle_follows_in_place_writes_swaps_and_new_tensors():
    g = _gen(2)
    x = torch.randn(4, 64, generator=g)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    s = torch.rand(32, generator=g) / 64 + 1e-3
    op, body = ops._fbgemm_int8_op, ops._fbgemm_int8_impl
    before = op(x, w, s)
    # load_state_dict writes in place: the version moves.
    w.copy_(torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g))
    after = op(x, w, s)
    assert not torch.equal(after, before)
    assert torch.equal(after, body(x, w.clone(), s.clone()))
    s.mul_(2)  # a source other than the anchor, written in place
    assert torch.equal(op(x, w, s), body(x, w.clone(), s.clone()))
    w.data = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)  # the same object
    assert torch.equal(op(x, w, s), body(x, w.clone(), s.clone()))
    s2 = s.clone() * 3  # a new scale tensor with the same anchor
    assert torch.equal(op(x, w, s2), body(x, w.clone(), s2.clone()))
    with torch.inference_mode():  # no version counter: the data pointer and identity still count
        wi = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
        si = torch.rand(32, generator=g) / 64 + 1e-3
    _, misses = native.stats()
    assert torch.equal(op(x, wi, si), body(x, wi.clone(), si.clone()))
    assert torch.equal(op(x, wi, si), body(x, wi.clone(), si.clone()))
    assert native.stats()[1] == misses + 1


def test_a_handle_dies_with_its_weight():
    g = _gen(3)
    x = torch.randn(3, 64, generator=g)
    w = torch.randn(48, 64, generator=g)
    ops._onednn_linear_op(x, w, None)
    entry = ops.PREPACK_CACHE._entries[("onednn", id(w))]
    handle = weakref.ref(entry.handle)  # a oneDNN handle is a tensor: a weak reference shows its death
    entries, _ = native.stats()
    del entry, w
    assert native.stats()[0] == entries - 1
    assert handle() is None, "the C++ side kept the handle of a freed weight alive"


def test_a_compiled_model_calls_the_cpp_kernels_and_keeps_its_bits():
    g = _gen(4)
    layers = [Int8Dynamic("fbgemm").build(torch.randn(64, 64, generator=g), torch.randn(64, generator=g)),
              Int8Dynamic("onednn").build(torch.randn(64, 64, generator=g), None),
              Int4WeightOnly("tinygemm_cpu", 32).build(torch.randn(64, 64, generator=g), None)]
    model = torch.nn.Sequential(*layers).eval()
    x = torch.randn(7, 64, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
        stats, builds = native.stats(), ops.PREPACK_CACHE.builds
        for _ in range(3):
            torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
    assert native.stats() == stats and ops.PREPACK_CACHE.builds == builds


def test_threads_share_the_kernels():
    cases = _cases(5)
    wants = [body(*args) for _, _, body, args in cases]
    errors: list[str] = []

    def run() -> None:
        for _ in range(20):
            for (name, op, _, args), want in zip(cases, wants):
                if not torch.equal(op(*args), want):
                    errors.append(name)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


_EXPORT_AND_RUN = textwrap.dedent("""
    import warnings, torch
    from autoquant.candidates import Int8Dynamic, _cpu_native
    warnings.simplefilter("always")
    g = torch.Generator().manual_seed(0)
    layer = Int8Dynamic("fbgemm").build(torch.randn(32, 64, generator=g), None)
    x = torch.randn(3, 64, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ep = torch.export.export(layer, (x,))
        ep2 = torch.export.export(layer, (x,))
    with torch.no_grad():
        assert torch.equal(ep.module()(x), layer(x))
    dump = torch._C._dispatch_dump("autoquant::cpu_fbgemm_int8_linear")
    print("LOADED", _cpu_native.loaded(), "CPP", "_cpu_ops.cpp" in dump)
    for w in caught:
        if "C++ CPU kernels" in str(w.message):
            print("WARNING", w.category.__name__, str(w.message))
""")


def _run(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", _EXPORT_AND_RUN], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_switched_off_the_python_bodies_serve_without_a_word():
    out = _run({native.ENV: "0"})
    assert "LOADED False CPP False" in out
    assert "WARNING" not in out


def test_a_failed_build_falls_back_with_one_warning(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # torch cannot make its build folder under a file
    out = _run({"TORCH_EXTENSIONS_DIR": str(blocker / "ext")})
    assert "LOADED False CPP False" in out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, out  # tried once per process, two exports
    assert "RuntimeWarning" in warnings[0] and "AUTOQUANT_NATIVE_OPS=0" in warnings[0]


def test_a_build_error_is_quoted_in_the_warning(tmp_path):
    """The warning names what failed (the compiler's error), not the command line torch ran."""
    bad = tmp_path / "bad.cpp"
    bad.write_text("#error autoquant test: this source does not compile\n")
    code = ("import warnings; from pathlib import Path\n"
            "from autoquant.candidates import _cpu_native as n\n"
            f"n._SOURCE = Path({str(bad)!r})\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    print('LOADED', n.load())\n"
            "print('WARNING', [str(w.message) for w in caught])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED False" in out.stdout
    assert "error: #error autoquant test: this source does not compile" in out.stdout, out.stdout


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_one(tmp_path):
    """torch 2.11-2.13 wait on their build lock for as long as the file exists; a killed build
    leaves it. A fresh lock is someone's build in progress and stays; an old one is removed and
    logged. (Newer torch locks the file with an OS lock instead: the file is never removed.)"""
    if not native._waits_on_lock_files():
        folder = tmp_path / "ext"
        folder.mkdir()
        lock = folder / "lock"
        lock.write_text("")
        old = time.time() - native.STALE_LOCK_S - 60
        os.utime(lock, (old, old))
        native._remove_stale_lock(folder)
        assert lock.exists(), "an OS-locked file may be held by a live build: it must stay"
        return
    folder = tmp_path / "ext" / native.build_directory().name
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.write_text("")
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    code = ("import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
            "from autoquant.candidates import _cpu_native as n\n"
            "print('LOADED', n.load(), n.build_directory())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"LOADED True {folder}" in out.stdout
    assert "left" in out.stderr and "did not finish" in out.stderr, out.stderr
    assert not lock.exists()
    # A fresh lock is a build in progress: left alone (here nothing would release it, so only the
    # decision is checked, not a load that would wait for it).
    lock.write_text("")
    native._remove_stale_lock(folder)
    assert lock.exists()


_SAVE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from autoquant.candidates import Int8Dynamic, Int4WeightOnly
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(Int8Dynamic("fbgemm").build(torch.randn(32, 64, generator=g), None),
                                Int4WeightOnly("tinygemm_cpu", 32).build(torch.randn(16, 32, generator=g), None))
    x = torch.randn(3, 64, generator=g)
    torch.export.save(torch.export.export(model, (x,)), sys.argv[1])
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, sys.argv[2])
""")
_LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file
    from autoquant.candidates import _cpu_native
    io = load_file(sys.argv[2])
    program = torch.export.load(sys.argv[1]).module()
    with torch.no_grad():
        outs = [program(io["x"]) for _ in range(3)]
    assert all(torch.equal(y, io["y"]) for y in outs)
    dump = torch._C._dispatch_dump("autoquant::cpu_fbgemm_int8_linear")
    print("LOADED", _cpu_native.loaded(), "CPP", "_cpu_ops.cpp" in dump, "MISSES", _cpu_native.stats()[1])
""")


def test_a_loaded_exported_program_gets_the_cpp_kernels(tmp_path):
    """A process that only loads and runs an exported program traces nothing: its first op call
    (the Python body) loads the C++ kernels, which serve the calls after it, with the same bits."""
    files = [str(tmp_path / "program.pt2"), str(tmp_path / "io.safetensors")]
    for code in (_SAVE, _LOAD_AND_RUN):
        out = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    # The first call's fbgemm op loaded the C++ kernels, then ran its Python body, whose new handle
    # went to the mirror at once; the int4 op after it was a C++ kernel's first call (one miss);
    # the two calls after that asked nothing.
    assert "LOADED True CPP True MISSES 1" in out.stdout, out.stdout


def test_gc_of_a_layer_frees_its_mirror_entries():
    gc.collect()
    entries, _ = native.stats()
    layer = Int8Dynamic("fbgemm").build(torch.randn(32, 64, generator=_gen(6)), None)
    ops._fbgemm_int8_op(torch.randn(2, 64), layer.w_int8, layer.w_scale)
    assert native.stats()[0] == entries + 1
    del layer
    assert native.stats()[0] == entries
