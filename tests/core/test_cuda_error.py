"""A sticky CUDA error (illegal memory access, device-side assert) stops tuning with a message that
says what happened and what to do, keeping what earlier ops measured (issue 13, defect 8).

After such an error every later kernel in the process fails, so carrying on would record a false
"failed" reason for every candidate after it and keep the layers float. The errors are raised on
a CPU the way torch raises them (a RuntimeError / torch.AcceleratorError whose text names them)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from autoquant import autoquant
from autoquant.bench import CountingTimer, FakeTimer, is_sticky_cuda_error
from autoquant.candidates import FloatCandidate, Int8Dynamic
from autoquant.config import TuneConfig
from autoquant.keys import OpShape
from autoquant.store import MemoryStore
from autoquant.tune import CudaFaultError, tune_ops

CPU = torch.device("cpu")
ILLEGAL = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported"
SMALL, LARGE = OpShape(4, 32, 16, True, "float32"), OpShape(8, 32, 16, True, "float32")
CANDS = [FloatCandidate("aten"), Int8Dynamic("fbgemm"), Int8Dynamic("onednn")]


def accelerator_error(text: str) -> BaseException:
    cls = getattr(torch, "AcceleratorError", RuntimeError)
    return cls(text)


class Faulting(FakeTimer):
    """Raises `error` when asked to time `kernel` on an op with `m` rows, like a kernel that hit
    an illegal address there; every other figure is 10 us."""

    def __init__(self, kernel: str, m: int, error: BaseException, where: str = "measure") -> None:
        super().__init__(lambda k: 10e-6, run=False)
        self.kernel, self.m, self.error, self.where = kernel, m, error, where

    def _maybe_raise(self, jobs, where):
        if where == self.where and any(j.key.op.m == self.m and f'"{self.kernel}"' in j.key.params for j in jobs):
            raise self.error

    def quick(self, job, device):
        self._maybe_raise([job], "quick")
        return super().quick(job, device)

    def measure(self, jobs, device):
        self._maybe_raise(jobs, "measure")
        return super().measure(jobs, device)


@pytest.mark.parametrize("where", ["measure", "quick"])
@pytest.mark.parametrize("make", [RuntimeError, accelerator_error], ids=["RuntimeError", "AcceleratorError"])
def test_sticky_error_stops_tuning_and_keeps_earlier_ops(where, make):
    store = MemoryStore()
    timer = CountingTimer(Faulting("onednn", LARGE.m, make(ILLEGAL), where))
    with pytest.raises(CudaFaultError) as info:
        tune_ops({SMALL: CANDS, LARGE: CANDS}, CPU, store, timer, TuneConfig(), progress=False)
    text = str(info.value)
    assert "illegal memory access" in text and LARGE.label() in text
    assert "op 2 of 2" in text and "Restart the Python process" in text and "CUDA_LAUNCH_BLOCKING=1" in text
    assert isinstance(info.value.__cause__, RuntimeError)
    # the first op's measurements are in the cache; none of the faulting op's
    stored = store.get_many([k for k in timer.keys])
    assert stored and {k.op for k in stored} == {SMALL}
    # a rerun (after a restart) times only what is missing: the second op
    again = CountingTimer(FakeTimer(lambda k: 10e-6, run=False))
    tune_ops({SMALL: CANDS, LARGE: CANDS}, CPU, store, again, TuneConfig(), progress=False)
    assert again.keys and {k.op for k in again.keys} == {LARGE}


def test_error_raised_by_a_kernel_while_building_stops_tuning(monkeypatch):
    """The same when the candidate's own call raises (its output check, before any timing)."""
    cand = Int8Dynamic("onednn")

    def build(self, weight, bias, packed=None, **_):
        raise RuntimeError(ILLEGAL)

    monkeypatch.setattr(type(cand), "build", build)
    with pytest.raises(CudaFaultError, match="running int8_dynamic"):
        tune_ops({SMALL: [FloatCandidate("aten"), cand]}, CPU, MemoryStore(), FakeTimer(lambda k: 1e-5, run=False),
                 TuneConfig(), progress=False)


def test_ordinary_failures_stay_with_their_candidate():
    """Out of memory or a rejected launch is not sticky: that candidate fails, tuning goes on."""
    oom = Faulting("onednn", SMALL.m, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    out = tune_ops({SMALL: CANDS}, CPU, MemoryStore(), oom, TuneConfig(), progress=False)[SMALL]
    assert out[Int8Dynamic("onednn")].reason and not out[Int8Dynamic("onednn")].ok
    assert out[FloatCandidate("aten")].ok and out[Int8Dynamic("fbgemm")].ok


def test_autoquant_surfaces_the_fault():
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    timer = Faulting("fbgemm", 4, RuntimeError(ILLEGAL))
    with pytest.raises(CudaFaultError, match="illegal memory access"):
        autoquant(model, torch.randn(4, 32), cache=None, progress=False, timer=timer)


@pytest.mark.parametrize("text, sticky", [
    (ILLEGAL, True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: misaligned address", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA out of memory. Tried to allocate 20.00 MiB", False),
    ("CUDA error: invalid argument", False),
    ("expected scalar type Float but found BFloat16", False),
    ("an illegal memory access", False),  # not a CUDA error: no such text without CUDA
])
def test_sticky_error_text(text, sticky):
    assert is_sticky_cuda_error(RuntimeError(text)) is sticky


def test_sticky_error_found_in_the_cause():
    try:
        try:
            raise RuntimeError(ILLEGAL)
        except RuntimeError as inner:
            raise ValueError("triton launcher failed") from inner
    except ValueError as outer:
        assert is_sticky_cuda_error(outer)
    assert is_sticky_cuda_error(accelerator_error("illegal memory access was encountered"))
    assert json.dumps(str(CudaFaultError("x")))  # a plain, printable RuntimeError
