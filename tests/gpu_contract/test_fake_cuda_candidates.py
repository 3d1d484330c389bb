"""Every default CUDA candidate, built and called on fake CUDA tensors (no GPU needed).

Shapes are the Llama-3-8B linear layers, written as nn.Linear(in_features=K, out_features=N), so
the weight is [N, K] and the activation [M, K]:

    q_proj / o_proj  K=4096   N=4096       k_proj / v_proj  K=4096  N=1024
    gate / up_proj   K=4096   N=14336      down_proj        K=14336 N=4096

at M in {1, 17, 128} (decode, the first M cuBLASLt's int8 GEMM takes, a prefill chunk) and in
bfloat16, float16 and float32. Each candidate is quantized once per (dtype, shape) and called at the
three M through the finalized layer, its eager closure, its reference and its matmul part; PyTorch's
meta kernels check each CUDA op's contract (dtypes, strides, scale layouts) on the way. What meta
kernels do not check (e.g. cuBLASLt's M > 16 for ``_int_mm``) is left to the GPU run.

Assumed GPU (tests/gpu_contract/_fake_cuda.py): sm_90 (H100 / H200) for building and calling; for
what supports() declines, sm_80 (A100) too.
"""

from __future__ import annotations

import re

import pytest
import torch

from autoquant.candidates import default_candidates
from autoquant.keys import OpShape, dtype_name

from ._fake_cuda import A100, H100, fake_cuda_mode, supports_on

