"""``autoquant.quantize(model, scheme, **params)``: one scheme everywhere, nothing timed, and the
same layers, report, save/load and compile behaviour as autoquant's result."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import autoquant
from autoquant import MemoryStore, Measurement, OpShape, Timed
from autoquant.candidates import Int8Dynamic, QuantizedLinear
from autoquant.hardware import environment
from autoquant.keys import BenchKey
from helpers import sqnr


def _mlp(dtype: torch.dtype = torch.float32, k: int = 64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, 96), nn.GELU(), nn.Linear(96, 64, bias=False)).eval().to(dtype)


def _kernels(model: nn.Module) -> list[str]:
    return [m.candidate.name for m in model.modules() if isinstance(m, QuantizedLinear)]


def test_every_layer_gets_the_scheme_by_the_device_rule_and_the_report_says_so():
    float_model = _mlp()
    model = autoquant.quantize(_mlp(), "int8_dynamic", cache=None)
    assert _kernels(model) == ["int8_dynamic(kernel=fbgemm)"] * 2
    frame = autoquant.report(model)
    assert list(frame["layer"]) == ["0", "2"]
    assert all("rule on cpu float32" in s for s in frame["status"])
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert sqnr(float_model(x), model(x)) > 25


def test_params_pick_kernel_and_group_size():
    model = autoquant.quantize(_mlp(torch.bfloat16), "int4_weight_only", group_size=32, cache=None)
    assert _kernels(model) == ["int4_weight_only(kernel=tinygemm_cpu, group_size=32)"] * 2
    model = autoquant.quantize(_mlp(), "int8_dynamic", kernel="onednn", cache=None)
    assert _kernels(model) == ["int8_dynamic(kernel=onednn)"] * 2


def test_kernel_comes_from_the_cache_when_it_holds_timings():
    """onednn is second in the rule's order; the cache says it is faster at M=1: it is chosen."""
    store = MemoryStore()
    env = environment(torch.device("cpu"))
    fig = {"fbgemm": 50e-6, "onednn": 10e-6}
    items = {}
    for k, n, bias in ((64, 96, True), (96, 64, False)):
        for kernel, s in fig.items():
            c = Int8Dynamic(kernel)
            key = BenchKey(env.hash, c.family, c.params_json(), c.version, OpShape(1, k, n, bias, "float32"), Timed.FULL)
            items[key] = Measurement(s, s, s, 5)
    store.put_many(env, items)
    model = autoquant.quantize(_mlp(), "int8_dynamic", cache=store)
    assert _kernels(model) == ["int8_dynamic(kernel=onednn)"] * 2
    assert all("fastest cached" in s for s in autoquant.report(model)["status"])


def test_layers_the_scheme_cannot_run_stay_float_and_say_why():
    model = autoquant.quantize(_mlp(torch.bfloat16, k=48), "int4_weight_only", group_size=32, cache=None)
    assert type(model[0]) is nn.Linear and isinstance(model[2], QuantizedLinear)
    status = autoquant.report(model).set_index("layer")["status"]
    assert status["0"].startswith("kept float") and "K=48 is not a multiple of group_size=32" in status["0"]


def test_bad_scheme_or_params_raise_with_what_exists():
    with pytest.raises(KeyError, match="unknown candidate family 'int3'.*int8_dynamic"):
        autoquant.quantize(_mlp(), "int3", cache=None)
    with pytest.raises(ValueError, match="no params.*group"):
        autoquant.quantize(_mlp(), "int8_dynamic", group=3, cache=None)
    model = autoquant.quantize(_mlp(), "int8_dynamic", cache=None)
    with pytest.raises(RuntimeError, match="already"):
        autoquant.quantize(model, "int8_dynamic", cache=None)


def test_filter_fn_selects_layers():
    model = autoquant.quantize(_mlp(), "int8_weight_only", kernel="dequant", cache=None,
                               filter_fn=lambda mod, name: name == "2")
    assert type(model[0]) is nn.Linear and isinstance(model[2], QuantizedLinear)
    assert "excluded by filter_fn" in autoquant.report(model).set_index("layer")["status"]["0"]


def test_save_load_and_compile_like_autoquant(tmp_path):
    model = autoquant.quantize(_mlp(), "int8_dynamic", cache=None)
    x = torch.randn(3, 64)
    autoquant.save(model, tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {e["family"] for e in plan["layers"].values()} == {"int8_dynamic"}
    with torch.device("meta"):
        skeleton = _mlp()
    loaded = autoquant.load(skeleton, tmp_path)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(x)
        assert torch.equal(loaded(x), want)
        assert torch.equal(compiled(x), want)


def test_deployment_picks_which_cuda_figures_decide():
    """On a GPU the cache holds two figures per kernel: eager calls (host work included) and graph
    replays. With two CUDA kernels whose order flips between them, "eager" follows the eager
    figures, "graphs" the replays, and a CPU reads its one figure whatever is asked. (The store
    and keys are real; the device string is what a CUDA layer would pass.)"""
    from autoquant.quantize import _from_cache

    store = MemoryStore()
    env = environment(torch.device("cpu"))  # any environment row: the hash is the key's only use
    op = OpShape(1, 64, 96, True, "bfloat16")
    a, b = Int8Dynamic("int_mm"), Int8Dynamic("triton")
    figures = {(a, Timed.EAGER): 30e-6, (b, Timed.EAGER): 60e-6, (a, Timed.FULL): 20e-6, (b, Timed.FULL): 8e-6}
    store.put_many(env, {BenchKey(env.hash, c.family, c.params_json(), c.version, op, part): Measurement(s, s, s, 5)
                         for (c, part), s in figures.items()})
    assert _from_cache(store, env.hash, [a, b], op, "cuda", "eager") == a
    assert _from_cache(store, env.hash, [a, b], op, "cuda", "graphs") == b
    assert _from_cache(store, env.hash, [a, b], op, "cpu", "eager") == b  # FULL is a CPU's eager call
    with pytest.raises(ValueError, match="'graphs'"):
        autoquant.quantize(_mlp(), "int8_dynamic", cache=None, deployment="cuda-graphs")
