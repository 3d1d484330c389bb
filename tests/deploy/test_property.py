"""Property: every CPU candidate that says it can run a shape computes F.linear within its documented
accuracy (``min_sqnr_db``), for random shapes, dtypes, bias and data; one that cannot says why.

Shapes mix sizes every kernel takes (K multiples of 32, N multiples of 16) with awkward ones where
some decline (K=40 / 50 / 72: int4 groups, the CPU int8pack K step; N=8 / 50: the CPU int4 pack).
This test found the CPU int8pack crash on K % 16 != 0 (see int8_weight_only.py). Bounded: a few
dozen derandomized examples, well under 30 s.
"""

from __future__ import annotations

import torch
from helpers import accuracy_floor, all_instances, float_reference, sqnr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoquant.keys import OpShape

CPU = torch.device("cpu")
K_VALUES = (32, 64, 96, 128, 160, 256, 40, 50, 72)
N_VALUES = (16, 32, 48, 64, 80, 128, 8, 50)
# Lossless kernels against float64 math: float32 summation order alone leaves ~120 dB.
LOSSLESS_CAP_DB = 100.0

def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.dtype, int, int, int, bool, int]:
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16)))
    return (dtype, draw(st.integers(1, 40)), draw(st.sampled_from(K_VALUES)), draw(st.sampled_from(N_VALUES)),
            draw(st.booleans()), draw(st.integers(0, 2**16)))


def _data(dtype: torch.dtype, m: int, k: int, n: int, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    return w, b, x


@_settings(60)
@given(problems())
def test_supported_candidates_meet_their_documented_accuracy(problem):
    dtype, m, k, n, bias, seed = problem
    w, b, x = _data(dtype, m, k, n, bias, seed)
    ref = float_reference(x, w, b)
    op = OpShape(m, k, n, bias, str(dtype).removeprefix("torch."))
    ran = 0
    for cand in all_instances("cpu", dtype):
        reason = cand.supports(CPU, op)
        if reason is not None:
            assert isinstance(reason, str) and reason.strip(), f"{cand.name}: empty reason"
            continue
        with torch.no_grad():
            y = cand.build(w, b)(x)
        assert y.shape == (m, n) and y.dtype == dtype, cand.name
        assert torch.isfinite(y).all(), cand.name
        floor = accuracy_floor(min(cand.min_sqnr_db, LOSSLESS_CAP_DB), dtype)
        got = sqnr(ref, y)
        assert got >= floor, f"{cand.name} M={m} K={k} N={n} bias={bias}: {got:.1f} dB < {floor} dB"
        ran += 1
    assert ran >= 2  # at least the baseline and one more kernel ran


@_settings(25)
@given(problems())
def test_leading_dims_and_layout_do_not_change_the_result(problem):
    """A 3-D input is the 2-D call on its rows, and a non-contiguous input the contiguous one, bit
    for bit (the layer folds leading dims and copies a strided x; nothing else changes)."""
    dtype, m, k, n, bias, seed = problem
    w, b, x = _data(dtype, m, k, n, bias, seed)
    op = OpShape(2 * m, k, n, bias, str(dtype).removeprefix("torch."))
    x3 = torch.stack([x, x.flip(0)])  # [2, M, K]
    xt = x3.reshape(-1, k).t().contiguous().t()  # same values, column-major
    for cand in all_instances("cpu", dtype):
        if cand.supports(CPU, op) is not None or cand.family == "fp8_dynamic":
            continue  # fp8_dynamic's CPU reference loop is slow; its layout handling is shared
        layer = cand.build(w, b)
        with torch.no_grad():
            y2 = layer(x3.reshape(-1, k))
            torch.testing.assert_close(layer(x3), y2.reshape(2, m, n), rtol=0, atol=0)
            torch.testing.assert_close(layer(xt), y2, rtol=0, atol=0)
