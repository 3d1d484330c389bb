"""Tuning time that scales with the work (issue 19): probes at fewer rows predict each candidate's
full-size cost, the hopeless ones are skipped without a full-size call, a per-op budget bounds
the samples, and the winners stay those of exhaustive timing.

The fake timer's costs follow a roofline per kernel (weight read vs arithmetic at the kernel's
rate), so they grow with M as real kernels' do: flat while the weight read dominates, then
linear. Slow kernels (int8pack, int4 tinygemm on fp32 activations) are compute-bound from the
first row, at ~1 GFLOP/s, as on the reference CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autoquant.bench import CountingTimer, FakeTimer
from autoquant.candidates import (
    FloatCandidate,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    default_candidates,
)
from autoquant.config import TuneConfig
from autoquant.costmodel import hopeless_prediction, op_cost, predict, probe_rows, timed_parts
from autoquant.keys import Measurement, OpShape, Timed
from autoquant.store import MemoryStore
from autoquant.tune import _Bar, estimate_op_seconds, tune_ops

CPU = torch.device("cpu")

# (family, kernel, compute_dtype or group size) -> (FLOP/s at large M, weight bytes per element)
RATES = {
    ("float", "aten", None): (40e9, 4.0),
    ("float", "onednn", None): (45e9, 4.0),
    ("float", "fbgemm_fp16", None): (30e9, 2.0),
    ("float", "aten", "bfloat16"): (60e9, 2.0),
    ("float", "aten", "float16"): (20e9, 2.0),
    ("int8_dynamic", "fbgemm", None): (90e9, 1.0),
    ("int8_dynamic", "onednn", None): (100e9, 1.0),
    ("int8_smooth", "fbgemm", None): (85e9, 1.0),  # int8_dynamic fbgemm plus a per-channel scale
    ("int8_weight_only", "int8pack", None): (1e9, 1.0),
    ("int4_weight_only", "tinygemm_cpu", 32): (0.5e9, 0.5),
    ("int4_weight_only", "tinygemm_cpu", 64): (0.55e9, 0.5),
    ("int4_weight_only", "tinygemm_cpu", 128): (0.6e9, 0.5),
}
SLOW = {"int8_weight_only", "int4_weight_only"}


def roofline(key) -> float:
    params = json.loads(key.params)
    extra = params.get("compute_dtype") if key.candidate == "float" else params.get("group_size")
    rate, bytes_per = RATES[(key.candidate, params.get("kernel"), extra)]
    op = key.op
    t = 5e-6 + max(op.k * op.n * bytes_per / 10e9, 2.0 * op.m * op.k * op.n / rate)
    return 0.8 * t if key.timed is Timed.MATMUL else t


def cliff(candidate: str, kernel: str, from_m: int, times: float):
    """The roofline, except `candidate`/`kernel` gets `times` slower from `from_m` rows on: probes
    below that row count under-predict it."""

    def cost(key):
        t = roofline(key)
        if key.candidate == candidate and json.loads(key.params).get("kernel") == kernel and key.op.m >= from_m:
            t *= times
        return t
    return cost


VIT_H = [OpShape(4096, 1280, 3840, True, "float32"), OpShape(4096, 1280, 1280, True, "float32"),
         OpShape(4096, 1280, 5120, True, "float32"), OpShape(4096, 5120, 1280, True, "float32")]
# The kernels that matter on a ViT-H op (building all defaults at these widths costs seconds each).
VIT_CANDS = [FloatCandidate("aten"), FloatCandidate("aten", "bfloat16"), Int8Dynamic("fbgemm"),
             Int8Dynamic("onednn"), Int8WeightOnly("int8pack"), Int4WeightOnly("tinygemm_cpu", 32),
             Int4WeightOnly("tinygemm_cpu", 128)]


def exhaustive_winner(op, cands, cost_fn, config=None):
    """What exhaustive timing picks with a deterministic timer: the cheapest by the cost model."""
    config = config or TuneConfig()
    costs = {}
    for c in cands:
        if c.supports(CPU, op) is not None:
            continue
        parts = {p: Measurement(cost_fn(_key(c, op, p)), cost_fn(_key(c, op, p)), cost_fn(_key(c, op, p)), 1)
                 for p in timed_parts(config.cost_model, c.dynamic_activation)}
        costs[c] = op_cost(config.cost_model, c.dynamic_activation, parts).value
    return min(costs, key=lambda c: (costs[c], c.order, c.params_json()))


def _key(cand, op, part):
    from autoquant.tune import bench_key

    return bench_key("e", cand, op, part)


def winner(trials):
    ok = {c: t.cost.value for c, t in trials.items() if t.ok}
    return min(ok, key=lambda c: (ok[c], c.order, c.params_json()))


def full_size(keys, op):
    return [k for k in keys if k.op == op]


@pytest.fixture(scope="module")
def vit_run():
    """ViT-H's four ops tuned once (building their candidates is what costs), cold then warm."""
    store = MemoryStore()
    timer = CountingTimer(FakeTimer(roofline, run=False))
    ops = {op: VIT_CANDS for op in VIT_H}
    cold = tune_ops(ops, CPU, store, timer, TuneConfig(), progress=False)
    again = CountingTimer(FakeTimer(roofline, run=False))
    warm = tune_ops(ops, CPU, store, again, TuneConfig(), progress=False)
    return cold, timer, warm, again


