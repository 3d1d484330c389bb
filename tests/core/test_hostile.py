"""Hostile input: each case gives a clear message (or a clear report line) and loses nothing."""

import logging
import math

import pytest
import torch
from torch import nn

import autoquant as aq
from autoquant import FakeTimer, autoquant
from autoquant.candidates import QuantizedLinear


def int8_cheap(key):
    return 1e-6 if key.candidate == "int8_dynamic" and '"fbgemm"' in key.params else 1e-3


def run(model, example, **kw):
    kw.setdefault("timer", FakeTimer(int8_cheap))
    kw.setdefault("cache", None)
    return autoquant(model, example, progress=False, **kw)


def test_model_without_linear(caplog):
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
    x = torch.randn(2, 3, 8)
    ref = model(x)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        run(model, x)
    assert "no nn.Linear layer to tune" in caplog.text
    assert aq.report(model).empty
    assert torch.equal(model(x), ref)


def test_nan_weight_layer_kept_float_and_reported():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight[3, 5] = float("nan")
        model[1].weight[0, 0] = float("inf")
    run(model, torch.randn(2, 32))
    df = aq.report(model).set_index("layer")
    assert df.loc["0", "status"] == "skipped: weight holds NaN or Inf: kept float"
    assert df.loc["1", "status"] == "skipped: weight holds NaN or Inf: kept float"
    assert type(model[0]) is nn.Linear and math.isnan(model[0].weight[3, 5].item())


def test_meta_weights_are_skipped_with_reason():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16))
    autoquant(model, manual=True, cache=None, progress=False)
    aq.finalize(model)
    assert aq.report(model).iloc[0]["status"].startswith("skipped: weight on the meta device")


def test_k_not_multiple_of_group_is_reported():
    model = nn.Sequential(nn.Linear(96, 64)).to(torch.bfloat16)  # K=96: int4 G=64/128 cannot run
    run(model, torch.randn(3, 96, dtype=torch.bfloat16), candidates=["int4_weight_only"],
        timer=FakeTimer(lambda k: 1e-6 if k.candidate == "int4_weight_only" else 1e-3))
    long = aq.report(model, long=True)
    g64 = long[long["candidate"].str.contains("group_size=64")]
    assert g64["reason"].str.contains("not a multiple of group_size=64").all()
    g32 = long[long["candidate"].str.contains("group_size=32")]
    assert g32["chosen"].all()


@pytest.mark.parametrize("shape", [(32,), (2, 3, 32), (2, 2, 3, 32)], ids=["1d", "3d", "4d"])
def test_activation_ranks_after_finalize(shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    x = torch.randn(*shape)
    ref = model(x)
    run(model, x)
    assert isinstance(model[0], QuantizedLinear)
    y = model(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=0.05, rtol=0.05)


def test_non_contiguous_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    x = torch.randn(32, 10).t()  # [10, 32], not contiguous
    assert not x.is_contiguous()
    ref = model(x)
    run(model, x)
    torch.testing.assert_close(model(x), ref, atol=0.05, rtol=0.05)


def test_unseen_shape_after_finalize_still_correct():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    run(model, torch.randn(4, 32))
    x = torch.randn(77, 32)
    torch.testing.assert_close(model(x), nn.functional.linear(x, *_float_params(model)), atol=0.05, rtol=0.05)


def _float_params(model):
    layer = model[0]
    packed = layer.packed()
    w = packed["w_int8"].float() * packed["w_scale"].float()[:, None]
    return w, layer.bias


def test_finalize_before_any_forward(caplog):
    model = nn.Sequential(nn.Linear(16, 16))
    autoquant(model, manual=True, cache=None, progress=False)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        aq.finalize(model)
    assert aq.report(model).iloc[0]["status"] == "unseen"
    assert "no forward pass was recorded" in caplog.text
    assert type(model[0]) is nn.Linear and type(model[0].weight) is nn.Parameter


def test_autoquant_twice_after_finalize_warns_and_keeps_model(caplog):
    model = nn.Sequential(nn.Linear(16, 16))
    run(model, torch.randn(2, 16))
    layer = model[0]
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        assert autoquant(model, torch.randn(2, 16), cache=None) is model
    assert "already tuned" in caplog.text and model[0] is layer


def test_cache_disk_full_mid_run_finishes_in_memory(tmp_path, caplog):
    """A real SQLite file whose page budget runs out while measurements are written."""
    import sqlite3

    path = tmp_path / "full.sqlite"
    from autoquant.cache_db import SQLStore

    with SQLStore(path) as store:
        store.get_many([])  # create the schema
    pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]

    from sqlalchemy import event

    store = SQLStore(path)

    # SQLite's page budget stands in for a full disk: writes fail with "database or disk is full"
    @event.listens_for(store._engine, "connect")
    def _limit(dbapi_conn, _):  # noqa: ANN001 - sqlite3 connection
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 1}")

    store._engine.dispose()
    model = nn.Sequential(*[nn.Linear(64 + 16 * i, 64 + 16 * (i + 1)) for i in range(6)])
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        run(model, torch.randn(3, 64), cache=store)
    rep = aq.get_report(model)
    assert any("continuing in memory" in w for w in rep.warnings), rep.warnings
    assert "full" in " ".join(rep.warnings).lower()
    assert all(isinstance(m, QuantizedLinear) for m in model)


