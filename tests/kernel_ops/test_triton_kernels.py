"""The Triton kernels of autoquant.kernels against their plain-PyTorch references.

Where they run: on CPU through the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py when
no GPU is present), and on CUDA, compiled, when a GPU is present. float16 cases run on CUDA only.

Tolerances (TOL): kernel and reference see the same quantized operands, so they differ only by the
float32 summation order, the final rounding to the output dtype and, for int4, one rounding of each
dequantized weight to the activation dtype. rtol allows about two ulps of the output dtype; atol is
taken relative to the largest reference magnitude (``scale``), which bounds the summation error.
"""

import importlib
import os
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from autoquant import kernels as K
from autoquant.candidates._util import triton_required

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

# Where Triton is a declared dependency (Linux x86_64) a broken install fails these tests (each
# kernel call raises the import error); only elsewhere is a missing Triton a skip.
pytestmark = pytest.mark.skipif(
    not K.HAS_TRITON and not triton_required(),
    reason="triton is not installed (not a dependency on this platform)",
)

# dtype -> (rtol, atol relative to max |reference|)
TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# fp8 tensor cores on sm_90 add the products of one wgmma (K=32) with fewer than fp32's mantissa bits,
# even when Triton promotes every 32 into the float32 accumulator: on the H200 a float32 output sat
# up to 4.6e-5 x max|reference| from the exact-sum reference (benchmarks/results/gpu/
# h200-2026-11-30-rerun, 9 failures at 1e-5). 2^-12 bounds that with margin and still fails a
# kernel that drops or doubles one 32-wide chunk of K (an error of about 1/K_chunks of the output).
FP8_TENSOR_CORE_ATOL = 2.0**-12

