"""Every kernel and every quantizer against float64 math written from the format's definition
(tests/references.py), which shares no code with autoquant.

A kernel's own ``reference()`` reuses its family's helpers, so an error both share (a scale off by a
few percent) passes test_kernels; here it cannot. The floors are SQNR in dB of the kernel output
against the definition, per output dtype, measured with margin (references.FLOOR_DB); a systematic gain
error of 3% measures 30.5 dB and fails them, which test_floors_reject_a_three_percent_gain checks.
"""

from __future__ import annotations

import pytest
import torch
import references as R
from helpers import act_absmax, all_instances, candidate_id, dtype_id, make_input, make_linear

from autoquant import primitives as P
from autoquant.keys import OpShape

K, N = 256, 64
MS = (1, 7, 33)
SPEED_DECLINE = "not worth timing"


def _runs_on(cand, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the kernel runs here (supported, or declined only for speed); else why not."""
    reason = cand.supports(device, OpShape(33, K, N, True, dtype_id(dtype)))
    return None if reason is None or SPEED_DECLINE in reason else reason


def _params():
    """(device, dtype, candidate) for every instance that runs on a device of its kind. CPU kernels
    that need a CPU feature this machine lacks are kept and skip naming it; kernels of another
    device kind (Triton, CUDA) are checked on their device (and under the Triton interpreter by
    test_triton_interpreter)."""
    out = []
    for dev, dtypes in (("cpu", (torch.float32, torch.bfloat16)),
                        ("cuda", (torch.float32, torch.bfloat16, torch.float16))):
        for dtype in dtypes:
            for c in all_instances(dev, dtype, calibrated=True):
                if dev == "cpu" and "CUDA kernel" in (_runs_on(c, torch.device("cpu"), dtype) or ""):
                    continue
                marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU in this process")] \
                    if dev == "cuda" else []
                out.append(pytest.param(dev, dtype, c, marks=marks, id=f"{dev}-{dtype_id(dtype)}-{candidate_id(c)}"))
    return out


@pytest.mark.parametrize("dev, dtype, cand", _params())
def test_kernel_matches_definition(dev, dtype, cand):
    device = torch.device(dev)
    why = _runs_on(cand, device, dtype)
    if why is not None:
        pytest.skip(f"missing CPU feature: {why}" if dev == "cpu" else why)
    w, b = make_linear(K, N, dtype, seed=5)
    layer = cand.build(w.to(device), b.to(device), act_absmax=act_absmax(K, device))
    for m in MS:
        x = make_input((m, K), dtype, seed=100 + m)
        y = layer(x.to(device)).cpu()
        want = R.expected_output(cand, x, w, b, act_absmax(K))
        got = R.snr_db(want, y)
        g = R.gain(want, y)
        rd = R.rounding_dtype(cand, dtype, device.type)
        floor, tol = R.floor_db(device.type, rd), R.gain_tol(device.type, rd)
        assert got >= floor, f"{cand.name} M={m}: {got:.1f} dB against the definition (floor {floor})"
        assert abs(g - 1) <= tol, f"{cand.name} M={m}: gain {g:.5f} against the definition"


@pytest.mark.parametrize("dtype", list(R.FLOOR_DB), ids=dtype_id)
def test_floors_reject_a_three_percent_gain(dtype):
    """The floors (CPU and CUDA) are tight enough to see the error the issue names: a 3% gain."""
    ref = R.linear64(make_input((33, K), torch.float32, seed=1).double(),
                     make_input((N, K), torch.float32, seed=2).double(), None)
    off = (ref * 1.03).to(dtype)
    for device_type in ("cpu", "cuda"):
        assert R.snr_db(ref, off) < R.floor_db(device_type, dtype), device_type
        assert abs(R.gain(ref, off) - 1) > R.gain_tol(device_type, dtype), device_type


# ---- the quantizers ---------------------------------------------------------------------------------------
def _awkward(shape, dtype, seed):
    t = make_input(shape, torch.float32, seed=seed) * torch.logspace(-3, 2, shape[0])[:, None]
    t[1] = 0  # an all-zero row: the scale floor
    return t.to(dtype)


def _codes_match(got: torch.Tensor, want: torch.Tensor, tie: torch.Tensor, what: str) -> None:
    """Equal codes, except one step apart where the quotient sits on a rounding tie."""
    diff = (got.long() - want.long()).abs()
    assert int(diff.max()) <= 1, f"{what}: codes differ by {int(diff.max())}"
    assert not (diff.bool() & ~tie).any(), f"{what}: codes differ away from a rounding tie"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=dtype_id)
def test_int8_weight_quantizer(dtype):
    w = _awkward((12, 200), dtype, seed=1)
    q, s = P.int8_weight_per_channel(w)
    codes, scale, quotient = R.int8_rows(w)
    torch.testing.assert_close(s.double(), scale, rtol=2.0 ** -23, atol=0)
    _codes_match(q, codes, R.near_tie(quotient), "int8 weight")


@pytest.mark.parametrize("qmax", (127, 63))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=dtype_id)
def test_int8_per_token_quantizers(dtype, qmax):
    x = _awkward((9, 70), dtype, seed=2)
    codes, scale, quotient = R.int8_rows(x, qmax, R.ACT_SCALE_FLOOR)
    tie = R.near_tie(quotient)
    q, s = P.int8_act_per_token(x, qmax)
    torch.testing.assert_close(s.double(), scale, rtol=2.0 ** -23, atol=0)
    _codes_match(q, codes, tie, f"per-token int8 qmax={qmax}")
    if qmax <= 64:  # the offset form (oneDNN: codes 1..127 around 64) exists for 7-bit codes
        u8, s8 = P.uint8_act_per_token_offset(x, qmax, 64)
        assert u8.dtype == torch.uint8 and torch.equal(s8, s)
        _codes_match(u8.long() - 64, codes, tie, f"offset uint8 qmax={qmax}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_uint8_per_tensor_quantizer(dtype):
    x = (_awkward((6, 50), dtype, seed=3).float() + 0.3).to(dtype)
    q, scale, zp = P.uint8_act_per_tensor(x, 127)
    t_scale, t_zp = torch._choose_qparams_per_tensor(x.float(), True)
    assert zp == t_zp and scale == pytest.approx(t_scale, rel=1e-6)
    quotient = x.double() / t_scale
    want = (torch.round(quotient) + t_zp).clamp(0, 127)
    _codes_match(q, want, R.near_tie(quotient, 1e-4), "per-tensor uint8")
    # the dequantized activation the fbgemm reference uses is that quantization
    torch.testing.assert_close(R.uint8_tensor_asym(x, 127), (q.double() - zp) * scale, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=dtype_id)
def test_fp8_row_quantizer(dtype):
    t = _awkward((10, 96), dtype, seed=4)
    q, s = P.fp8_per_row(t)
    bits, scale, quotient = R.fp8_rows(t)
    torch.testing.assert_close(s.double(), scale, rtol=2.0 ** -23, atol=0)
    got, want = q.view(torch.uint8), bits
    differ = got != want
    tie = R.e4m3_near_tie(quotient)
    assert not (differ & ~tie).any(), "fp8 codes differ away from a rounding tie"
    # one step apart at most (the grid is monotone in the bit pattern within a sign)
    assert ((got.long() & 0x7F) - (want.long() & 0x7F)).abs().max() <= 1
    wq, ws = P.fp8_weight_per_row(t)
    assert torch.equal(wq.view(torch.uint8), got) and torch.equal(ws, s)


def test_e4m3_definition_matches_the_dtype():
    """The decoder written from the bit layout agrees with torch's float8_e4m3fn for all 256
    patterns (NaN for S.1111.111), and the encoder inverts it: a self-check of the references."""
    bits = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    dec = R.e4m3_decode(bits)
    torch_vals = bits.view(torch.float8_e4m3fn).double()
    assert torch.equal(torch.isnan(dec), torch.isnan(torch_vals)) and int(torch.isnan(dec).sum()) == 2
    finite = ~torch.isnan(dec)
    assert torch.equal(dec[finite], torch_vals[finite]) and dec.abs()[finite].max() == R.E4M3_MAX
    enc = R.e4m3_encode(dec[finite])
    assert torch.equal(R.e4m3_decode(enc), dec[finite])
    v = torch.linspace(-448, 448, 4001, dtype=torch.float64)
    assert torch.equal(R.e4m3_encode(v), v.float().to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("group", (32, 64, 128, 256))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=dtype_id)
def test_int4_quantizer_and_layout(dtype, group):
    from autoquant.candidates import candidate_from_json

    w = _awkward((16, 512), dtype, seed=6)
    w[3, :group] = 0.25  # a constant group
    packed = candidate_from_json("int4_weight_only", {"kernel": "tinygemm_cpu", "group_size": group}).quantize(w)
    ref = R.int4_grouped(w, group, dtype)
    sz = packed["scales_and_zeros"]
    assert sz.dtype == dtype and sz.shape == (512 // group, 16, 2)
    scale, zero = sz[..., 0].t().double(), sz[..., 1].t().double()
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    torch.testing.assert_close(scale, ref["scale"], rtol=ulp, atol=0)
    # zero = min + 8 * scale from the STORED scale, rounded once to the qparam dtype
    lo = w.double().reshape(16, 512 // group, group).amin(dim=2)
    torch.testing.assert_close(zero, R.to_dtype64(lo + 8 * scale, dtype), rtol=ulp, atol=1e-30)
    # codes: round((w - zero) / scale) + 8 with the stored qparams
    s_full, z_full = scale.repeat_interleave(group, 1), zero.repeat_interleave(group, 1)
    quotient = (w.double() - z_full) / s_full + 8
    want = torch.round(quotient).clamp(0, 15)
    _codes_match(R.int4_unpack(packed["w_int4"]), want, R.near_tie(quotient, 1e-4), f"int4 G={group}")


def test_definitions_cover_every_family():
    """A family added without a definition here would escape this file: list them."""
    from autoquant.candidates import families

    known = {"float", "int8_weight_only", "int8_dynamic", "int4_weight_only", "fp8_weight_only", "fp8_dynamic",
             "int8_smooth"}
    assert {f for f in families() if not f.startswith("test_")} <= known