def test_probe_rows_and_prediction():
    assert probe_rows(16) == probe_rows(63) == ()  # a full-size call is cheap enough
    assert probe_rows(64) == (1, 4)
    assert probe_rows(4096) == (1, 4, 16, 64, 256)
    # linear growth: the point prediction extrapolates it, the lower bound trusts 3/4 of it
    p = predict([(16, 1e-3), (64, 4e-3)], 4096)
    assert p.point == pytest.approx(0.256) and p.low == pytest.approx(4e-3 * 64 ** 0.75)
    assert p.low <= p.point
    # flat (weight-bound) probes predict no growth; time never falls with M
    assert predict([(1, 2e-3), (4, 1e-3)], 4096).low == pytest.approx(1e-3)
    # a weight-bound kernel with one probe 1.45x slow (noise): its bound does not extrapolate it
    noisy = predict([(1, 1e-3), (4, 1.45e-3)], 4096)
    assert noisy.low == pytest.approx(1.45e-3) and noisy.point > noisy.low
    with pytest.raises(ValueError):
        predict([], 10)
    # skipping needs two probes in a row to agree: a one-row fast path (a jump from 1 to 4 rows,
    # then slow growth) is not taken for linear growth
    jump = [(1, 1e-4), (4, 4e-3), (16, 4.5e-3)]
    assert predict(jump[:2], 4096).low > 4 * 0.01  # one step alone would skip it ...
    assert hopeless_prediction(jump, 4096, 4.0, 0.01) is None  # ... two do not
    linear = [(1, 1e-3), (4, 4e-3), (16, 16e-3)]
    assert hopeless_prediction(linear, 4096, 4.0, 0.01).rows == tuple(linear)
    assert hopeless_prediction(linear, 4096, 0.0, 0.01) is None  # hopeless_factor=0: never


