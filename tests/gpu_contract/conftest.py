"""Compiles the kernels test_triton_aot checks, in one child process (`aot_child`), and prints their
resources after the run (registers, shared memory, local memory = spills); JSON to
$AUTOQUANT_AOT_REPORT when set."""

from __future__ import annotations

import json
import os

import pytest

from . import _aot

_RESULTS: list = []


@pytest.fixture
def aot_results() -> list:
    return _RESULTS


@pytest.fixture(scope="session")
def aot_child(request: pytest.FixtureRequest) -> _aot.ChildRun:
    """Every (variant, arch) the selected tests check, compiled in ONE child process without
    TRITON_INTERPRET (see _aot's docstring), at the first test that asks."""
    pairs = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if isinstance(params.get("variant"), _aot.Variant):
            pairs.append((params["variant"], params["arch"]))
    return _aot.compile_in_child(pairs)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001, ARG001
    if not _RESULTS:
        return
    rows = sorted(_RESULTS, key=lambda c: (-(c.local_bytes or 0), c.variant.id, c.arch))
    spilling = [c for c in rows if c.local_bytes]
    tr = terminalreporter
    tr.section("Triton ahead-of-time compilation: resources")
    tr.write_line(f"{len(rows)} compilations, {sum(c.compile_s for c in rows):.0f} s; "
                  f"{len(spilling)} use local memory (register spills)")
    for c in spilling[:40]:
        tr.write_line(f"  sm_{c.arch} {c.variant.id}: local {c.local_bytes} B/thread, "
                      f"{c.registers} regs, smem {c.shared_bytes} B")
    path = os.environ.get("AUTOQUANT_AOT_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump([{"kernel": c.variant.spec.name, "id": c.variant.id, "arch": c.arch,
                        "dtype": c.variant.dtype, "group_size": c.variant.group_size,
                        "config": dict(c.variant.config), "num_warps": c.variant.num_warps,
                        "num_stages": c.variant.num_stages, "origins": list(c.variant.origins),
                        "shared_bytes": c.shared_bytes, "static_shared_bytes": c.static_shared_bytes,
                        "registers": c.registers, "local_bytes": c.local_bytes,
                        "compile_s": round(c.compile_s, 2)} for c in rows], fh, indent=1)
