"""A finalized int8pack layer whose weight buffer is misaligned (as a zero-copy load from a file
can hand it) computes the same output instead of crashing: torch's CPU kernel needs aligned
loads (a misaligned weight segfaulted in torch._weight_int8pack_mm). Runs in a child process,
since the failure is a crash."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent("""
    import torch
    from autoquant.candidates import Int8WeightOnly
    from autoquant.keys import OpShape
    torch.manual_seed(0)
    k, n = 256, 64
    cand = Int8WeightOnly("int8pack")
    for dtype in (torch.float32, torch.bfloat16):
        if cand.supports(torch.device("cpu"), OpShape(4, k, n, False, str(dtype).split(".")[-1])):
            continue
        w = torch.randn(n, k).to(dtype)
        layer = cand.build(w, None)
        x = torch.randn(4, k).to(dtype)
        want = layer(x)
        q = layer.w_int8
        raw = torch.empty(q.numel() + 64, dtype=torch.int8)
        off = 8 if raw.data_ptr() % 64 == 0 else 8 + (64 - raw.data_ptr() % 64)
        bad = raw[off:off + q.numel()].view(n, k)
        bad.copy_(q)
        assert bad.data_ptr() % 32, "the test failed to make a misaligned weight"
        layer.w_int8 = bad
        for _ in range(3):
            got = layer(x)
            assert torch.equal(got, want), (dtype, (got - want).abs().max())
        print("ok", dtype)
""")


def test_misaligned_int8pack_weight_is_aligned_not_a_crash():
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("this torch has no _weight_int8pack_mm")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "ok torch.float32" in proc.stdout
