"""autoquant.primitives: the quantization conventions every family and kernel relies on."""

from __future__ import annotations

import math

import pytest
import references as R
import torch
from helpers import make_input
from hypothesis import given, settings
from hypothesis import strategies as st

import autoquant.kernels as kernels
from autoquant import primitives as P

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_sqnr():
    ref = torch.ones(100)
    assert P.sqnr(ref, ref) == math.inf
    assert P.sqnr(ref, ref * 1.1) == pytest.approx(20.0)
    assert math.isnan(P.sqnr(ref, torch.full((100,), float("nan"))))


# ---- int8 -------------------------------------------------------------------------------------
def test_int8_weight_per_channel_formula():
    w = make_input((6, 40), torch.float32, seed=1) * torch.arange(1, 7)[:, None]
    w[3] = 0
    q, s = P.int8_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[[0, 1, 2, 4, 5]] == 127).all()
    assert s[3] == P.SCALE_EPS and (q[3] == 0).all()
    torch.testing.assert_close(s[0], w[0].abs().max() / 127)
    assert P.sqnr(w, P.dequant_int8_per_channel(q, s)) > 38


def test_int8_rounds_half_to_even():
    # Row amax 127 -> scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2.
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, 3.5]])
    q, s = P.int8_weight_per_channel(w)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, -2, 4]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_same_codes_for_any_weight_dtype(dtype):
    w = make_input((8, 64), torch.float32, seed=2).to(dtype)
    q1, s1 = P.int8_weight_per_channel(w)
    q2, s2 = P.int8_weight_per_channel(w.float())
    assert torch.equal(q1, q2) and torch.equal(s1, s2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_matches_the_triton_contract(dtype):
    x = make_input((9, 70), dtype, seed=3)
    x[4] = 0
    q, s = P.int8_act_per_token(x)
    q_ref, s_ref = kernels.quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q63, s63 = P.int8_act_per_token(x, 63)
    assert q63.abs().max() <= 63 and torch.allclose(s63 * 63, s * 127)
    u8, s_u8 = P.uint8_act_per_token_offset(x, 63, 64)
    assert u8.dtype == torch.uint8 and torch.equal(u8.int() - 64, q63.int()) and torch.equal(s_u8, s63)


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(-50, 50), width=st.floats(0, 100), reduce=st.booleans(), n=st.integers(1, 64),
       seed=st.integers(0, 2**16))
def test_uint8_per_tensor_qparams_match_torch(lo, width, reduce, n, seed):
    """Our mirror of fbgemm's ChooseQuantizationParams against torch's own implementation."""
    gen = torch.Generator().manual_seed(seed)
    x = lo + width * torch.rand(3, n, generator=gen)
    scale, zp = P.uint8_act_per_tensor_qparams(x, 127 if reduce else 255)
    t_scale, t_zp = torch._choose_qparams_per_tensor(x, reduce)
    assert zp == t_zp
    assert scale == pytest.approx(t_scale, rel=1e-6)


@pytest.mark.parametrize("values", [[0.0, 0.0], [1e-9, 2e-9], [-3.0, -1.0], [2.0, 5.0]], ids=str)
def test_uint8_per_tensor_edge_ranges(values):
    x = torch.tensor([values])
    scale, zp = P.uint8_act_per_tensor_qparams(x, 127)
    t_scale, t_zp = torch._choose_qparams_per_tensor(x, True)
    assert zp == t_zp and scale == pytest.approx(t_scale, rel=1e-6)
    q, _, _ = P.uint8_act_per_tensor(x, 127)
    assert q.dtype == torch.uint8 and int(q.max()) <= 127


