"""Shape profiles, pre-tuning, strict on_miss modes, and plans (save / apply, no benchmark)."""

import json
import logging

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant import CountingTimer, FakeTimer, MemoryStore, autoquant
from autoquant.candidates import QuantizedLinear
from autoquant.finalize import DispatchLinear
from autoquant.plan import apply_plan, load_plan, plan_of, save_plan
from autoquant.pretune import pretune
from autoquant.profile import ShapeProfile, load_profile, model_fingerprint, record_shapes
from autoquant.tune import CacheMissError


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 96)).eval()


def cheap_int8(key):
    return 1e-6 if key.candidate == "int8_dynamic" and '"fbgemm"' in key.params else 1e-4


def test_record_shapes_leaves_model_untouched(tmp_path):
    model = mlp()
    x = torch.randn(5, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = record_shapes(model, x, name="mlp")
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    counts = prof.counts()
    # layers 0 and 4 have the same op (5x64x96): counted twice
    assert counts == {aq.OpShape(5, 64, 96, True, "float32"): 2, aq.OpShape(5, 96, 64, True, "float32"): 1}
    assert prof.model_fingerprint == model_fingerprint(mlp(seed=1))
    prof.save(tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == prof
    with pytest.raises(ValueError, match="not an autoquant shape profile"):
        ShapeProfile.from_json(json.dumps({"format": "other"}))


def test_pretune_then_deploy_benchmarks_nothing():
    store = MemoryStore()
    prof = record_shapes(mlp(), torch.randn(5, 64))
    first = CountingTimer(FakeTimer(cheap_int8))
    s1 = pretune(prof, store, timer=first, progress=False)
    assert s1.ops == 2 and s1.timed > 0 and s1.cached == 0
    again = CountingTimer(FakeTimer(cheap_int8))
    s2 = pretune(prof, store, timer=again, progress=False)  # resumable: nothing left to time
    assert again.calls == 0 and s2.timed == 0 and s2.cached == s1.timed
    deploy = CountingTimer(FakeTimer(cheap_int8))
    model = mlp()
    autoquant(model, torch.randn(5, 64), cache=store, on_miss="error", progress=False, timer=deploy)
    assert deploy.calls == 0 and deploy.quick_calls == 0
    assert set(aq.report(model)["winner"]) == {"int8_dynamic"}


def test_on_miss_error_names_the_gap_and_keeps_model_float():
    model = mlp()
    x = torch.randn(5, 64)
    with pytest.raises(CacheMissError, match="autoquant pretune"):
        autoquant(model, x, cache=MemoryStore(), on_miss="error", progress=False, timer=FakeTimer(cheap_int8))
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if isinstance(m, nn.Linear))


def test_on_miss_baseline_times_nothing():
    timer = CountingTimer(FakeTimer(cheap_int8))
    model = mlp()
    autoquant(model, torch.randn(5, 64), cache=MemoryStore(), on_miss="baseline", progress=False, timer=timer)
    assert timer.calls == 0
    assert all(type(m) is nn.Linear for m in model if isinstance(m, (nn.Linear, QuantizedLinear)))
    with pytest.raises(ValueError, match="on_miss"):
        autoquant(mlp(), on_miss="maybe")


def test_plan_round_trip_benchmarks_nothing(tmp_path):
    model = mlp()
    x = torch.randn(5, 64)
    autoquant(model, x, cache=None, progress=False, timer=FakeTimer(cheap_int8))
    path = tmp_path / "plan.json"
    plan = save_plan(model, path)
    assert plan["layers"]["0"]["family"] == "int8_dynamic"
    assert plan["environment"]["device_kind"] == "cpu"
    fresh = mlp()
    apply_plan(fresh, path)
    assert [type(m).__name__ for m in fresh] == [type(m).__name__ for m in model]
    torch.testing.assert_close(fresh(x), model(x))
    assert plan_of(fresh)["layers"] == plan["layers"]


def test_apply_plan_warns_on_other_environment(tmp_path, caplog):
    model = mlp()
    autoquant(model, torch.randn(5, 64), cache=None, progress=False, timer=FakeTimer(cheap_int8))
    plan = plan_of(model)
    plan["environment"]["sku"] = "NVIDIA H100 80GB HBM3"
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        apply_plan(mlp(), plan)
    assert "plan was tuned on" in caplog.text and "sku" in caplog.text


def test_apply_plan_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not an autoquant plan"):
        load_plan({"format": "x"})
    plan = {"format": "autoquant-plan", "version": 1, "environment": None,
            "layers": {"nope": {"kind": "float"}}}
    with pytest.raises(ValueError, match="does not have"):
        apply_plan(mlp(), plan)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_plan(bad)


def test_plan_with_dispatch_round_trips():
    model = nn.Sequential(nn.Linear(64, 48)).eval().to(torch.bfloat16)  # int8pack runs bf16 on CPU
    timer = FakeTimer(lambda k: {"int8_weight_only": 1e-6 if k.op.m == 1 else 80e-6,
                                 "int8_dynamic": 9e-6 if k.op.m == 1 else 10e-6}.get(k.candidate, 1e-3)
                      if '"onednn"' not in k.params else 1e-3)
    autoquant(model, manual=True, cache=None, progress=False, timer=timer,
              candidates=["int8_weight_only", "int8_dynamic"])
    model(torch.randn(1, 64, dtype=torch.bfloat16))
    model(torch.randn(64, 64, dtype=torch.bfloat16))
    aq.finalize(model)
    assert isinstance(model[0], DispatchLinear)
    src = nn.Sequential(nn.Linear(64, 48)).eval().to(torch.bfloat16)
    apply_plan(src, plan_of(model))
    assert isinstance(src[0], DispatchLinear) and src[0].threshold == 64
    assert plan_of(src)["layers"] == plan_of(model)["layers"]


def test_m_buckets_cover_the_batch_sizes_a_deployment_sees():
    """Issue 17: a profile recorded at M=16, widened to M buckets, pretuned: a deployment at M=8
    (not recorded, but a bucket) with on_miss="error" benchmarks nothing; one at M=9 (no bucket)
    still raises CacheMissError naming the gap."""
    from autoquant.profile import parse_m_buckets

    store = MemoryStore()
    prof = record_shapes(mlp(), torch.randn(16, 64)).with_m(parse_m_buckets("1-32"))
    assert sorted({op.m for op, _ in prof.ops}) == [1, 2, 4, 8, 16, 32]
    assert prof.counts()[aq.OpShape(16, 64, 96, True, "float32")] == 2  # recorded counts kept
    assert prof.counts()[aq.OpShape(8, 64, 96, True, "float32")] == 1
    pretune(prof, store, timer=FakeTimer(cheap_int8), progress=False)
    deploy = CountingTimer(FakeTimer(cheap_int8))
    autoquant(mlp(), torch.randn(8, 64), cache=store, on_miss="error", progress=False, timer=deploy)
    assert deploy.calls == 0
    with pytest.raises(CacheMissError):
        autoquant(mlp(), torch.randn(9, 64), cache=store, on_miss="error", progress=False,
                  timer=FakeTimer(cheap_int8))
    for bad in ("0", "8-2", "x", ""):
        with pytest.raises(ValueError, match="M buckets"):
            parse_m_buckets(bad)


def test_on_miss_nearest_plans_from_the_nearest_measured_m(tmp_path):
    """Pretuned at M=16 only: a deployment at M=8 with on_miss="nearest" times nothing, plans from
    the M=16 figures (the winner there), and the report says so; on a SQL cache too."""
    from autoquant.cache_db import SQLStore

    for store in (MemoryStore(), SQLStore(tmp_path / "c.sqlite")):
        prof = record_shapes(mlp(), torch.randn(16, 64))
        pretune(prof, store, timer=FakeTimer(cheap_int8), progress=False)
        assert store.measured_ms(aq.hardware.environment(torch.device("cpu")).hash, 64, 96, True,
                                 "float32") == {16}
        deploy = CountingTimer(FakeTimer(cheap_int8))
        model = mlp()
        autoquant(model, torch.randn(8, 64), cache=store, on_miss="nearest", progress=False, timer=deploy)
        assert deploy.calls == 0 and deploy.quick_calls == 0
        frame = aq.report(model)
        assert set(frame["winner"]) == {"int8_dynamic"}
        statuses = set(aq.get_report(model).to_frame()["status"])
        assert statuses == {"tuned (planned from the nearest measured M: M=8 from M=16)"}, statuses
        ops = aq.get_report(model).to_ops_frame()
        assert set(ops["status"]) <= {"cached at M=16 (nearest M; on_miss='nearest')"} | {
            s for s in ops["status"] if not s.startswith(("cached", "measured"))}
