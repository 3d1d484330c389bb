"""AutoQuantizableLinearWeight: recording, float results, and surviving common tensor ops."""

import copy
import io

import pytest
import torch
from torch import nn

from autoquant.keys import OpShape
from autoquant.subclass import AutoQuantizableLinearWeight, LayerRecord


def wrapped_linear(k=8, n=4, bias=True, rows=16):
    lin = nn.Linear(k, n, bias=bias)
    ref = copy.deepcopy(lin)
    lin.weight = nn.Parameter(AutoQuantizableLinearWeight.wrap(lin.weight, LayerRecord("l", max_rows=rows)),
                              requires_grad=False)
    return lin, ref


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 8), (2, 2, 3, 8), (8,)], ids=["2d", "3d", "4d", "1d"])
def test_records_folded_m_and_computes_float(shape):
    lin, ref = wrapped_linear()
    x = torch.randn(*shape)
    y = lin(x)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, ref(x))
    m = x.numel() // 8
    assert dict(lin.weight.record.counts) == {OpShape(m, 8, 4, True, "float32"): 1}


def test_counts_and_bounded_sample():
    lin, _ = wrapped_linear(rows=10)
    for _ in range(3):
        lin(torch.randn(4, 8))
    lin(torch.randn(7, 8))
    rec = lin.weight.record
    assert rec.counts[OpShape(4, 8, 4, True, "float32")] == 3
    assert rec.counts[OpShape(7, 8, 4, True, "float32")] == 1
    acts = rec.activations()
    assert acts.shape == (10, 8) and acts.dtype == torch.float32
    # later calls replace slots, so not every sampled row comes from the first batch
    lin(torch.full((2, 8), 123.0))
    assert (rec.activations() == 123.0).all(dim=1).any()


def test_act_absmax_covers_every_call_not_only_the_sample():
    """Calibrated candidates (int8_smooth) read the per-input-channel absmax over EVERY recorded
    row: an outlier in a row the bounded sample drops still counts."""
    lin, _ = wrapped_linear(rows=4)
    rec = lin.weight.record
    assert rec.act_absmax() is None
    calls = [torch.randn(4, 8) for _ in range(3)] + [torch.randn(2, 3, 8).bfloat16().float()]
    calls[1][0, 5] = -50.0  # row 0 of call 2: the sample keeps only row M // 2 of later calls
    for x in calls:
        lin(x)
    want = torch.cat([x.reshape(-1, 8) for x in calls]).abs().amax(0)
    got = rec.act_absmax()
    assert got.dtype == torch.float32 and got.shape == (8,)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[5] == 50.0 and rec.activations().abs().amax() < 50.0
    got.zero_()  # a copy: the record is unchanged
    assert rec.act_absmax()[5] == 50.0
    assert copy.deepcopy(rec).act_absmax()[5] == 50.0


def test_bias_free_and_dtype_logged():
    lin, _ = wrapped_linear(bias=False)
    lin.to(torch.bfloat16)
    lin(torch.randn(2, 8, dtype=torch.bfloat16))
    assert list(lin.weight.record.counts) == [OpShape(2, 8, 4, False, "bfloat16")]


def test_survives_to_detach_deepcopy_state_dict():
    lin, _ = wrapped_linear()
    lin(torch.randn(2, 8))
    rec = lin.weight.record
    lin.to(torch.float64)
    assert isinstance(lin.weight, AutoQuantizableLinearWeight) and lin.weight.record is rec
    assert lin.weight.dtype == torch.float64
    lin.to(torch.float32)
    d = lin.weight.detach()
    assert isinstance(d, AutoQuantizableLinearWeight) and d.record is rec
    c = copy.deepcopy(lin)
    assert isinstance(c.weight, AutoQuantizableLinearWeight)
    assert c.weight.record is not rec and c.weight.record.counts == rec.counts
    sd = lin.state_dict()
    assert isinstance(sd["weight"], AutoQuantizableLinearWeight)
    torch.testing.assert_close(sd["weight"].unwrap(), c.weight.unwrap())
    # plain math on it gives plain tensors
    assert type(lin.weight * 2) is torch.Tensor


def test_not_picklable_with_clear_message():
    lin, _ = wrapped_linear()
    with pytest.raises(TypeError, match="finalize the model first"):
        torch.save(lin, io.BytesIO())