# ---- int4 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int4_grouped_asym(group, dtype):
    w = make_input((16, 256), torch.float32, seed=4).to(dtype)
    w[5, :group] = 0.25  # a constant group
    q, scales, zeros = P.int4_grouped_asym(w, group, dtype)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert scales.shape == zeros.shape == (256 // group, 16) and scales.dtype == zeros.dtype == dtype
    w_hat = P.int4_grouped_dequant(q, scales, zeros, group)
    # Each value lands within half a step (plus qparam rounding) of the original.
    step = scales.float().t().repeat_interleave(group, 1)
    slack = {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    assert ((w_hat - w.float()).abs() <= step * (0.5 + slack) + 1e-6).all()
    torch.testing.assert_close(w_hat[5, :group], torch.full((group,), 0.25), rtol=0, atol=0.002)
    assert P.sqnr(w.float(), w_hat) > 17


def test_int4_rejects_ragged_k():
    with pytest.raises(ValueError, match="multiple of group_size"):
        P.int4_grouped_asym(torch.randn(4, 96), 64, torch.float32)


def test_int4_matches_tinygemm_cpu_convention():
    """(q - 8) * scale + zero is what _weight_int4pack_mm_for_cpu computes."""
    w = make_input((32, 128), torch.float32, seed=5)
    q, scales, zeros = P.int4_grouped_asym(w, 32, torch.float32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x = make_input((3, 128), torch.float32, seed=6)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, torch.stack([scales, zeros], 2))
    torch.testing.assert_close(y, x @ P.int4_grouped_dequant(q, scales, zeros, 32).T, rtol=1e-5, atol=1e-5)


def test_int4_packing():
    q = torch.randint(0, 16, (8, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(7))
    packed = P.pack_int4_lo_first(q)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 1]) << 4
    assert torch.equal(P.unpack_int4_lo_first(packed), q)
    hi = P.swap_nibbles(packed)
    assert int(hi[0, 0]) == int(q[0, 0]) << 4 | int(q[0, 1])
    assert torch.equal(P.swap_nibbles(hi), packed)
    assert torch.equal(kernels.pack_int4(q), packed)


# ---- fp8 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_per_row(dtype):
    t = make_input((6, 50), torch.float32, seed=8).to(dtype)
    t[1] = 0
    t[2, 3] = 1e30 if dtype == torch.float32 else 1e4  # a huge value must not become NaN
    q, s = P.fp8_per_row(t)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6,) and s.dtype == torch.float32
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= 448
    assert (q[1].float() == 0).all() and s[1] == P.ACT_EPS
    assert P.sqnr(t.float()[[0, 3, 4, 5]], P.dequant_fp8_per_row(q, s)[[0, 3, 4, 5]]) > 28
    q_ref, s_ref = kernels.quantize_rowwise_fp8_reference(t)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


# ---- devices ----------------------------------------------------------------------------------
def _definition_codes(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, where a rounding tie may flip a code) from the float64 definitions (tests/references)."""
    if name == "int8_weight":
        codes, _, quotient = R.int8_rows(x)
        return codes, R.near_tie(quotient)
    if name == "int8_token":
        codes, _, quotient = R.int8_rows(x, 127, R.ACT_SCALE_FLOOR)
        return codes, R.near_tie(quotient)
    if name == "fp8_row":
        bits, _, quotient = R.fp8_rows(x)
        return bits.long(), R.e4m3_near_tie(quotient)
    ref = R.int4_grouped(x, 32, torch.bfloat16)
    return ref["codes"], R.near_tie(ref["quotient"], 1e-2)  # bf16 qparams: coarser ties


def test_quantizers_agree_across_devices(device):
    """On every device: the codes of the format's definition (up to rounding ties), and the same
    bits as on CPU (IEEE division, round-half-even everywhere)."""
    x = make_input((9, 128), torch.float32, seed=12) * 3
    x[2] = 0
    fns = {
        "int8_weight": P.int8_weight_per_channel,
        "int8_token": P.int8_act_per_token,
        "fp8_row": P.fp8_per_row,
        "int4": lambda t: P.int4_grouped_asym(t, 32, torch.bfloat16),
    }
    for name, fn in fns.items():
        on_dev = fn(x.to(device))
        assert all(t.device.type == device.type for t in on_dev)
        codes = on_dev[0].cpu()
        codes = codes.view(torch.uint8).long() if codes.dtype == torch.float8_e4m3fn else codes.long()
        want, tie = _definition_codes(name, x)
        assert not ((codes != want) & ~tie).any(), f"{name}: codes differ from the definition"
        if device.type != "cpu":
            for a, b in zip(fn(x), on_dev):
                assert torch.equal(a.view(torch.uint8), b.cpu().view(torch.uint8)), name


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_quantizers_by_row_blocks_match_one_pass(monkeypatch, dtype, device):
    """Weights are quantized by blocks of rows to bound the float temporaries: the same bits as
    quantizing the whole weight at once, uneven last block included."""
    from autoquant.candidates import Int4WeightOnly

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU in this process")
    torch.manual_seed(0)
    w = (torch.randn(37, 128) * 0.05).to(device=device, dtype=dtype)
    w[5] = 0  # an all-zero row: the scale floor
    whole = (P.int8_weight_per_channel(w), P.fp8_per_row(w), Int4WeightOnly("tinygemm_cpu", 32).quantize(w))
    monkeypatch.setattr(P, "ROW_BLOCK_BYTES_CUDA" if device == "cuda" else "ROW_BLOCK_BYTES", 4 * 128 * 5)
    assert len(P.row_blocks(37, 128, w.device)) == 8  # 5 rows per block
    (q, s), (q8, s8), int4 = whole
    qb, sb = P.int8_weight_per_channel(w)
    assert torch.equal(qb, q) and torch.equal(sb, s)
    q8b, s8b = P.fp8_weight_per_row(w)
    assert torch.equal(q8b.view(torch.uint8), q8.view(torch.uint8)) and torch.equal(s8b, s8)
    int4b = Int4WeightOnly("tinygemm_cpu", 32).quantize(w)
    assert all(torch.equal(int4b[k], int4[k]) for k in int4)
