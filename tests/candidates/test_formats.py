"""Kernels that declare one weight_format read one packed dict: same keys, dtypes, shapes and values
from `quantize`, and each kernel runs correctly on the dict another kernel made (M-dispatch)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    DTYPES_BY_DEVICE,
    all_instances,
    dtype_id,
    kernel_floor,
    make_input,
    make_linear,
    sqnr,
)

from autoquant.candidates import get_family
from autoquant.keys import OpShape

EXPECTED_KEYS = {
    "int8_nk_rowscale": {"w_int8": torch.int8, "w_scale": torch.float32},
    "fp8_nk_rowscale": {"w_fp8": torch.float8_e4m3fn, "w_scale": torch.float32},
}


def _groups(dev: str, dtype: torch.dtype) -> dict[str, list]:
    groups: dict[str, list] = {}
    for c in all_instances(dev, dtype):
        if c.weight_format is not None:
            groups.setdefault(c.weight_format, []).append(c)
    return groups


def _format_params():
    out = []
    for dev, dtypes in DTYPES_BY_DEVICE.items():
        marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU in this process")] \
            if dev == "cuda" else []
        for dtype in dtypes:
            for fmt, cands in _groups(dev, dtype).items():
                out.append(pytest.param(dev, dtype, fmt, cands, marks=marks, id=f"{dev}-{dtype_id(dtype)}-{fmt}"))
    return out


def test_the_int8_and_fp8_families_share_formats():
    i8 = {get_family("int8_weight_only")("int8pack").weight_format, get_family("int8_dynamic")("int_mm").weight_format}
    f8 = {get_family("fp8_weight_only")("dequant").weight_format, get_family("fp8_dynamic")("scaled_mm").weight_format}
    assert i8 == {"int8_nk_rowscale"} and f8 == {"fp8_nk_rowscale"}
    assert get_family("int4_weight_only")("tinygemm_cpu", 64).weight_format == "int4_nk_g64"
    assert get_family("float")("aten").weight_format is None


@pytest.mark.parametrize("dev, dtype, fmt, cands", _format_params())
def test_shared_packed_dict(dev, dtype, fmt, cands):
    device = torch.device(dev)
    k, n, m = 256, 64, 33
    w, b = make_linear(k, n, dtype, seed=21, device=device)
    x = make_input((m, k), dtype, seed=22, device=device)
    packs = {c: c.quantize(w) for c in cands}
    first = next(iter(packs.values()))
    if fmt in EXPECTED_KEYS:
        assert {name: t.dtype for name, t in first.items()} == EXPECTED_KEYS[fmt]
    for c, packed in packs.items():
        assert packed.keys() == first.keys(), c.name
        for name in packed:
            assert packed[name].dtype == first[name].dtype and packed[name].shape == first[name].shape
            assert torch.equal(packed[name].view(torch.uint8), first[name].view(torch.uint8)), (c.name, name)
    op = OpShape(m, k, n, True, dtype_id(dtype))
    runnable = [c for c in cands if c.supports(device, op) is None]
    for maker, reader in itertools.product(runnable, runnable):
        packed = packs[maker]
        y = reader.linear(x, packed, reader.prepare(packed), b)
        ref = reader.reference(x, packed, b)
        assert sqnr(ref, y) >= kernel_floor(device, dtype, reader), f"{reader.name} on {maker.name}'s dict"
