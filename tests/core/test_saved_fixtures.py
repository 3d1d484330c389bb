"""Plans and saved folders written by autoquant 0.2.2 (tests/fixtures/saved_v0_2_2, made by its
make.py before the runtime redesign) load and run bit-exactly, and keep their params identity.

Covers every CPU kernel of every family (float aten/onednn/fbgemm_fp16 and their casts, int8
weight-only int8pack/dequant, int8 dynamic fbgemm/onednn/int_mm, int4 tinygemm_cpu at two group
sizes, fp8 weight-only and dynamic) and a DispatchLinear on both sides of its threshold. The
outputs were computed on one CPU; a CPU with other vector units sums in another order, so there
the check is an SQNR floor instead of bit equality (said in the failure message).

Two per-build exceptions, each named where it applies:

- fbgemm's dynamic int8 (``quantized::linear_dynamic``, the i8dyn_fbgemm layer and the large side
  of the DispatchLinear) rounds x / x_scale differently across torch builds when the quotient is a
  tie: torch 2.11 and 2.13 compute round(x / s) (x = +-0.9375 is exactly +-63.5 codes here, the
  fixture inputs being multiples of 1/16), torch 2.14 computes round(x * float32(1 / s)) and lands
  on the other side of the tie (measured with the same w_int8/w_scale buffers and the same x, raw
  op, no autoquant code involved). So bit equality is required only on the torch release the
  fixture was made with; on another release such a layer must stay within one activation code per
  tie element of the saved output (a bound computed from its own buffers, zero where x has no tie).
- torch builds whose CPU ``_scaled_mm`` takes no row-wise scales (``cpu_rowwise_scaled_mm_reason()``,
  torch 2.11) cannot run the fp8 dynamic layer: its plan entry and saved weights still load, and
  the test checks that running it fails with torch's per-tensor-only error, and every other layer
  exactly.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

import autoquant
from autoquant.candidates.fp8 import cpu_rowwise_scaled_mm_reason
from autoquant.hardware import environment
from autoquant.plan import plan_of
from helpers import sqnr

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "saved_v0_2_2"
_spec = importlib.util.spec_from_file_location("saved_v0_2_2_models", FIXTURES / "models.py")
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)  # type: ignore[union-attr]

DTYPES = list(models.PLANS)


def _expected(dtype_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURES / dtype_name / "expected.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads(fh.metadata()["modules"])


def _saved_environment(dtype_name: str) -> dict:
    return json.loads((FIXTURES / dtype_name / "plan.json").read_text())["environment"]


def _same_cpu(dtype_name: str) -> bool:
    return _saved_environment(dtype_name)["capability"] == environment(torch.device("cpu")).capability


def _same_torch(dtype_name: str) -> bool:
    """The torch release the fixture was made with (local build tags such as +cpu/+cu130 aside:
    the CPU kernels are the same code)."""
    return _saved_environment(dtype_name)["torch"].split("+")[0] == torch.__version__.split("+")[0]


# Layers whose kernel is fbgemm's dynamic int8 for the given input (the DispatchLinear runs it at
# M >= THRESHOLD: x_m6, its small side is int8 weight-only).
_FBGEMM_INT8 = {("i8dyn_fbgemm", "x_m1"), ("i8dyn_fbgemm", "x_m6"), ("dispatch", "x_m6")}
# Runs only where the build's CPU _scaled_mm takes row-wise scales.
_FP8_ROWWISE = "fp8dyn_scaled_mm"


def _ulp(t: Tensor) -> Tensor:
    """One unit in the last place of each element of t (its dtype), as float64."""
    return (torch.nextafter(t, torch.full_like(t, math.inf)) - t).double().abs()


def _fbgemm_tie_bound(layer: torch.nn.Module, x: Tensor, want: Tensor) -> Tensor:
    """How far fbgemm's int8 dynamic output may move when every tie of x / x_scale rounds the other
    way: x_scale * w_scale[n] * sum over tie positions k of |w_int8[n, k]| (plus one output ulp for
    the float32 accumulation order and the output cast). Zero-width (ulp only) where x has no tie,
    so a layer that quantizes or scales anything else differently still fails."""
    xf = x.float().reshape(-1, x.shape[-1])
    x_scale, _ = torch._choose_qparams_per_tensor(xf, True)  # fbgemm's per-tensor, reduce_range qparams
    codes = xf.double() / x_scale
    ties = ((codes - codes.floor()) - 0.5).abs() < 1e-6
    w = layer.w_int8.double().abs() * layer.w_scale.double()[:, None]  # [N, K]
    bound = x_scale * (ties.double() @ w.t())  # [M, N]
    return bound.reshape(want.shape) + 2 * _ulp(want.float()) + _ulp(want)


def _check_outputs(model: torch.nn.Module, dtype_name: str) -> None:
    expected, modules = _expected(dtype_name)
    assert {n: type(m).__name__ for n, m in model.layers.items()} == modules
    exact, same_torch = _same_cpu(dtype_name), _same_torch(dtype_name)
    fp8_reason = cpu_rowwise_scaled_mm_reason()
    assert not (fp8_reason and same_torch), "the build the fixture was made with ran _scaled_mm row-wise"
    with torch.no_grad():
        for xname in ("x_m1", "x_m6"):
            x, want = expected[xname], expected[xname.replace("x_", "y_")]
            if fp8_reason is None:  # the whole model, as 0.2.2 ran it
                got = model(x)
            else:  # every layer but the fp8 dynamic one, which this build cannot run
                with pytest.raises(RuntimeError, match="per-tensor"):
                    model.layers[_FP8_ROWWISE](x)
                got = torch.cat([want[..., i * models.N:(i + 1) * models.N] if name == _FP8_ROWWISE
                                 else layer(x) for i, (name, layer) in enumerate(model.layers.items())], dim=-1)
            assert got.dtype == want.dtype and got.shape == want.shape
            if exact:
                bad, loose = [], []
                for i, name in enumerate(modules):
                    g, w = got[..., i * models.N:(i + 1) * models.N], want[..., i * models.N:(i + 1) * models.N]
                    if torch.equal(g, w):
                        continue
                    if (name, xname) in _FBGEMM_INT8 and not same_torch:
                        bound = _fbgemm_tie_bound(model.layers[name], x, w)
                        if bool(((g.double() - w.double()).abs() <= bound).all()):
                            loose.append(name)
                            continue
                    bad.append(name)
                assert not bad, (f"{dtype_name} {xname}: layers {bad} no longer compute what 0.2.2 saved"
                                 f" (torch {torch.__version__}; fixture made on {_saved_environment(dtype_name)['torch']})")
            else:  # another CPU's vector width: other summation order, same math
                assert sqnr(want.float(), got.float()) > 30, f"{dtype_name} {xname}: far from 0.2.2's outputs"


# Written since 0.2.2 (a layer's shape, to catch a plan applied to another model); not identity.
_ADDED_KEYS = ("in_features", "out_features")


def _identity(plan: dict) -> dict:
    """What a layer's plan entry says about its kernels (family, params JSON, version, M, dtype)."""
    return {name: {k: v for k, v in entry.items() if k not in _ADDED_KEYS}
            for name, entry in json.loads(json.dumps(plan["layers"], sort_keys=True)).items()}


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_plan_from_0_2_2_applies_bit_exact(dtype_name: str) -> None:
    plan_path = FIXTURES / dtype_name / "plan.json"
    model = autoquant.apply_plan(models.float_model(dtype_name), plan_path)
    _check_outputs(model, dtype_name)
    # The plan this model now runs names every kernel with the same identity (params JSON).
    assert _identity(plan_of(model)) == _identity(json.loads(plan_path.read_text()))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_save_from_0_2_2_loads_bit_exact(dtype_name: str) -> None:
    with torch.device("meta"):
        skeleton = models.float_model(dtype_name)
    model = autoquant.load(skeleton, FIXTURES / dtype_name / "saved")
    _check_outputs(model, dtype_name)
    saved_plan = json.loads((FIXTURES / dtype_name / "saved" / "plan.json").read_text())
    assert _identity(plan_of(model)) == _identity(saved_plan)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_fixture_covers_every_cpu_kernel(dtype_name: str) -> None:
    """The fixture names the kernels it pins down; a kernel added later needs a fixture of its own."""
    plan = json.loads((FIXTURES / dtype_name / "plan.json").read_text())
    kinds = {e["kind"] for e in plan["layers"].values()}
    assert kinds == {"float", "candidate", "dispatch"} or dtype_name == "bfloat16"
    fams = {(e["family"], e["params"]["kernel"]) for e in plan["layers"].values() if e["kind"] == "candidate"}
    assert ("int8_dynamic", "fbgemm") in fams and ("fp8_dynamic", "scaled_mm") in fams