_DEVICE_MARKS = {
    "cpu": pytest.mark.skipif(
        not INTERPRETER,
        reason="CPU runs need TRITON_INTERPRET=1 (tests/conftest.py sets it when CUDA is absent)",
    ),
    "cuda": pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
}
DEVICES = [pytest.param(d, id=d, marks=m) for d, m in _DEVICE_MARKS.items()]
DEVICE_DTYPES = [
    pytest.param(d, dt, id=f"{d}-{_SHORT[dt]}", marks=_DEVICE_MARKS[d])
    for d in ("cpu", "cuda")
    for dt in (torch.float32, torch.bfloat16) + ((torch.float16,) if d == "cuda" else ())
]
MS = [pytest.param(m, id=f"M{m}") for m in (1, 7, 33)]
# (K, N, bias): awkward N, K multiples of 32 so that the int4 cases (G = 32) can share them.
SHAPES = [
    pytest.param(96, 50, True, id="K96-N50-bias"),
    pytest.param(128, 72, False, id="K128-N72"),
    pytest.param(256, 96, True, id="K256-N96-bias"),
]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def _ieee_float32_matmul():
    """References use IEEE float32 matmuls; TF32, if something enabled it, is ~1e-3 off."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def assert_matches(y: Tensor, ref: Tensor, atol_floor: float = 0.0) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.device == ref.device
    rtol, atol = TOL[ref.dtype]
    atol = max(atol, atol_floor)
    scale = max(ref.float().abs().max().item(), 1e-3) if ref.numel() else 1.0
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=atol * scale)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype=dtype, device=device)


def int8_weight(n: int, k: int, device: str, seed: int = 1) -> tuple[Tensor, Tensor]:
    w = torch.randint(-127, 128, (n, k), generator=_gen(seed), dtype=torch.int8)
    scale = torch.rand(n, generator=_gen(seed + 1)) * 0.02 + 0.005
    return w.to(device), scale.to(device)


def int4_weight(n: int, k: int, group: int, dtype: torch.dtype, device: str):
    q = torch.randint(0, 16, (n, k), generator=_gen(2), dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=_gen(3)) * 0.02 + 0.005
    zeros = torch.rand(k // group, n, generator=_gen(4)) * 15  # fractional zero points
    return K.pack_int4(q).to(device), scales.to(dtype).to(device), zeros.to(dtype).to(device)


def maybe_bias(n: int, with_bias: bool, dtype: torch.dtype, device: str) -> Tensor | None:
    return randn(n, dtype=dtype, device=device, seed=5) if with_bias else None


def require_fp8(device: str) -> None:
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need CUDA compute capability >= 8.9")


# One runner per op: (device, dtype, m, k, n, bias) -> (kernel output, reference output).
def run_int8_wo(device, dtype, m, k, n, bias):
    x = randn(m, k, dtype=dtype, device=device)
    w, s = int8_weight(n, k, device)
    b = maybe_bias(n, bias, dtype, device)
    return K.int8_wo_mm(x, w, s, b), K.int8_wo_mm_reference(x, w, s, b)


def run_int8_dyn(device, dtype, m, k, n, bias):
    xq, xs = K.quantize_per_token_int8_reference(randn(m, k, dtype=torch.float32, device=device))
    w, s = int8_weight(n, k, device)
    b = maybe_bias(n, bias, dtype, device)
    y = K.int8_dyn_mm(xq, xs, w, s, b, out_dtype=dtype)
    return y, K.int8_dyn_mm_reference(xq, xs, w, s, b, dtype)


def run_int4(device, dtype, m, k, n, bias, group=32):
    x = randn(m, k, dtype=dtype, device=device)
    packed, scales, zeros = int4_weight(n, k, group, dtype, device)
    b = maybe_bias(n, bias, dtype, device)
    y = K.int4_wo_mm(x, packed, scales, zeros, group, b)
    return y, K.int4_wo_mm_reference(x, packed, scales, zeros, group, b)


def run_fp8(device, dtype, m, k, n, bias):
    require_fp8(device)
    xq, xs = K.quantize_rowwise_fp8_reference(randn(m, k, dtype=torch.float32, device=device))
    wq, ws = K.quantize_rowwise_fp8_reference(
        randn(n, k, dtype=torch.float32, device=device, seed=6)
    )
    b = maybe_bias(n, bias, dtype, device)
    y = K.fp8_rowwise_mm(xq, xs, wq, ws, b, out_dtype=dtype)
    return y, K.fp8_rowwise_mm_reference(xq, xs, wq, ws, b, dtype)


RUNNERS: dict[str, Callable] = {
    "int8_wo": run_int8_wo,
    "int8_dyn": run_int8_dyn,
    "int4_wo": run_int4,
    "fp8_rowwise": run_fp8,
}


# ------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("family", list(RUNNERS))
@pytest.mark.parametrize("k, n, bias", SHAPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_matches_reference(family, device, dtype, m, k, n, bias):
    y, ref = RUNNERS[family](device, dtype, m, k, n, bias)
    fp8_on_gpu = family == "fp8_rowwise" and y.is_cuda
    assert_matches(y, ref, atol_floor=FP8_TENSOR_CORE_ATOL if fp8_on_gpu else 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_wo_scale_in_activation_dtype_and_strided_inputs(device):
    # The scale may come in x.dtype; x and w may be non-contiguous views (strides go to the kernel).
    x = randn(64, 7, dtype=torch.bfloat16, device=device).T  # [7, 64], stride (1, 7)
    w, s = int8_weight(50, 64, device)
    w = w.T.contiguous().T  # same [50, 64] values, column-major strides (1, 50)
    s = s.to(torch.bfloat16)
    assert not x.is_contiguous() and not w.is_contiguous()
    assert_matches(K.int8_wo_mm(x, w, s), K.int8_wo_mm_reference(x, w, s))


@pytest.mark.parametrize("group", [64, 128], ids=["G64", "G128"])
@pytest.mark.parametrize("device", DEVICES)
def test_int4_other_group_sizes(device, group):
    y, ref = run_int4(device, torch.bfloat16, 7, 256, 72, True, group=group)
    assert_matches(y, ref)


@pytest.mark.parametrize("k", [96, 256], ids=["K96", "K256"])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_quantize_per_token_is_bit_exact(device, dtype, m, k):
    x = randn(m, k, dtype=dtype, device=device) * 3
    q, s = K.quantize_per_token_int8(x)
    q_ref, s_ref = K.quantize_per_token_int8_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_per_token_rounds_ties_to_even_and_keeps_zero_rows(device):
    # amax 127 gives scale 1, so the row is rounded as is: ties go to the even neighbour.
    row = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5]
    x = torch.tensor([row, [0.0] * len(row)], device=device)
    q, s = K.quantize_per_token_int8(x)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, 4, -126]
    assert q[1].tolist() == [0] * len(row)
    assert s.tolist() == [1.0, pytest.approx(K.PER_TOKEN_EPS)]


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_int8_dynamic_linear(device, dtype):
    x = randn(7, 96, dtype=dtype, device=device)
    w, s = int8_weight(50, 96, device)
    b = maybe_bias(50, True, dtype, device)
    y = K.int8_dynamic_linear(x, w, s, b)
    assert_matches(y, K.int8_dynamic_linear_reference(x, w, s, b))


@pytest.mark.parametrize("family", list(RUNNERS))
@pytest.mark.parametrize("device", DEVICES)
def test_empty_m_returns_empty(family, device):
    y, _ = RUNNERS[family](device, torch.bfloat16, 0, 64, 50, True)
    assert y.shape == (0, 50) and y.dtype == torch.bfloat16 and y.device.type == device
    q, s = K.quantize_per_token_int8(torch.empty(0, 64, device=device))
    assert q.shape == (0, 64) and s.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_n_returns_empty(device):
    x = randn(7, 64, dtype=torch.bfloat16, device=device)
    w, s = int8_weight(0, 64, device)
    assert K.int8_wo_mm(x, w, s).shape == (7, 0)


# ------------------------------------------------------------------------------------ int4 packing
def test_pack_int4_layout_is_low_nibble_even_k():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    assert K.pack_int4(q).tolist() == [[0x21, 0x43], [0x0F, 0xF0]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32], ids=["u8", "i32"])
@pytest.mark.parametrize("n, k", [(1, 2), (50, 96), (7, 4098)], ids=["1x2", "50x96", "7x4098"])
def test_pack_unpack_round_trip(n, k, dtype):
    q = torch.randint(0, 16, (n, k), generator=_gen(), dtype=torch.uint8).to(dtype)
    packed = K.pack_int4(q)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(K.unpack_int4(packed, k), q.to(torch.uint8))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: K.pack_int4(torch.tensor([[16, 0]])), r"\[0, 15\]"),
        (lambda: K.pack_int4(torch.tensor([[-1, 0]])), r"\[0, 15\]"),
        (lambda: K.pack_int4(torch.zeros(2, 3, dtype=torch.uint8)), "must be even"),
        (lambda: K.pack_int4(torch.zeros(2, 4)), "integer dtype"),
        (lambda: K.unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8), "K = 8"),
    ],
    ids=["above-15", "negative", "odd-K", "float", "K-mismatch"],
)
def test_pack_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# ------------------------------------------------------------------------------------ bad input
def _xw(k: int = 64, n: int = 50, m: int = 7):
    x = torch.randn(m, k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return x, w, torch.rand(n)


def _int4_args(k: int = 64, group: int = 32):
    packed, scales, zeros = int4_weight(50, k, group, torch.float32, "cpu")
    return torch.randn(7, k), packed, scales, zeros


def _int8_dyn_args():
    x, w, s = _xw()
    xq, xs = K.quantize_per_token_int8_reference(x)
    return xq, xs, w, s


def _fp8_args():
    xq, xs = K.quantize_rowwise_fp8_reference(torch.randn(7, 64))
    wq, ws = K.quantize_rowwise_fp8_reference(torch.randn(50, 64))
    return xq, xs, wq, ws


BAD_CALLS = [
    ("wo-x-1d", lambda: K.int8_wo_mm(torch.randn(64), *_xw()[1:]), "x must be 2-D"),
    ("wo-x-int", lambda: K.int8_wo_mm(_xw()[1], *_xw()[1:]), "x must have dtype"),
    (
        "wo-w-float",
        lambda: K.int8_wo_mm(_xw()[0], _xw()[0], _xw()[2]),
        "w_int8 must have dtype int8",
    ),
    ("wo-K-mismatch", lambda: K.int8_wo_mm(torch.randn(7, 32), *_xw()[1:]), "K=32"),
    (
        "wo-scale-len",
        lambda: K.int8_wo_mm(*_xw()[:2], torch.rand(49)),
        r"w_scale must have shape \[50\]",
    ),
    (
        "wo-scale-f64",
        lambda: K.int8_wo_mm(*_xw()[:2], torch.rand(50, dtype=torch.float64)),
        "w_scale",
    ),
    ("wo-bias-len", lambda: K.int8_wo_mm(*_xw(), torch.rand(3)), r"bias must have shape \[50\]"),
    (
        "dyn-xscale-bf16",
        lambda: K.int8_dyn_mm(
            _int8_dyn_args()[0],
            _int8_dyn_args()[1].bfloat16(),
            *_int8_dyn_args()[2:],
            out_dtype=torch.bfloat16,
        ),
        "x_scale must have dtype float32",
    ),
    ("dyn-out-int", lambda: K.int8_dyn_mm(*_int8_dyn_args(), out_dtype=torch.int32), "out_dtype"),
    (
        "dyn-x-float",
        lambda: K.int8_dyn_mm(torch.randn(7, 64), *_int8_dyn_args()[1:], out_dtype=torch.float32),
        "x_int8 must have dtype int8",
    ),
    ("quant-3d", lambda: K.quantize_per_token_int8(torch.randn(2, 3, 4)), "x must be 2-D"),
    (
        "int4-K-not-multiple",
        lambda: K.int4_wo_mm(torch.randn(7, 96), *_int4_args(96)[1:], 64),
        "multiple of group_size",
    ),
    ("int4-G16", lambda: K.int4_wo_mm(*_int4_args(), 16), "group_size must be one of"),
    (
        "int4-scales-shape",
        lambda: K.int4_wo_mm(*_int4_args()[:2], torch.rand(3, 50), torch.rand(3, 50), 32),
        "scales must have shape",
    ),
    (
        "int4-zeros-dtype",
        lambda: K.int4_wo_mm(*_int4_args()[:3], _int4_args()[3].bfloat16(), 32),
        "zeros must have dtype",
    ),
    (
        "int4-packed-dtype",
        lambda: K.int4_wo_mm(
            _int4_args()[0], _int4_args()[1].to(torch.int8), *_int4_args()[2:], 32
        ),
        "w_packed must have dtype uint8",
    ),
    (
        "fp8-x-bf16",
        lambda: K.fp8_rowwise_mm(
            torch.randn(7, 64).bfloat16(), *_fp8_args()[1:], out_dtype=torch.bfloat16
        ),
        "x_fp8 must have dtype float8_e4m3fn",
    ),
    (
        "fp8-wscale-len",
        lambda: K.fp8_rowwise_mm(*_fp8_args()[:3], torch.rand(5), out_dtype=torch.bfloat16),
        r"w_scale must have shape \[50\]",
    ),
]


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m in BAD_CALLS])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_mixed_devices_raise_value_error():
    x, w, s = _xw()
    with pytest.raises(ValueError, match="w_int8 is on cuda"):
        K.int8_wo_mm(x, w.cuda(), s)


# ------------------------------------------------------------------------------------ every tile
# The autotuner (and torch.compile, which autotunes user kernels over all configs and skips the
# pruning hook) may pick any tile, so each one is forced in turn by replacing the autotuner's config
# list with that single tile, for which triton neither prunes nor benchmarks. Under the interpreter
# this checks the masking and tiling logic of the GPU tiles; on CUDA it also checks that every tile
# compiles. K is not a multiple of the larger BLOCK_K values (tail masking); M and N are not
# multiples of any tile.
if INTERPRETER:
    TILE_DEVICE: str | None = "cpu"
elif HAS_CUDA:
    TILE_DEVICE = "cuda"
else:
    TILE_DEVICE = None

# family -> (kernel module, runner with its shape)
FAMILIES = {
    "int8_wo": ("_int8_wo_kernel", lambda d: run_int8_wo(d, torch.bfloat16, 33, 320, 72, True)),
    "int8_dyn": ("_int8_dyn_kernel", lambda d: run_int8_dyn(d, torch.bfloat16, 33, 320, 72, True)),
    "int4_wo-G32": ("_int4_wo_kernel", lambda d: run_int4(d, torch.bfloat16, 33, 96, 72, True, 32)),
    "int4_wo-G128": (
        "_int4_wo_kernel",
        lambda d: run_int4(d, torch.bfloat16, 33, 256, 72, True, 128),
    ),
    "fp8_rowwise": ("_fp8_kernel", lambda d: run_fp8(d, torch.bfloat16, 33, 320, 72, True)),
}


def _kernel_module(name: str):
    return importlib.import_module(f"autoquant.kernels.{name}")


def _cases():
    if TILE_DEVICE is None or not K.HAS_TRITON:  # (the test says which)
        return [pytest.param(None, None, id="no-device-or-triton")]
    cases = []
    for family, (module_name, _) in FAMILIES.items():
        for tile in _kernel_module(module_name).TILES:
            blocks = f"{tile.block_m}x{tile.block_n}x{tile.block_k}"
            tid = f"{family}-{blocks}-w{tile.num_warps}s{tile.num_stages}"
            cases.append(pytest.param(family, tile, id=tid))
    return cases


@pytest.mark.skipif(TILE_DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("family, tile", _cases())
def test_every_tile_matches_reference(family, tile, monkeypatch):
    if family is None:  # no tile list to read: Triton did not import (pytestmark covers the rest)
        K._registry.require_triton("test_every_tile_matches_reference")
    import triton

    module_name, run = FAMILIES[family]
    kernel = _kernel_module(module_name).KERNEL
    config = triton.Config(
        {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "GROUP_M": 8},
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    monkeypatch.setattr(kernel, "configs", [config])
    try:
        y, ref = run(TILE_DEVICE)
    except triton.runtime.errors.OutOfResources as exc:  # e.g. big tiles on a 99 KB-smem sm89 part
        pytest.skip(f"tile does not fit this GPU: {exc}")
    assert_matches(y, ref)


def test_int4_decode_gemv_policy():
    """M = 1 (a concrete int) may take the split-K GEMV; more rows, none, or a symbolic M never do.
    Under the interpreter K=256 splits four ways, so test_matches_reference's int4 M=1 cases with
    K=256 run the GEMV and its workspace reduction (bias added once), the K=96 ones the tiled kernel."""
    from autoquant.kernels import _gemv

    assert _gemv.use_gemv(1)
    assert not _gemv.use_gemv(0) and not _gemv.use_gemv(2) and not _gemv.use_gemv(1.0)
    cpu = torch.device("cpu")
    assert _gemv.gemv_splits(-(-96 // 32), 256, cpu) == 4
    assert _gemv.gemv_splits(-(-50 // 32), 96, cpu) == 1