def test_expensive_kernels_are_never_called_at_full_size(vit_run):
    cold, timer, _, _ = vit_run
    for op in VIT_H:
        trials = cold[op]
        full = full_size(timer.keys, op) + full_size(timer.quick_keys, op)
        called = {k.candidate for k in full}
        assert not called & SLOW, f"{op.label()}: slow kernels called at full size"
        for cand, trial in trials.items():
            if cand.family in SLOW:
                assert trial.skipped and trial.cost is None and trial.reason.startswith("skipped: predicted")
                assert trial.prediction.low > 4.0 * min(t.cost.value for t in trials.values() if t.ok)
                assert trial.prediction.rows and all(m <= op.m // 16 for m, _ in trial.prediction.rows)
        # probes are few and small: at most 1/16 of the op's rows, stored as their own shapes
        probed = {k.op.m for k in timer.keys if k.op.k == op.k and k.op.n == op.n and k.op.m != op.m}
        assert probed and max(probed) <= op.m // 16


def test_winners_equal_exhaustive_timing_on_vit_h(vit_run):
    cold, _, _, _ = vit_run
    for op in VIT_H:
        assert winner(cold[op]) == exhaustive_winner(op, VIT_CANDS, roofline)
        # the candidates in reach were measured in full (not skipped)
        assert cold[op][FloatCandidate("aten")].ok and cold[op][Int8Dynamic("onednn")].ok


def test_warm_cache_times_nothing_and_skips_the_same(vit_run):
    cold, _, warm, again = vit_run
    assert again.calls == 0 and again.quick_calls == 0
    for op in VIT_H:
        assert winner(warm[op]) == winner(cold[op])
        assert {c for c, t in warm[op].items() if t.skipped} == {c for c, t in cold[op].items() if t.skipped}
        assert all(t.cached for t in warm[op].values() if t.ok or t.skipped)


def test_strict_cache_accepts_skipped_candidates():
    """A cache that skipped candidates is complete for on_miss='error': nothing to pre-tune."""
    store = MemoryStore()
    op = OpShape(1024, 512, 2048, True, "float32")
    cands = [FloatCandidate("aten"), Int8Dynamic("fbgemm"), Int8WeightOnly("int8pack")]
    first = tune_ops({op: cands}, CPU, store, FakeTimer(roofline, run=False), TuneConfig(), progress=False)
    assert first[op][Int8WeightOnly("int8pack")].skipped
    strict = CountingTimer(FakeTimer(roofline, run=False))
    out = tune_ops({op: cands}, CPU, store, strict, TuneConfig(), progress=False, on_miss="error")
    assert strict.calls == strict.quick_calls == 0 and out[op][Int8WeightOnly("int8pack")].skipped


def test_under_predicted_candidate_is_caught_by_its_first_call():
    """int8 oneDNN falls off a cliff above 256 rows: its probes (at most 256 rows) look fine, so it
    is not skipped, but its first full-size call sets it aside: one call, never a full timing."""
    op = OpShape(4096, 1280, 1280, True, "float32")
    cost = cliff("int8_dynamic", "onednn", 1024, 200.0)
    timer = CountingTimer(FakeTimer(cost, run=False))
    cands = [FloatCandidate("aten"), Int8Dynamic("fbgemm"), Int8Dynamic("onednn"), Int8WeightOnly("int8pack")]
    trials = tune_ops({op: cands}, CPU, MemoryStore(), timer, TuneConfig(), progress=False)[op]
    onednn = trials[Int8Dynamic("onednn")]
    assert not onednn.skipped and onednn.set_aside and onednn.prediction is not None
    assert onednn.prediction.point < cost(_key(Int8Dynamic("onednn"), op, Timed.FULL)) / 10  # under-predicted
    quick_full = [k for k in full_size(timer.quick_keys, op) if '"onednn"' in k.params]
    assert len(quick_full) == 1  # the first real call, and only it
    assert not [k for k in full_size(timer.keys, op) if '"onednn"' in k.params]  # never a full timing
    assert onednn.first_call_s == pytest.approx(cost(_key(Int8Dynamic("onednn"), op, Timed.FULL)))
    assert winner(trials) == exhaustive_winner(op, cands, cost)
    assert trials[Int8WeightOnly("int8pack")].skipped


def test_no_probing_without_hopeless_factor():
    """hopeless_factor=0 is exhaustive timing: every candidate measured at full size, no probe."""
    op = OpShape(4096, 1280, 1280, True, "float32")
    timer = CountingTimer(FakeTimer(roofline, run=False))
    cands = [FloatCandidate("aten"), Int8Dynamic("fbgemm"), Int8WeightOnly("int8pack")]
    trials = tune_ops({op: cands}, CPU, MemoryStore(), timer, TuneConfig(hopeless_factor=0, op_budget_s=None),
                      progress=False)[op]
    assert all(t.ok and not t.skipped for t in trials.values())
    assert {k.op.m for k in timer.keys} == {op.m} and timer.quick_calls == 0
    assert {b for _, b in timer.budgets} == {None}


def test_small_ops_are_not_probed():
    """Where even a slow kernel's full-size call is cheap, no probe is spent: the demo MLP's ops."""
    op = OpShape(256, 64, 96, True, "float32")  # rows enough to probe, work too small to bother
    timer = CountingTimer(FakeTimer(roofline, run=False))
    cands = [FloatCandidate("aten"), Int8Dynamic("fbgemm"), Int8WeightOnly("int8pack")]
    tune_ops({op: cands}, CPU, MemoryStore(), timer, TuneConfig(), progress=False)
    assert {k.op.m for k in timer.keys + timer.quick_keys} == {op.m}


def test_budget_reaches_the_timer():
    op = OpShape(4096, 1280, 1280, True, "float32")
    timer = CountingTimer(FakeTimer(roofline, run=False))
    tune_ops({op: [FloatCandidate("aten"), Int8Dynamic("fbgemm")]}, CPU, MemoryStore(), timer,
             TuneConfig(op_budget_s=2.0), progress=False)
    full = [b for k, b in timer.budgets if k.op == op]
    assert full and all(b is not None and 0.0 <= b <= 2.0 for b in full)
    with pytest.raises(ValueError, match="op_budget_s"):
        TuneConfig(op_budget_s=0)
    assert TuneConfig.from_json(TuneConfig(op_budget_s=1.5).to_json()).op_budget_s == 1.5


def _model_ops(model, x):
    from autoquant.profile import record_shapes

    return record_shapes(model, x).counts()


def _winners_match_exhaustive(ops):
    cands = {op: default_candidates(CPU, op.torch_dtype) for op in ops}
    adaptive = tune_ops(cands, CPU, MemoryStore(), FakeTimer(roofline, run=False), TuneConfig(), progress=False)
    exhaustive = tune_ops(cands, CPU, MemoryStore(), FakeTimer(roofline, run=False),
                          TuneConfig(hopeless_factor=0, op_budget_s=None), progress=False)
    for op in ops:
        assert winner(adaptive[op]) == winner(exhaustive[op]) == exhaustive_winner(op, cands[op], roofline), op.label()


def test_winners_equal_exhaustive_on_demo_mlp():
    from autoquant.demo import DemoMLP

    torch.manual_seed(0)
    _winners_match_exhaustive(_model_ops(DemoMLP(hidden=256, blocks=1, out=64).eval(), torch.randn(16, 256)))


def test_winners_equal_exhaustive_on_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _winners_match_exhaustive(_model_ops(model, torch.randint(0, 256, (1, 384))))


def test_progress_weighs_ops_by_their_work():
    config = TuneConfig()
    big = estimate_op_seconds(VIT_H[0], 10, config, CPU)
    small = estimate_op_seconds(OpShape(16, 1024, 4096, True, "float32"), 10, config, CPU)
    assert big > 2 * small
    # the budget caps the timing part: the same op with 8x the rows weighs the same
    assert estimate_op_seconds(OpShape(8 * 4096, 1280, 3840, True, "float32"), 10, config, CPU) == big
    assert estimate_op_seconds(VIT_H[0], 10, TuneConfig(op_budget_s=None), CPU) > big
    bar = _Bar({VIT_H[0]: big, OpShape(16, 1024, 4096, True, "float32"): small}, enabled=False)
    assert bar.eta_s() is None
    bar.done(OpShape(16, 1024, 4096, True, "float32"), 2)
    eta = bar.eta_s()
    assert eta is not None and math.isfinite(eta) and eta >= 0


def test_report_shows_predictions_and_skips():
    """The report says, per op and candidate, what was predicted, what was skipped and why."""
    from torch import nn

    import autoquant as aq
    from autoquant import autoquant

    model = nn.Sequential(nn.Linear(64, 48)).eval()
    # tiny widths standing in for large ones: every figure 10^4 times the roofline's
    autoquant(model, torch.randn(1024, 64), cache=None, progress=False,
              timer=FakeTimer(lambda k: 1e4 * roofline(k)), candidates=["float", "int8_dynamic", "int8_weight_only"])
    ops = aq.get_report(model).to_ops_frame().set_index("candidate")
    pack = ops.loc["int8_weight_only(kernel=int8pack)"]
    assert pack["status"].startswith("skipped: predicted") and pack["cost_us"] != pack["cost_us"]  # NaN
    assert pack["predicted_low_us"] > 4 * ops["cost_us"].min() and pack["predicted_us"] >= pack["predicted_low_us"]
    base = ops.loc["float(kernel=aten, compute_dtype=None)"]
    assert base["status"] == "measured" and base["first_call_us"] > 0 and base["samples"] >= 1
    long = aq.report(model, long=True).set_index("candidate")
    assert bool(long.loc["int8_weight_only(kernel=int8pack)", "skipped"])
    assert long.loc["int8_weight_only(kernel=int8pack)", "predicted_us"] > 0
    assert "skipped: predicted" in aq.report(model).iloc[0]["int8_weight_only(kernel=int8pack)"]


def test_probes_come_from_the_cache_for_neighbouring_shapes():
    """Probes are measurements of their own shapes: tuning the same weights at more rows later
    (a larger batch) predicts from the cached ones instead of timing them again."""
    store = MemoryStore()
    cands = [FloatCandidate("aten"), Int8Dynamic("fbgemm"), Int8WeightOnly("int8pack"),
             Int4WeightOnly("tinygemm_cpu", 32)]
    small, large = OpShape(1024, 1280, 1280, True, "float32"), OpShape(4096, 1280, 1280, True, "float32")
    first = CountingTimer(FakeTimer(roofline, run=False))
    tune_ops({small: cands}, CPU, store, first, TuneConfig(), progress=False)
    probed = {(k.candidate, k.params, k.op.m) for k in first.keys if k.op.m < small.m}
    assert probed
    second = CountingTimer(FakeTimer(roofline, run=False))
    trials = tune_ops({large: cands}, CPU, store, second, TuneConfig(), progress=False)[large]
    again = {(k.candidate, k.params, k.op.m) for k in second.keys if k.op.m < large.m}
    assert not probed & again  # nothing probed twice
    assert trials[Int8WeightOnly("int8pack")].skipped and trials[Int4WeightOnly("tinygemm_cpu", 32)].skipped
    assert not [k for k in second.keys + second.quick_keys if k.op == large and k.candidate in SLOW]
