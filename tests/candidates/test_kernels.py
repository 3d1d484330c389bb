"""Every candidate instance, on every device present, for each activation dtype and awkward shape.

Where ``supports()`` says None: the layer's output matches the kernel's own ``reference()`` almost
exactly (see helpers.KERNEL_VS_REFERENCE_DB) and float math within the family's ``min_sqnr_db``.
Where it gives a reason: the reason is a non-empty string, and it is real: forcing the kernel
raises the error its rule documents (DECLINED_ERRORS), or the reason says the kernel was declined
for speed and the forced output is still right.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    act_absmax,
    accuracy_floor,
    dtype_id,
    float_reference,
    instance_params,
    kernel_floor,
    make_input,
    make_linear,
    sqnr,
)

from autoquant.keys import OpShape

# K=96 / N=50 are awkward for every kernel (int4 cannot group them by 64 or 128, tinygemm needs
# N % 16); K=256 / N=64 lets every int4 group size and the int8 / fp8 alignment rules pass.
SHAPES = ((96, 50), (256, 64))
MS = (1, 7, 33)
SPEED_DECLINE = "not worth timing"


# What forcing a declined kernel must raise, by the rule its reason names: shape rules are
# ValueErrors from our own checks (at build time, before any kernel runs); device rules are
# RuntimeErrors naming the device. Where torch's own check speaks first (a CPU _scaled_mm without
# row-wise scales; the CUDA GEMMs' alignment, dtype and capability rules) it is torch's
# RuntimeError.
DECLINED_ERRORS = (
    ("not a multiple of group_size", ValueError, "multiple of group_size"),
    # fp8_dynamic/scaled_mm on a torch whose CPU _scaled_mm takes per-tensor scales only (2.11):
    # torch's internal assert, "Now _scaled_mm only supports per-tensor scaling for CPU backend".
    ("rejects row-wise scales", RuntimeError, "per-tensor scaling"),
    ("needs K % 16", ValueError, "K % 16"),
    ("N % 16", ValueError, "N % 16 == 0"),
    ("is a CUDA kernel", RuntimeError, "CUDA|wrong device"),
    ("is a CPU kernel", RuntimeError, ""),
    ("multiples of", RuntimeError, ""),
    ("N % 8", RuntimeError, ""),
    ("activations, not", RuntimeError, ""),
    ("compute capability", RuntimeError, ""),
)


def _forced_run_is_consistent(c, reason, w, b, x, device) -> None:
    if SPEED_DECLINE in reason:  # declined for speed only: it runs, and is right
        layer = c.build(w, b, act_absmax=act_absmax(w.shape[1], device))
        y = layer(x)
        assert sqnr(c.reference(x, layer.packed(), layer.bias), y) >= kernel_floor(device, x.dtype, c)
        return
    rule = next(((err, pattern) for fragment, err, pattern in DECLINED_ERRORS if fragment in reason), None)
    assert rule is not None, f"{c.name} declined with {reason!r}: add the error it documents to DECLINED_ERRORS"
    err, pattern = rule
    with pytest.raises(err, match=pattern):
        c.build(w, b, act_absmax=act_absmax(w.shape[1], device))(x)


@pytest.mark.parametrize("dev, dtype, cand, shape", instance_params(SHAPES))
def test_kernel_matches_reference_and_float(dev, dtype, cand, shape):
    device = torch.device(dev)
    k, n = shape
    w, b = make_linear(k, n, dtype, seed=k + n, device=device)
    layer = None
    for m in MS:
        x = make_input((m, k), dtype, seed=m, device=device)
        reason = cand.supports(device, OpShape(m, k, n, True, dtype_id(dtype)))
        if reason is not None:
            assert isinstance(reason, str) and reason.strip(), f"{cand.name}: empty reason"
            _forced_run_is_consistent(cand, reason, w, b, x, device)
            continue
        if layer is None:
            layer = cand.build(w, b, act_absmax=act_absmax(k, device))
        y = layer(x)
        assert y.shape == (m, n) and y.dtype == dtype and y.device.type == device.type
        assert torch.isfinite(y).all()
        ref = cand.reference(x, layer.packed(), layer.bias)
        assert ref.dtype == dtype
        got = sqnr(ref, y)
        assert got >= kernel_floor(device, dtype, cand), f"{cand.name} M={m}: {got:.1f} dB vs its reference"
        accuracy = sqnr(float_reference(x, w, b), y)
        floor = accuracy_floor(min(cand.min_sqnr_db, 100.0), dtype)
        assert accuracy >= floor, f"{cand.name} M={m}: {accuracy:.1f} dB vs float math, floor {floor}"


@pytest.mark.parametrize("dev, dtype, cand, shape", instance_params(((256, 64),)))
def test_no_bias_and_zero_rows(dev, dtype, cand, shape):
    """No bias, an all-zero activation row and an all-zero weight row: finite and right."""
    device = torch.device(dev)
    k, n = shape
    m = 5
    reason = cand.supports(device, OpShape(m, k, n, False, dtype_id(dtype)))
    if reason is not None and SPEED_DECLINE not in reason:  # declined for speed: it still runs
        pytest.skip(f"{'missing CPU feature' if dev == 'cpu' else 'not on this GPU'}: {reason}")
    w, _ = make_linear(k, n, dtype, seed=3, device=device, bias=False)
    w[0] = 0
    layer = cand.build(w, None, act_absmax=act_absmax(k, device))
    x = make_input((m, k), dtype, seed=4, device=device)
    x[2] = 0
    y = layer(x)
    assert torch.isfinite(y).all()
    assert y[2].abs().max().item() == 0.0
    assert y[:, 0].abs().max().item() == 0.0
    assert sqnr(cand.reference(x, layer.packed(), None), y) >= kernel_floor(device, dtype, cand)