@pytest.fixture
def fresh_dtype_warnings():
    from autoquant.candidates import base

    base._WARNED_DTYPES.clear()
    yield
    base._WARNED_DTYPES.clear()


def test_dtype_change_after_finalize(caplog, fresh_dtype_warnings):
    """bf16 inputs to a layer tuned in fp32 are computed in fp32 and cast back, with ONE clear
    warning; model.to(bf16) keeps the packed weights' dtypes; a non-float input is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(4, 32)
    run(model, x)
    layer = model[0]
    assert isinstance(layer, QuantizedLinear) and layer.act_dtype == torch.float32
    ref = model(x)
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        y = model(x.to(torch.bfloat16))
        model(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)
    msgs = [r.getMessage() for r in caplog.records if "was tuned for" in r.getMessage()]
    assert len(msgs) == 1, msgs  # once per dtype pair, not once per layer or call
    assert "torch.float32" in msgs[0] and "torch.bfloat16" in msgs[0] and "layer '0'" in msgs[0]

    scales = {n: b.dtype for n, b in layer.named_buffers()}
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        model.to(torch.bfloat16)
    assert {n: b.dtype for n, b in layer.named_buffers()} == scales  # w_scale stays float32
    assert "model cast to torch.bfloat16 after autoquant finalized it" in caplog.text
    y2 = model(x.to(torch.bfloat16))
    assert y2.dtype == torch.bfloat16
    torch.testing.assert_close(y2.float(), ref, atol=0.05, rtol=0.05)
    model.float()
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)  # nothing was lost on the way

    with pytest.raises(TypeError, match="needs floating-point activations"):
        layer(torch.ones(4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="input has 31 features"):
        layer(torch.randn(4, 31))


def test_unseen_shapes_after_finalize_are_flagged_in_report(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    run(model, torch.randn(4, 32))
    assert model[0].tuned_m == frozenset({4})
    model(torch.randn(4, 32))  # tuned shape: not flagged
    assert aq.report(model)["unseen_after"].tolist() == ["", ""]
    model(torch.randn(77, 32))
    model(torch.randn(77, 32))
    model(torch.randn(2, 3, 32))  # 3-D: M = 6 rows
    df = aq.report(model).set_index("layer")
    assert df.loc["0", "unseen_after"] == "M=6 x1; M=77 x2"
    assert df.loc["2", "unseen_after"] == "M=6 x1; M=77 x2"
    assert "unseen_after" in aq.get_report(model).to_markdown()
    assert "never showed" in aq.get_report(model).summary()

    # The tuned M values travel with a saved model: a reloaded one flags the same way.
    aq.save(model, tmp_path / "m")
    fresh = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    aq.load(fresh, tmp_path / "m")
    assert fresh[0].tuned_m == frozenset({4}) and fresh[0].act_dtype == torch.float32
    fresh(torch.randn(4, 32))
    assert not fresh[0].unseen_m
    fresh(torch.randn(9, 32))
    assert fresh[0].unseen_m == {9: 1}


def test_unseen_shapes_not_counted_under_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    run(model, torch.randn(4, 32))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(13, 32)
    torch.testing.assert_close(compiled(x), model[0](x), atol=1e-5, rtol=1e-5)
    assert model[0].unseen_m == {13: 1}  # the eager reference call counts; the compiled one does not