# (K, N): in_features, out_features.
LLAMA3_8B_SHAPES = {
    "qo_4096x4096": (4096, 4096),
    "kv_4096x1024": (4096, 1024),
    "gate_up_4096x14336": (4096, 14336),
    "down_14336x4096": (14336, 4096),
}
MS = (1, 17, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA = torch.device("cuda")
# int8_dynamic/int_mm declines M <= 16 (not worth timing) but its linear() promises to run any M
# (zero-padding to 17 rows) so a finalized layer meets a new, smaller M safely: called at every M.
RUNS_WHEN_DECLINED_FOR_M = {"int8_dynamic(kernel=int_mm)"}


def _expected_decline(name: str, dtype: torch.dtype, m: int, capability: tuple[int, int]) -> str | None:
    """The decline reason (a regex) the contract promises for the Llama shapes, or None: runs.

    All Llama widths are multiples of 128, so no alignment or group-size rule declines here.
    """
    if name == "int8_dynamic(kernel=int_mm)" and m <= 16:
        return r"int8_dynamic/int_mm: cuBLASLt int8 GEMM needs M > 16, got M=%d" % m
    if name.startswith("int4_weight_only(kernel=tinygemm") and dtype != torch.bfloat16:
        return r"int4_weight_only/tinygemm\(G=\d+\) takes bfloat16 activations, not " + dtype_name(dtype)
    if name.startswith("fp8_dynamic(") and capability < (8, 9):
        kernel = re.search(r"kernel=(\w+)", name).group(1)  # type: ignore[union-attr]
        return rf"fp8_dynamic/{kernel} needs compute capability sm89\+, this GPU is sm{capability[0]}{capability[1]}"
    return None


def _cases() -> list:
    out = []
    for dname, dtype in DTYPES.items():
        for sname, (k, n) in LLAMA3_8B_SHAPES.items():
            for cand in default_candidates(CUDA, dtype):
                if all(_expected_decline(cand.name, dtype, m, H100) for m in MS):
                    continue  # declined outright (tinygemm for fp16 / fp32): the test above checks it
                out.append(pytest.param(dtype, k, n, cand, id=f"{dname}-{sname}-{cand.name}"))
    return out


@pytest.mark.parametrize("capability", [H100, A100], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_supports_declines_exactly_as_the_contract_says(dtype, capability):
    wrong = []
    for cand in default_candidates(CUDA, dtype):
        for k, n in LLAMA3_8B_SHAPES.values():
            for m in MS:
                got = supports_on(cand, capability, OpShape(m, k, n, False, dtype_name(dtype)))
                want = _expected_decline(cand.name, dtype, m, capability)
                if (want is None) != (got is None) or (want is not None and not re.fullmatch(want + r".*", got)):
                    wrong.append(f"{cand.name} M={m} K={k} N={n}: supports() -> {got!r}, expected {want!r}")
    assert not wrong, "\n".join(wrong)


def _check_output(y: torch.Tensor, m: int, n: int, dtype: torch.dtype, what: str) -> None:
    assert y.shape == (m, n), f"{what}: shape {tuple(y.shape)}, expected {(m, n)}"
    assert y.dtype == dtype, f"{what}: dtype {y.dtype}, expected {dtype}"
    assert y.device.type == "cuda", f"{what}: on {y.device}, expected cuda"


@pytest.mark.parametrize(("dtype", "k", "n", "cand"), _cases())
def test_candidate_builds_and_runs_on_fake_cuda(dtype, k, n, cand):
    name = dtype_name(dtype)
    runs = [m for m in MS if supports_on(cand, H100, OpShape(m, k, n, False, name)) is None]
    if cand.name in RUNS_WHEN_DECLINED_FOR_M:
        runs = list(MS)
    assert runs, f"{cand.name} declines {name} at every M on sm90, which _expected_decline does not say"
    with fake_cuda_mode(H100):
        weight = torch.empty(n, k, device="cuda", dtype=dtype)
        layer = cand.build(weight, None)
        packed = layer.packed()
        for pname, t in packed.items():
            assert t.device.type == "cuda", f"packed {pname} is on {t.device}"
        for m in runs:
            x = torch.empty(m, k, device="cuda", dtype=dtype)
            _check_output(layer(x), m, n, dtype, f"layer M={m}")
            _check_output(layer(x.view(1, m, k)).view(m, n), m, n, dtype, f"layer [1, M, K] M={m}")
            if layer._eager is not None:  # the eager closure a finalized layer runs outside tracing
                _check_output(layer._eager(x), m, n, dtype, f"eager closure M={m}")
            _check_output(cand.reference(x, packed, None), m, n, dtype, f"reference M={m}")
            part = cand.matmul_part(x, packed, layer._runtime, None)
            if part is not None:
                _check_output(part(), m, n, dtype, f"matmul_part M={m}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_candidates_take_a_bias_on_fake_cuda(dtype):
    """Llama has no biases; other models do (bias in the weight's dtype, fused or added after)."""
    k, n = LLAMA3_8B_SHAPES["qo_4096x4096"]
    for cand in default_candidates(CUDA, dtype):
        if supports_on(cand, H100, OpShape(17, k, n, True, dtype_name(dtype))) is not None:
            continue
        with fake_cuda_mode(H100):
            layer = cand.build(torch.empty(n, k, device="cuda", dtype=dtype),
                               torch.empty(n, device="cuda", dtype=dtype))
            x = torch.empty(17, k, device="cuda", dtype=dtype)
            _check_output(layer(x), 17, n, dtype, f"{cand.name} with bias")
            _check_output(cand.reference(x, layer.packed(), layer.bias), 17, n, dtype,
                          f"{cand.name} reference with bias")


def test_fake_cuda_catches_a_broken_cuda_contract():
    """The harness can fail: CUDA _scaled_mm wants its second operand column-major."""
    with fake_cuda_mode(H100):
        a = torch.empty(32, 64, device="cuda", dtype=torch.float8_e4m3fn)
        row_major = torch.empty(64, 48, device="cuda", dtype=torch.float8_e4m3fn)
        sa, sb = torch.empty(32, 1, device="cuda"), torch.empty(1, 48, device="cuda")
        with pytest.raises(RuntimeError, match="col_major"):
            torch._scaled_mm(a, row_major, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        col_major = torch.empty(48, 64, device="cuda", dtype=torch.float8_e4m3fn).t()
        y = torch._scaled_mm(a, col_major, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        assert y.shape == (32, 48) and y.device.type == "cuda"
