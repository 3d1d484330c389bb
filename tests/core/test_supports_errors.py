"""A candidate whose supports() hits a broken required install is out of the tuning, and the
tuner says so at ERROR level once per message, not only as a reason in the report."""

import logging

import torch

from autoquant import tune
from autoquant.candidates import Int8Dynamic
from autoquant.keys import OpShape


def test_import_error_in_supports_is_a_reason_and_logged_once(monkeypatch, caplog):
    cand = Int8Dynamic("fbgemm")

    def broken(self, device, op):
        raise ImportError("triton failed to import: libdemo.so: cannot open shared object file")

    monkeypatch.setattr(type(cand), "supports", broken)
    monkeypatch.setattr(tune, "_IMPORT_ERRORS_LOGGED", set())
    op = OpShape(m=4, k=32, n=16, bias=False, dtype="float32")
    with caplog.at_level(logging.ERROR, logger="autoquant"):
        first = tune._supports(cand, torch.device("cpu"), op)
        second = tune._supports(cand, torch.device("cpu"), op)
    assert first == second and "ImportError" in first and "libdemo.so" in first
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "required package failed to import" in errors[0].getMessage()
    assert cand.name in errors[0].getMessage()


def test_other_exceptions_stay_quiet_reasons(monkeypatch, caplog):
    cand = Int8Dynamic("fbgemm")

    def broken(self, device, op):
        raise ValueError("odd shape")

    monkeypatch.setattr(type(cand), "supports", broken)
    op = OpShape(m=4, k=32, n=16, bias=False, dtype="float32")
    with caplog.at_level(logging.ERROR, logger="autoquant"):
        reason = tune._supports(cand, torch.device("cpu"), op)
    assert reason == "supports() raised ValueError: odd shape"
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]
