"""Registry, identity and the default candidate lists."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DTYPES_BY_DEVICE, all_instances, dtype_id

from autoquant.candidates import (
    Candidate,
    FloatCandidate,
    Int4WeightOnly,
    Int8Dynamic,
    QuantizedLinear,
    candidate_from_json,
    default_candidates,
    families,
    get_family,
)

FAMILIES = ("float", "int8_weight_only", "int8_dynamic", "int4_weight_only", "fp8_weight_only", "fp8_dynamic")


def test_every_family_is_registered_in_tie_break_order():
    reg = families()
    assert set(FAMILIES) <= set(reg)
    orders = [reg[f].order for f in FAMILIES]
    assert orders == sorted(orders) and len(set(orders)) == len(orders) and orders[0] == 0
    for name in FAMILIES:
        cls = reg[name]
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert issubclass(cls, Candidate) and cls.family == name


@pytest.mark.parametrize("dev", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_params_json_round_trip(dev, dtype):
    """Builds the lists without touching a GPU, so it runs for "cuda" on any machine."""
    for c in all_instances(dev, dtype, calibrated=True):
        text = c.params_json()
        assert candidate_from_json(c.family, text) == c
        assert candidate_from_json(c.family, json.loads(text)) == c
        assert hash(candidate_from_json(c.family, text)) == hash(c)
        assert json.loads(text)["kernel"] == c.kernel


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="unknown kernel"):
        FloatCandidate("cublas")
    with pytest.raises(ValueError, match="compute_dtype"):
        FloatCandidate("aten", "float64")
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnly("tinygemm_cpu", 48)
    with pytest.raises(ValueError, match="no params"):
        candidate_from_json("int8_dynamic", '{"kernel": "int_mm", "bits": 8}')
    with pytest.raises(KeyError):
        get_family("int3")


@pytest.mark.parametrize("dev", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_default_candidates_shape(dev, dtype):
    cands = default_candidates(torch.device(dev), dtype)
    assert cands[0] == FloatCandidate("aten") and cands[0].lossless
    assert len(set(cands)) == len(cands)
    kernels = {(c.family, c.kernel) for c in cands}
    if dev == "cpu":
        assert {("float", "onednn"), ("int8_dynamic", "fbgemm"), ("int8_dynamic", "onednn"),
                ("int4_weight_only", "tinygemm_cpu")} <= kernels
        assert not any(k == "triton" for _, k in kernels)
        assert not any(f.startswith("fp8") for f, _ in kernels)  # no fp8 arithmetic on a CPU
    else:
        assert {("int8_weight_only", "triton"), ("int8_dynamic", "int_mm"), ("int4_weight_only", "tinygemm"),
                ("fp8_dynamic", "scaled_mm")} <= kernels
        assert not any(k in ("onednn", "fbgemm", "fbgemm_fp16", "tinygemm_cpu") for _, k in kernels)
    groups = sorted(c.group_size for c in cands if c.family == "int4_weight_only")
    assert set(groups) == {32, 64, 128}
    assert ("int8_weight_only", "dequant") not in kernels


def test_lossless_and_accuracy_facts():
    assert FloatCandidate("aten").lossless and FloatCandidate("onednn").lossless
    assert not FloatCandidate("fbgemm_fp16").lossless and not FloatCandidate("aten", "bfloat16").lossless
    assert FloatCandidate("aten", "bfloat16").min_sqnr_db < FloatCandidate("fbgemm_fp16").min_sqnr_db
    for dev, dtypes in DTYPES_BY_DEVICE.items():
        for dtype in dtypes:
            for c in all_instances(dev, dtype, calibrated=True):
                assert c.min_sqnr_db > 0
                assert c.lossless == (c.family == "float" and c.kernel in ("aten", "onednn")
                                      and c.compute_dtype is None)
    assert Int8Dynamic("fbgemm").dynamic_activation and not get_family("int8_weight_only").dynamic_activation


def test_build_gives_quantized_linear():
    layer = Int8Dynamic("fbgemm").build(torch.randn(16, 32), torch.randn(16))
    assert isinstance(layer, QuantizedLinear)
    assert "int8_dynamic(kernel=fbgemm)" in repr(layer)


def test_no_device_query_at_import():
    """Importing the candidates (and primitives) must not touch CUDA or ask the CPU its features."""
    script = textwrap.dedent("""
        import traceback, torch
        calls = []
        def spy(name, real):
            def f(*a, **k):
                calls.append((name, [fr.filename for fr in traceback.extract_stack()]))
                return real(*a, **k)
            return f
        for mod, name in [(torch.cuda, "is_available"), (torch.cuda, "get_device_capability"),
                          (torch.cuda, "device_count"), (torch.cuda, "current_device"),
                          (torch.backends.cpu, "get_cpu_capability"), (torch.backends.mkldnn, "is_available")]:
            setattr(mod, name, spy(name, getattr(mod, name)))
        import autoquant.candidates, autoquant.primitives
        ours = [n for n, files in calls if any("autoquant/candidates" in f or "autoquant/primitives" in f
                                               for f in files)]
        print("OURS", ours)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OURS []" in out.stdout, out.stdout


def test_every_family_is_one_class_per_kernel_without_string_branching():
    """Issue 12: each (family, kernel) is its own class, so adding a kernel adds a class and edits
    no method. Every default instance is an instance of a class registered for its kernel, and no
    candidate module compares ``self.kernel`` with a name."""
    import pathlib
    import re

    from autoquant.candidates import base, default_candidates

    for device, dtype in ((torch.device("cpu"), torch.float32), (torch.device("cuda"), torch.bfloat16)):
        for cand in default_candidates(device, dtype):
            kernels = base._KERNEL_CLASSES.get(base.get_family(cand.family), {})
            assert kernels.get(cand.kernel) is type(cand), f"{cand.name}: not built by a kernel class"
    folder = pathlib.Path(base.__file__).parent
    branching = re.compile(r"self\.kernel\s*(==|!=)\s*['\"]|self\.kernel\s+(not\s+)?in\s*[(\[{]")
    found = [f"{p.name}:{i}" for p in sorted(folder.glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if branching.search(line)]
    assert not found, f"kernel-name branching in candidates: {found}"
