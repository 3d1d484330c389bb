"""Every candidate instance, on every device present, for each activation dtype and awkward shape.

Where ``supports()`` says None: the layer's output matches the kernel's own ``reference()`` almost
exactly (see helpers.KERNEL_VS_REFERENCE_DB) and float math within the family's ``min_sqnr_db``.
Where it gives a reason: the reason is a non-empty string, and it is real: forcing the kernel
either fails, or the reason says the kernel was declined for speed (or is a Triton kernel the
interpreter can run on CPU) and the forced output is still right.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
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


def _forced_run_is_consistent(c, reason, w, b, x, device) -> None:
    try:
        layer = c.build(w, b)
        y = layer(x)
    except Exception:  # noqa: BLE001 - any failure shows the reason is real
        return  # it really cannot run here: the reason stands
    assert SPEED_DECLINE in reason or "CUDA kernel" in reason, (
        f"{c.name} declined with {reason!r} but runs fine when forced"
    )
    ref = c.reference(x, layer.packed(), layer.bias)
    floor = kernel_floor("cuda", x.dtype, c)  # the interpreter may sum in another order
    assert sqnr(ref, y) >= floor


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
            layer = cand.build(w, b)
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
    if cand.supports(device, OpShape(m, k, n, False, dtype_id(dtype))) is not None:
        pytest.skip("not supported here (covered by test_kernel_matches_reference_and_float)")
    w, _ = make_linear(k, n, dtype, seed=3, device=device, bias=False)
    w[0] = 0
    layer = cand.build(w, None)
    x = make_input((m, k), dtype, seed=4, device=device)
    x[2] = 0
    y = layer(x)
    assert torch.isfinite(y).all()
    assert y[2].abs().max().item() == 0.0
    assert y[:, 0].abs().max().item() == 0.0
    assert sqnr(cand.reference(x, layer.packed(), None), y) >= kernel_floor(device, dtype, cand)
