"""The eager fast paths of finalized layers compute exactly what the generic path does, for any
input rank and strides, and notice every way a buffer can change under them."""

import copy

import pytest
import torch

from autoquant.candidates import (
    FloatCandidate,
    Fp8Dynamic,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8Smooth,
    Int8WeightOnly,
    QuantizedLinear,
)
from autoquant.candidates._cpu_ops import PREPACK_CACHE

# Activation statistics for calibrated candidates (int8_smooth): |x| of torch.randn rows; others ignore them.
ABSMAX = torch.randn(256, 64, generator=torch.Generator().manual_seed(9)).abs().amax(0)

CASES = [
    (FloatCandidate("aten"), torch.float32),
    (FloatCandidate("aten", "float32"), torch.bfloat16),
    (FloatCandidate("onednn"), torch.float32),
    (FloatCandidate("onednn"), torch.bfloat16),
    (FloatCandidate("onednn", "float32"), torch.bfloat16),
    (FloatCandidate("fbgemm_fp16"), torch.float32),
    (FloatCandidate("fbgemm_fp16", "float32"), torch.bfloat16),
    (Int8Dynamic("fbgemm"), torch.float32),
    (Int8Dynamic("onednn"), torch.float32),
    (Int8Smooth("fbgemm", 0.75), torch.float32),
    (Int8WeightOnly("int8pack"), torch.float32),
    (Int8WeightOnly("int8pack"), torch.bfloat16),
    (Int4WeightOnly("tinygemm_cpu", 32), torch.bfloat16),
    (Fp8WeightOnly("dequant"), torch.float32),
    (Fp8WeightOnly("dequant"), torch.bfloat16),
    (Fp8Dynamic("scaled_mm"), torch.float32),
    (Fp8Dynamic("scaled_mm"), torch.bfloat16),
]
IDS = [f"{c.family}-{c.kernel}{'-' + c.compute_dtype if getattr(c, 'compute_dtype', None) else ''}-{str(d)[6:]}"
       for c, d in CASES]


def skip_unsupported(cand, dtype):
    from autoquant.keys import OpShape, dtype_name

    why = cand.supports(torch.device("cpu"), OpShape(5, 64, 48, True, dtype_name(dtype)))
    if why is not None:
        pytest.skip(f"missing CPU feature: {why}")


def generic(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features).contiguous()
    buffers = layer._buffers
    y = layer._linear(x2, buffers, layer._runtime, buffers["bias"])
    return y.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize(("cand", "dtype"), CASES, ids=IDS)
def test_eager_path_is_bit_exact(cand, dtype):
    skip_unsupported(cand, dtype)
    torch.manual_seed(0)
    layer = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype), act_absmax=ABSMAX)
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
    layer = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype), act_absmax=ABSMAX)
    other = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype), act_absmax=ABSMAX)
    x = torch.randn(3, 64).to(dtype)
    layer(x)  # fills the layer's memo
    # 1) in-place load_state_dict: values change, tensor identity does not
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    # 2) an in-place write without load_state_dict (the version counter moves), to the weight
    # and then to every other packed tensor (scales)
    weight_name = next(n for n in layer._packed_names if n in ("weight", "w_int8", "w_int4", "w_fp8"))
    fresh = cand.build((torch.randn(48, 64) / 8).to(dtype), None, act_absmax=ABSMAX)
    with torch.no_grad():
        layer._buffers[weight_name].copy_(fresh._buffers[weight_name])
    torch.testing.assert_close(layer(x), generic(layer, x), rtol=0, atol=0)
    for name in layer._packed_names:
        if name != weight_name:
            before = layer(x)
            with torch.no_grad():
                layer._buffers[name].mul_(2)
            after = layer(x)
            torch.testing.assert_close(after, generic(layer, x), rtol=0, atol=0)
            assert not torch.equal(after, before), f"a write to {name} must change the output"
    # 2b) the weight's storage swapped under the same tensor object (`.data = ...`)
    swapped = cand.build((torch.randn(48, 64) / 8).to(dtype), None, act_absmax=ABSMAX)._buffers[weight_name]
    layer._buffers[weight_name].data = swapped.clone()
    torch.testing.assert_close(layer(x), generic(layer, x), rtol=0, atol=0)
    # 3) a buffer replaced by assignment (new tensor object)
    fresh = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype), act_absmax=ABSMAX)
    for name in layer._packed_names:
        setattr(layer, name, fresh._buffers[name].clone())
    layer.bias = fresh.bias.clone()
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize(("cand", "dtype"), [(Int8Dynamic("fbgemm"), torch.float32),
                                             (Int8WeightOnly("int8pack"), torch.bfloat16)], ids=["fbgemm", "int8pack"])
def test_inference_tensors_work_on_the_eager_path(cand, dtype):
    with torch.inference_mode():
        layer = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype), act_absmax=ABSMAX)
        x = torch.randn(3, 64).to(dtype)
        fast = layer._eager
        y1, y2 = layer(x), fast(x)  # the closure itself must not raise (no silent slow path)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, generic(layer, x), rtol=0, atol=0)


