"""The eager fast paths of finalized layers compute exactly what the generic path does, for any
input rank and strides, and notice every way a buffer can change under them."""

import pytest
import torch

from autoquant.candidates import FloatCandidate, Int4WeightOnly, Int8Dynamic, QuantizedLinear
from autoquant.candidates._cpu_ops import PREPACK_CACHE

CASES = [
    (FloatCandidate("onednn"), torch.float32),
    (FloatCandidate("onednn"), torch.bfloat16),
    (FloatCandidate("fbgemm_fp16"), torch.float32),
    (Int8Dynamic("fbgemm"), torch.float32),
    (Int8Dynamic("onednn"), torch.float32),
    (Int4WeightOnly("tinygemm_cpu", 32), torch.bfloat16),
]
IDS = [f"{c.family}-{c.kernel}-{str(d)[6:]}" for c, d in CASES]


def skip_unsupported(cand, dtype):
    from autoquant.keys import OpShape, dtype_name

    why = cand.supports(torch.device("cpu"), OpShape(5, 64, 48, True, dtype_name(dtype)))
    if why is not None:
        pytest.skip(f"not on this CPU: {why}")


def generic(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features).contiguous()
    buffers = layer._buffers
    y = layer._linear(x2, buffers, layer._runtime, buffers["bias"])
    return y.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize(("cand", "dtype"), CASES, ids=IDS)
def test_eager_path_is_bit_exact(cand, dtype):
    skip_unsupported(cand, dtype)
    torch.manual_seed(0)
    layer = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype))
    assert layer._eager is not None, "this kernel should have an eager fast path"
    for x in (torch.randn(5, 64), torch.randn(2, 3, 64), torch.randn(64, 7).t(), torch.randn(1, 64)):
        x = x.to(dtype)
        y = layer(x)
        assert y.shape == (*x.shape[:-1], 48) and y.dtype == dtype
        torch.testing.assert_close(y, generic(layer, x), rtol=0, atol=0)


@pytest.mark.parametrize(("cand", "dtype"), CASES, ids=IDS)
def test_eager_path_follows_buffer_changes(cand, dtype):
    skip_unsupported(cand, dtype)
    torch.manual_seed(1)
    layer = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype))
    other = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype))
    x = torch.randn(3, 64).to(dtype)
    layer(x)  # fills the layer's memo
    # 1) in-place load_state_dict: values change, tensor identity does not
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    # 2) an in-place write without load_state_dict (the version counter moves)
    weight_name = next(n for n in layer._packed_names if n in ("weight", "w_int8", "w_int4"))
    with torch.no_grad():
        layer._buffers[weight_name].copy_(cand.build((torch.randn(48, 64) / 8).to(dtype), None)._buffers[weight_name])
    torch.testing.assert_close(layer(x), generic(layer, x), rtol=0, atol=0)
    # 3) a buffer replaced by assignment (new tensor object)
    fresh = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype))
    for name in layer._packed_names:
        setattr(layer, name, fresh._buffers[name].clone())
    layer.bias = fresh.bias.clone()
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


def test_inference_tensors_work_on_the_eager_path():
    with torch.inference_mode():
        layer = Int8Dynamic("fbgemm").build(torch.randn(48, 64) / 8, torch.randn(48))
        x = torch.randn(3, 64)
        y1, y2 = layer(x), layer(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, generic(layer, x), rtol=0, atol=0)


def test_no_eager_path_for_cast_or_foreign_dtypes():
    # fbgemm runs float32 only: a bf16 layer casts, which is the generic path's job
    assert Int8Dynamic("fbgemm").build(torch.randn(48, 64).bfloat16(), None)._eager is None
    assert FloatCandidate("onednn", "float32").build(torch.randn(48, 64).bfloat16(), None)._eager is None


def test_eager_path_builds_no_prepack_per_call():
    layer = Int8Dynamic("fbgemm").build(torch.randn(48, 64) / 8, torch.randn(48))
    x = torch.randn(2, 64)
    layer(x)
    before = PREPACK_CACHE.builds
    for _ in range(5):
        layer(x)
    assert PREPACK_CACHE.builds == before
