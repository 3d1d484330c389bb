"""The finalized layer around each candidate: QuantizedLinear shapes and layouts, `.to()` rebuilding
runtime state, a state dict of plain tensors that survives safetensors, and `matmul_part`."""

from __future__ import annotations

import pytest
import torch
from helpers import act_absmax, dtype_id, instance_params, kernel_floor, make_input, make_linear, sqnr
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from autoquant.candidates import QuantizedLinear
from autoquant.keys import OpShape

SHAPE = ((256, 64),)
QUANTIZED_DTYPES = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def _built(dev, dtype, cand, shape, m=7):
    device = torch.device(dev)
    k, n = shape
    reason = cand.supports(device, OpShape(m, k, n, True, dtype_id(dtype)))
    if reason is not None and "not worth timing" not in reason:  # speed-declined kernels still run
        pytest.skip(f"{'missing CPU feature' if device.type == 'cpu' else 'not on this GPU'}: {reason}")
    w, b = make_linear(k, n, dtype, seed=11, device=device)
    return device, w, b, cand.build(w, b, act_absmax=act_absmax(k, device))


@pytest.mark.parametrize("dev, dtype, cand, shape", instance_params(SHAPE))
def test_3d_and_non_contiguous_input(dev, dtype, cand, shape):
    device, _, _, layer = _built(dev, dtype, cand, shape)
    k, n = shape
    x3 = make_input((2, 5, k), dtype, seed=5, device=device)
    y3 = layer(x3)
    assert y3.shape == (2, 5, n)
    ref = cand.reference(x3.reshape(-1, k), layer.packed(), layer.bias).reshape(2, 5, n)
    assert sqnr(ref, y3) >= kernel_floor(device, dtype, cand)
    xt = make_input((k, 6), dtype, seed=6, device=device).t()  # [6, K], strides (1, 6)
    assert not xt.is_contiguous()
    torch.testing.assert_close(layer(xt), layer(xt.contiguous()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="features"):
        layer(make_input((3, k + 1), dtype, device=device))


@pytest.mark.parametrize("dev, dtype, cand, shape", instance_params(SHAPE))
def test_to_rebuilds_runtime_state(dev, dtype, cand, shape):
    device, _, _, layer = _built(dev, dtype, cand, shape)
    x = make_input((7, shape[0]), dtype, seed=7, device=device)
    before = layer(x)
    runtime = layer._runtime
    layer.to(device)
    if runtime is not None:
        assert layer._runtime is not runtime, "`.to()` must rebuild the runtime state"
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    if device.type == "cpu" and torch.cuda.is_available():
        layer.to("cuda").to("cpu")  # a round trip through the other device rebuilds it twice
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("dev, dtype, cand, shape", instance_params(SHAPE))
def test_state_dict_is_plain_tensors_and_survives_safetensors(dev, dtype, cand, shape):
    device, _, _, layer = _built(dev, dtype, cand, shape)
    sd = layer.state_dict()
    assert set(sd) == set(layer.packed()) | {"bias"}
    for name, t in sd.items():
        assert type(t) is torch.Tensor, f"{name} is a {type(t).__name__}"
        assert t.layout == torch.strided and not t.is_quantized and t.dtype not in QUANTIZED_DTYPES, name
        assert t.device.type == device.type
    loaded = st_load(st_save({k: v.contiguous().cpu() for k, v in sd.items()}))
    packed = {k: v.to(device) for k, v in loaded.items() if k != "bias"}
    again = QuantizedLinear(cand, packed, loaded["bias"].to(device), in_features=shape[0], out_features=shape[1])
    x = make_input((7, shape[0]), dtype, seed=8, device=device)
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("dev, dtype, cand, shape", instance_params(SHAPE))
def test_matmul_part(dev, dtype, cand, shape):
    device, _, _, layer = _built(dev, dtype, cand, shape, m=33)
    x = make_input((33, shape[0]), dtype, seed=9, device=device)
    part = cand.matmul_part(x, layer.packed(), layer._runtime, layer.bias)
    if not cand.dynamic_activation:
        assert part is None
        return
    assert callable(part)
    full = layer(x)
    # The closure runs on the activation quantized up front: the same numbers as the full op.
    torch.testing.assert_close(part(), full, rtol=0, atol=0)
    torch.testing.assert_close(part(), full, rtol=0, atol=0)  # callable repeatedly (the harness does)


def _compile_params():
    """One instance per (family, kernel, compute dtype), float32 activations, on each device."""
    out = []
    for p in instance_params(SHAPE):
        _, dtype, cand, _ = p.values
        if dtype != torch.float32 or (cand.family == "int4_weight_only" and cand.group_size != 64):
            continue
        out.append(p)
    return out


@pytest.mark.parametrize("dev, dtype, cand, shape", _compile_params())
def test_torch_compile(dev, dtype, cand, shape):
    """A compiled model containing the layer gives the eager result; `traceable` kernels trace
    without a graph break, the others run as eager islands (torch.compiler.disable)."""
    device, _, _, layer = _built(dev, dtype, cand, shape)
    x = make_input((8, shape[0]), dtype, seed=10, device=device)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: layer(torch.relu(t)), fullgraph=cand.traceable)
    with torch.no_grad():
        eager = layer(torch.relu(x))
        compiled = fn(x)
    if device.type == "cpu":  # every CPU kernel compiles to the eager bits
        assert torch.equal(compiled, eager), f"{cand.name}: {sqnr(eager, compiled):.1f} dB against eager"
    else:
        # Not measured on a GPU yet: inductor writes its own Triton code around the CUDA kernels and
        # may fuse a dequant into a matmul prologue that rounds differently. Make this exact (or
        # name each kernel's reason) from the first GPU run's figures.
        assert sqnr(eager, compiled) >= min(kernel_floor(device, dtype, cand), 45.0)
