"""The Triton-kernel candidates run end to end on CPU through the Triton interpreter.

With a GPU they are covered by test_kernels on CUDA. Without one, this runs them in a child process
with TRITON_INTERPRET=1 set before triton is first imported (tests/conftest.py sets it in this
process too; the child does not depend on that): the candidate's argument plumbing (packed dicts,
int4 zero-point conversion, per-token scales) is checked against its own reference on tiny shapes,
and against the float64 definitions of tests/references.py (which share no code with autoquant).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from autoquant.candidates._util import triton_op

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: test_kernels runs these on CUDA")

SCRIPT = textwrap.dedent("""
    import sys, torch
    import references as R
    from autoquant.candidates import Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Fp8Dynamic
    from autoquant.primitives import sqnr
    FLOOR = {torch.float32: 80.0, torch.bfloat16: 40.0, torch.float16: 55.0}  # helpers' CUDA floors
    cands = [Int8WeightOnly("triton"), Int8Dynamic("triton"), Fp8Dynamic("triton")]
    cands += [Int4WeightOnly("triton", g) for g in (32, 64, 128)]
    gen = torch.Generator().manual_seed(0)
    bad = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for c in cands:
            k, n = (256, 48) if c.family == "int4_weight_only" else (96, 40)
            w = torch.randn(n, k, generator=gen).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            for m in (1, 5):
                x = torch.randn(m, k, generator=gen).to(dtype)
                layer = c.build(w, b)
                y = layer(x)
                got = sqnr(c.reference(x, layer.packed(), layer.bias), y)
                part = c.matmul_part(x, layer.packed(), layer._runtime, layer.bias)
                if part is not None and not torch.equal(part(), y):
                    bad.append(f"{c.name} {dtype} M={m}: matmul_part differs")
                if got < FLOOR[dtype] or y.dtype != dtype or y.shape != (m, n):
                    bad.append(f"{c.name} {dtype} M={m}: {got:.1f} dB")
                want = R.expected_output(c, x, w, b)
                db, g = R.snr_db(want, y), R.gain(want, y)
                if not (db >= R.FLOOR_DB[dtype] and abs(g - 1) <= R.GAIN_TOL[dtype]):
                    bad.append(f"{c.name} {dtype} M={m}: {db:.1f} dB, gain {g:.5f} against the definition")
    print("\\n".join(bad) or "OK")
    sys.exit(1 if bad else 0)
""")


def test_triton_candidates_under_the_interpreter():
    for op in ("int8_wo_mm", "int8_dyn_mm", "int4_wo_mm", "fp8_rowwise_mm"):
        fn, reason = triton_op(op)  # raises where Triton is a required dependency and broken
        if fn is None:
            pytest.skip(f"Triton is not available on this platform: {reason}")
    tests_dir = str(pathlib.Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env,
                         check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