def test_no_eager_path_for_cast_or_foreign_dtypes():
    # fbgemm int8 runs float32 only: a bf16 layer casts, which is the generic path's job
    assert Int8Dynamic("fbgemm").build(torch.randn(48, 64).bfloat16(), None)._eager is None
    layer = Int8Dynamic("fbgemm").build(torch.randn(48, 64), torch.randn(48))
    assert layer._eager is not None
    # an input of another dtype goes the generic way (computed in float32, cast back)
    x = torch.randn(3, 64).bfloat16()
    torch.testing.assert_close(layer(x), generic(layer, x.float()).bfloat16(), rtol=0, atol=0)


def test_eager_path_builds_no_prepack_per_call():
    layer = Int8Dynamic("fbgemm").build(torch.randn(48, 64) / 8, torch.randn(48))
    x = torch.randn(2, 64)
    layer(x)
    before = PREPACK_CACHE.builds
    for _ in range(5):
        layer(x)
    assert PREPACK_CACHE.builds == before


# ---- the __call__ shortcut: only where nn.Module.__call__ would do nothing but call forward --------
def _fbgemm_layer(seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    return Int8Dynamic("fbgemm").build(torch.randn(48, 64) / 8, torch.randn(48))


def test_shortcut_keeps_forward_hooks_and_pre_hooks():
    layer, x = _fbgemm_layer(), torch.randn(3, 64)
    want = layer(x)
    seen = []
    h1 = layer.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    h2 = layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape) or out + 1)
    torch.testing.assert_close(layer(x), generic(layer, x * 2) + 1, rtol=0, atol=0)
    assert seen == [torch.Size([3, 48])]
    h1.remove()
    h2.remove()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


def test_shortcut_keeps_global_hooks():
    layer, x = _fbgemm_layer(), torch.randn(3, 64)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: calls.append(mod))
    try:
        layer(x)
    finally:
        handle.remove()
    assert calls == [layer]
    layer(x)
    assert calls == [layer]


def test_shortcut_respects_forward_replaced_on_the_instance():
    # What offloading libraries do (accelerate's add_hook_to_module wraps forward on the instance).
    layer, x = _fbgemm_layer(), torch.randn(3, 64)
    original = layer.forward
    layer.forward = lambda inp: original(inp) * 0
    assert layer._hot is None
    assert torch.count_nonzero(layer(x)) == 0
    del layer.forward
    assert layer._hot is not None
    assert torch.count_nonzero(layer(x)) > 0


def test_shortcut_counts_unseen_m_for_any_rank():
    layer = _fbgemm_layer()
    layer.tuned_m = frozenset({1, 8})
    assert layer._hot is not None
    layer(torch.randn(1, 64))
    layer(torch.randn(2, 4, 64))  # M = 8: tuned
    layer(torch.randn(3, 64))
    layer(torch.randn(3, 2, 64))
    assert layer.unseen_m == {3: 1, 6: 1}


def test_deepcopy_gets_its_own_buffers():
    layer, x = _fbgemm_layer(), torch.randn(3, 64)
    want = layer(x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.w_int8.zero_()
        twin.bias.zero_()
    assert torch.count_nonzero(twin(x)) == 0
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


def test_dispatch_linear_eager_path_is_bit_exact_on_both_sides():
    from autoquant.finalize import DispatchLinear
    from autoquant.selection import Dispatch

    torch.manual_seed(0)
    for dtype, small, large in ((torch.float32, Int8Dynamic("onednn"), Int8Dynamic("fbgemm")),
                                (torch.bfloat16, Int8WeightOnly("int8pack"), Int8Dynamic("onednn"))):
        d = Dispatch(small, large, 4)
        w, b = (torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype)
        layer = DispatchLinear(d, small.quantize(w), b, 64, 48, act_dtype=dtype)
        assert layer._hot is not None
        for x in (torch.randn(1, 64), torch.randn(3, 64), torch.randn(2, 2, 64), torch.randn(9, 64),
                  torch.randn(64, 7).t()):
            x = x.to(dtype)
            m = x.numel() // 64
            cand, runtime = (small, layer._runtime) if m < 4 else (large, layer._large_runtime)
            x2 = x.reshape(-1, 64).contiguous()
            want = cand.linear(x2, layer._buffers, runtime, layer.bias).reshape(*x.shape[:-1], 48)
            torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


@pytest.mark.parametrize(("cand", "dtype"), CASES, ids=IDS)
def test_a_dropped_layer_frees_its_buffers_without_the_garbage_collector(cand, dtype):
    """No reference cycle through the eager closures: a layer's weights are freed the moment the
    layer is dropped (tuning builds and drops thousands of layers; finalize drops float ones)."""
    import gc
    import weakref

    skip_unsupported(cand, dtype)
    layer = cand.build((torch.randn(48, 64) / 8).to(dtype), torch.randn(48).to(dtype), act_absmax=ABSMAX)
    layer(torch.randn(2, 3, 64).to(dtype))  # the folding path of every closure
    layer(torch.randn(3, 64).to(dtype))
    refs = [weakref.ref(t) for t in layer._buffers.values() if t is not None]
    gc.disable()
    try:
        del layer
        alive = [r() is not None for r in refs]
    finally:
        gc.enable()
    assert not any(alive)


def test_shortcut_steps_aside_for_in_place_compile():
    """`layer.compile()` sets nn.Module's compiled call: the layer must go through it."""
    layer, x = _fbgemm_layer(), torch.randn(3, 64)
    want = layer(x)
    layer.compile(backend="eager", fullgraph=True)
    assert layer._hot is None
    torch._dynamo.reset()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
