"""Hostile inputs met as a new user: a plan or a save meant for another model, an example input
holding NaN, a float64 model. Each says what is wrong and what to do."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import autoquant
from autoquant import FakeTimer, get_report
from autoquant.candidates import QuantizedLinear
from autoquant.plan import plan_of


def _cost(key) -> float:
    kernel = json.loads(key.params).get("kernel")
    return 1e-6 if (key.candidate, kernel) == ("int8_dynamic", "fbgemm") else 1e-3


def _mlp(h: int = 64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 64)).eval()


def _tuned(h: int = 64) -> nn.Sequential:
    """The MLP as autoquant would leave it with int8 fbgemm winning (a hand-written plan: no timing)."""
    entry = {"kind": "candidate", "family": "int8_dynamic", "params": {"kernel": "fbgemm"}}
    plan = {"format": "autoquant-plan", "version": 1, "environment": None, "layers": {"0": entry, "2": entry}}
    return autoquant.apply_plan(_mlp(h), plan)


def test_apply_plan_to_other_shapes_warns_per_layer_and_strict_raises(caplog):
    plan = plan_of(_tuned(h=64))
    assert plan["layers"]["0"]["out_features"] == 64 and plan["layers"]["0"]["in_features"] == 64
    other = _mlp(h=96)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        autoquant.apply_plan(other, plan)
    msgs = [r.getMessage() for r in caplog.records if "apply_plan" in r.getMessage()]
    assert len(msgs) == 2, msgs  # both layers differ: one warning each, naming both shapes
    assert "'0'" in msgs[0] and "64 x 64 in the plan, 96 x 64 in this model" in msgs[0]
    assert "'2'" in msgs[1] and "64 x 64 in the plan, 64 x 96 in this model" in msgs[1]
    assert all(type(m) is nn.Linear for m in (other[0], other[2]))  # kept float, not half-applied
    with pytest.raises(ValueError, match=r"layer '0'.*64 x 64 in the plan, 96 x 64 in this model.*strict=True"):
        autoquant.apply_plan(_mlp(h=96), plan, strict=True)
    same = autoquant.apply_plan(_mlp(h=64), plan, strict=True)
    assert isinstance(same[0], QuantizedLinear)


def test_load_into_a_different_model_names_layer_and_shapes(tmp_path):
    autoquant.save(_tuned(h=64), tmp_path)
    with pytest.raises(ValueError, match=r"layer '0' has .*64 x 64 in the plan, 96 x 64 in this model"):
        autoquant.load(_mlp(h=96), tmp_path)


def test_load_of_a_0_2_2_save_without_shapes_still_names_them(tmp_path):
    autoquant.save(_tuned(h=64), tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    for entry in plan["layers"].values():  # what autoquant 0.2.2 wrote: no shapes
        entry.pop("in_features", None)
        entry.pop("out_features", None)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"layer '0' has out_features x in_features = 64 x 64 in the save, 96 x 64 in this model"):
        autoquant.load(_mlp(h=96), tmp_path)


def test_load_mismatch_outside_linear_layers_names_the_tensor(tmp_path):
    model = _tuned(h=64)
    model.append(nn.LayerNorm(8))  # not a linear layer: loaded by load_state_dict
    autoquant.save(model, tmp_path)
    other = _mlp(h=64)
    other.append(nn.LayerNorm(9))
    with pytest.raises(ValueError, match=r"3\.(weight|bias) was saved with shape \[8\], this model's is \[9\]"):
        autoquant.load(other, tmp_path)


def test_nan_example_input_says_why_layers_stay_float(caplog):
    x = torch.randn(4, 64)
    x[0, 3] = float("nan")
    model = _mlp()
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        autoquant.autoquant(model, x, cache=None, progress=False, timer=FakeTimer(_cost), min_sqnr=20)
    rep = get_report(model)
    assert any("NaN or Inf" in w and "finite" in w for w in rep.warnings)
    floats = [p for p in rep.layers if p.winner is None or p.winner.family == "float"]
    assert floats, "a NaN activation passed an accuracy floor"
    assert all("NaN or Inf" in p.status for p in floats)
    assert any("NaN or Inf" in r.getMessage() for r in caplog.records)


def test_float64_model_says_to_cast():
    model = _mlp().double()
    autoquant.autoquant(model, torch.randn(4, 64, dtype=torch.float64), cache=None, progress=False,
                        timer=FakeTimer(_cost))
    rep = get_report(model)
    assert any("float64" in w and "float32 or bfloat16" in w for w in rep.warnings), rep.warnings
    assert not any("NOTHING could be timed" in w for w in rep.warnings)
    assert all("float64" in p.status for p in rep.layers)
