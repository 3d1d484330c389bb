"""save / load: safetensors + plan JSON, no pickle, no benchmark, exact outputs, meta skeletons."""

import json

import pytest
import torch
from helpers import require_module
from torch import nn

import autoquant as aq
from autoquant import CpuTimer, CudaTimer, FakeTimer, autoquant
from autoquant.candidates import QuantizedLinear
from autoquant.serialize import PLAN_FILE, WEIGHTS_FILE


def _transformers():
    return require_module("transformers")


@pytest.fixture
def no_timing(monkeypatch):
    """Every timing entry point of the real harnesses counts its calls: load must make none."""
    calls: list[str] = []
    for cls in (CpuTimer, CudaTimer):
        for name in ("quick", "measure", "measure_within"):
            if hasattr(cls, name):
                def spy(*args, _name=f"{cls.__name__}.{name}", **kwargs):
                    calls.append(_name)
                    raise AssertionError(f"{_name} called during load")
                monkeypatch.setattr(cls, name, spy)
    return calls


def int8_cheap(key):
    return 1e-6 if key.candidate == "int8_dynamic" and '"fbgemm"' in key.params else 1e-3


def llama(tied=True):
    cfg = _transformers().LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied)
    return cfg


def bert_cfg():
    return _transformers().BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=256, max_position_embeddings=64)


def test_mlp_round_trip_exact(tmp_path, no_timing):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    x = torch.randn(5, 64)
    autoquant(model, x, cache=None, progress=False, timer=FakeTimer(int8_cheap))
    aq.save(model, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / PLAN_FILE).is_file()
    plan = json.loads((tmp_path / PLAN_FILE).read_text())
    assert plan["layers"]["0"]["family"] == "int8_dynamic"
    fresh = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    aq.load(fresh, tmp_path)
    assert isinstance(fresh[0], QuantizedLinear)
    assert torch.equal(fresh(x), model(x))
    assert no_timing == []
    # the file is safetensors: no pickle opcodes anywhere
    assert not (tmp_path / WEIGHTS_FILE).read_bytes().startswith(b"\x80")


def test_llama_meta_skeleton_tied_weights_generate(tmp_path, no_timing):
    transformers = _transformers()
    cfg = llama(tied=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 12))
    autoquant(model, ids, cache=None, progress=False, timer=FakeTimer(int8_cheap))
    df = aq.report(model).set_index("layer")
    assert df.loc["lm_head", "status"].startswith("skipped: weight shared")
    aq.save(model, tmp_path)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg).eval()
    aq.load(skeleton, tmp_path)
    assert no_timing == []
    assert all(p.device.type == "cpu" for p in skeleton.parameters())
    assert all(b.device.type == "cpu" for b in skeleton.buffers())
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, model(ids).logits)
        out = skeleton.generate(ids, max_new_tokens=4, do_sample=False)
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert skeleton.lm_head.weight.data_ptr() == skeleton.model.embed_tokens.weight.data_ptr()


def test_bert_round_trip(tmp_path):
    transformers = _transformers()
    torch.manual_seed(0)
    model = transformers.BertModel(bert_cfg()).eval()
    ids = torch.randint(0, 512, (2, 16))
    autoquant(model, ids, cache=None, progress=False, timer=FakeTimer(int8_cheap))
    aq.save(model, tmp_path)
    fresh = transformers.BertModel(bert_cfg()).eval()
    aq.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)


def test_save_load_errors(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    autoquant(model, manual=True, cache=None, progress=False)
    with pytest.raises(RuntimeError, match="finalize"):
        aq.save(model, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a directory written by autoquant.save"):
        aq.load(nn.Sequential(nn.Linear(8, 8)), tmp_path / "nothing")
    done = nn.Sequential(nn.Linear(8, 8))
    autoquant(done, torch.randn(2, 8), cache=None, progress=False, timer=FakeTimer(int8_cheap))
    aq.save(done, tmp_path / "ok")
    with pytest.raises(ValueError, match="does not have"):
        aq.load(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).get_submodule("1").__class__(8, 8), tmp_path / "ok")
