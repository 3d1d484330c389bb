"""The suite's own rules (tests/conftest.py, tests/helpers.py): `pytest -m cuda` selects the GPU
tests, a broken required package stops the run loudly, and CI never passes by skipping a dev extra."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import require_module

TESTS = Path(__file__).resolve().parent
# Files with CUDA tests of each kind: a `device` fixture, `dev` params, skipif marks, a runtime skip.
CUDA_FILES = ["test_primitives.py", "candidates/test_supports.py", "candidates/test_definitions.py",
              "core/test_bench.py"]


def _pytest(*args: str, prelude: str = "",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = prelude + "\nimport sys, pytest\nsys.exit(pytest.main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, "-p", "no:cacheprovider", *args], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=300, check=False, env=env)


def test_marker_cuda_selects_the_gpu_tests_of_every_file():
    files = [str(TESTS / f) for f in CUDA_FILES]
    out = _pytest("-m", "cuda", "--collect-only", "-q", *files)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert ids, out.stdout[-3000:]
    assert {i.split("::")[0].split("tests/")[-1] for i in ids} == set(CUDA_FILES)
    assert all("cuda" in i.lower() for i in ids if "test_supports.py" not in i and "test_bench.py" not in i)
    assert not any(i.endswith("::test_sqnr") for i in ids)  # a CPU-only test is not selected
    rest = _pytest("-m", "not cuda", "--collect-only", "-q", str(TESTS / "candidates/test_definitions.py"))
    assert not [line for line in rest.stdout.splitlines() if "::" in line and "[cuda-" in line]


def test_broken_triton_stops_the_session_once():
    """Where Triton is required, failing to import it ends the run before any test, with the
    import error named, instead of turning every Triton test into a skip."""
    from autoquant.candidates._util import triton_required

    if not triton_required():
        pytest.skip("Triton is not a declared dependency on this platform")
    # A missing triton, simulated the way Python itself spells "not importable": a None entry in
    # sys.modules makes `import triton` raise ModuleNotFoundError("import of triton halted; ...").
    # (A sys.meta_path blocker that raises would also break `import torch` on torch 2.14, which asks
    # importlib.util.find_spec("triton") at import; find_spec answers None for this entry instead.)
    block = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None
    """)
    out = _pytest("-q", str(TESTS / "test_primitives.py"), prelude=block)  # ~30 tests: said once, not per test
    text = out.stdout + out.stderr
    assert out.returncode == 4, text[-3000:]
    said = [line for line in text.splitlines() if "a required package failed to import" in line]
    # pytest echoes an exit reason twice: in its "! Exit !" banner and on the last line
    assert 1 <= len(said) <= 2 and all("import of triton halted" in line for line in said), text[-3000:]
    assert "passed" not in text and "skipped" not in text


def test_whole_suite_cpu_run_interprets_triton_kernels():
    """Without a GPU, a run of the whole tree runs the Triton kernels through the interpreter.

    The root conftest imports triton at session start, before tests/kernel_ops is collected, and
    triton sets up its language library for interpreter or compiler at that first import: the
    switch must come from the root conftest's import. Run in a child with CUDA hidden and the
    switch unset, over the whole tree (naming a subdirectory would load its conftest early and hide
    the order problem); a CPU kernel test that fails or skips here means the switch came too late.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed on this platform")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = _pytest("-q", "-rfEs", "--continue-on-collection-errors", "-k",
                  "test_triton_kernels and test_int8_dynamic_linear and cpu", "tests", env=env)
    text = out.stdout + out.stderr
    passed = re.search(r"(\d+) passed", text)
    assert passed and int(passed.group(1)) >= 2, text[-3000:]
    assert not re.search(r"\d+ (failed|skipped)", text), text[-3000:]


def test_missing_dev_extra_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no_such_dev_extra.*pip install -e '\.\[dev\]'"):
        require_module("no_such_dev_extra")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_module("no_such_dev_extra")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(BaseException) as outcome:  # a skip here must fail this test, not skip it
        require_module("no_such_dev_extra")
    assert outcome.type is pytest.fail.Exception and "CI is set" in str(outcome.value), outcome
    assert require_module("json").dumps([1]) == "[1]"
