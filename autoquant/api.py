"""The public verbs: ``autoquant``, ``finalize``, ``report`` and friends. Thin orchestration only.

Contract: ``autoquant()`` checks its arguments, picks the layers, starts the recording session
(:mod:`autoquant.session`) and, unless manual, finalizes; ``cancel``, ``is_recording`` and
``record_reference`` act on a session; ``get_report`` / ``report`` read a finalized model's report.
``finalize`` itself lives in :mod:`autoquant.finalize` and is re-exported here. One reason: the
user-facing surface stays small and readable, with the work done in the modules it calls.

>>> import torch
>>> from autoquant import autoquant
>>> from autoquant.bench import FakeTimer
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
>>> model = autoquant(model, torch.randn(4, 32), cache=None, progress=False,
...                   timer=FakeTimer(lambda key: 1e-5))
>>> model(torch.randn(4, 32)).shape
torch.Size([4, 8])
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .bench import BenchConfig, Timer
from .candidates import QuantizedLinear
from .config import CostModel, TuneConfig
from .finalize import finalize
from .layers import restore_float, select_layers
from .outputs import RecordedCalls
from .report import TuningReport
from .session import (
    _REPORT_ATTR,
    _SESSION_ATTR,
    DEFAULT_CACHE,
    _hf,
    _root,
    _Session,
    parse_candidates,
)
from .subclass import AutoQuantizableLinearWeight, LayerRecord
from .tune import ON_MISS

__all__ = ["autoquant", "cancel", "finalize", "is_recording", "record_reference", "report", "DEFAULT_CACHE",
           "get_report"]

log = logging.getLogger("autoquant")


def autoquant(
    model: nn.Module,
    example_input: Any = None,
    *,
    candidates: Sequence[Any] | None = None,
    mode: Any = ("interpolate", 0.85),
    manual: bool = False,
    min_sqnr: float | None = None,
    min_cosine: float | None = None,
    budget_outputs: Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    cache: Any = DEFAULT_CACHE,
    progress: bool = True,
    timer: Timer | None = None,
    bench: BenchConfig | None = None,
    on_miss: str = "bench",
    op_budget_s: float | None = 5.0,
    hopeless_factor: float = 4.0,
    deployment: str = "eager",
) -> nn.Module:
    """Prepare `model` (in place) so each nn.Linear ends up on its fastest kernel here.

    - `example_input`: a tensor, a tuple of positional args or a dict of kwargs. Given (and
      manual=False), the model is run on it, tuned and finalized before this returns.
    - No example_input, manual=False: the FIRST forward call records, tunes, finalizes, and
      returns the quantized model's output.
    - manual=True: run any number of forwards yourself, then call ``autoquant.finalize(model)``.
    - `candidates`: family names ('int8_dynamic', ...) or Candidate instances; default: every
      kernel this device offers. The float baseline is always a candidate.
    - `mode`: 'relu' or ('interpolate', c): the cost model (see DESIGN.md section 4).
    - `min_sqnr`: per-layer accuracy floor in dB, measured on the layer's recorded activations.
    - `min_cosine`: model-level accuracy budget in (0, 1]: on the recorded calls of the model
      (the example_input, the first call, or the manual forwards; up to 16 are kept), every
      floating output tensor's mean per-sample cosine similarity to the float model's output
      stays at or above it. Layers are chosen among the measured candidates (more accurate
      kernels and float included) for the least modeled time under it, and the result is verified
      end to end before finalize returns; ``autoquant.get_report(model).accuracy`` holds the
      verified cosine (mean / min) and the protected layers. 1.0 keeps every layer float.
      Works together with `min_sqnr`. See autoquant/accuracy.py for what it costs.
    - `budget_outputs`: the output tensors `min_cosine` applies to, named as the report names
      them ('logits', 'sentence_embedding', 'hidden_states[3]', '[0]', 'output' for a bare
      tensor); default every floating output tensor. E.g. ['sentence_embedding'] for a
      sentence-transformers model, whose output also holds per-token embeddings (padding included).
    - `filter_fn(module, name) -> bool`: which nn.Linear layers to consider.
    - `cache`: a path or SQL URL, a Store, or None for memory only; default $AUTOQUANT_CACHE_URL
      or a SQLite file in the user cache dir (see ``autoquant cache path``).
    - `timer` / `bench`: the timing harness and its settings (tests pass a fake timer).
    - `on_miss`: what to do for measurements the cache lacks: "bench" (time them), "error"
      (raise CacheMissError before timing anything: strict deployments on pre-tuned SKUs),
      "baseline" (time nothing; layers without cached figures stay float) or "nearest" (time
      nothing; use the figures of the same layer shape at the nearest M the cache holds, e.g. a
      serving batch size the profile did not record; the report says which M).
    - `op_budget_s`: about how long timing one unique op may take (samples adapt to it; None: full
      sample counts). `hopeless_factor`: candidates predicted (from probes at fewer rows) or first
      measured this many times slower than the best are not timed further (0: time everything).
      Both are shown per candidate by ``autoquant.get_report(model).to_ops_frame()``.
    - `deployment`: how the tuned model will run on a GPU, which decides what each candidate's
      cost is there: "eager" (default: layers called through Python; timed as synchronized eager
      calls, host time included) or "graphs" (you capture it in CUDA graphs or torch.compile it
      with mode="reduce-overhead"; timed as CUDA-graph replays). No effect on a CPU. See
      ``TuneConfig.deployment``.
    - A sticky CUDA error (illegal memory access, device-side assert) stops tuning with
      ``autoquant.CudaFaultError``; what was measured before it stays in the cache.

    Changes no global state (inductor flags, TF32, logging config). Works on a plain module and on
    a ``torch.compile``-d one. Returns `model`.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(16, 16))
    >>> m = autoquant(m, manual=True, cache=None, progress=False)
    >>> _ = m(torch.randn(2, 16))
    >>> m = autoquant.finalize(m)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"autoquant expects an nn.Module, got {type(model).__name__}")
    root = _root(model)
    if hasattr(root, _SESSION_ATTR):
        raise RuntimeError(
            "autoquant() was already called on this model and is waiting for data: run forward "
            "passes and then autoquant.finalize(model), instead of calling autoquant() again"
        )
    if hasattr(root, _REPORT_ATTR):
        log.warning("autoquant: this model was already tuned and finalized; returning it unchanged "
                    "(see autoquant.report(model))")
        return model
    if on_miss not in ON_MISS:
        raise ValueError(f"on_miss={on_miss!r}: use one of {ON_MISS}")
    config = TuneConfig(
        cost_model=CostModel.parse(mode), min_sqnr=min_sqnr,
        candidates=None, bench=bench or BenchConfig(), op_budget_s=op_budget_s,
        hopeless_factor=hopeless_factor, min_cosine=min_cosine, deployment=deployment,
    )
    outputs = _parse_outputs(budget_outputs, config.min_cosine)
    layers, skipped = select_layers(root, filter_fn)
    if not layers:
        log.warning("autoquant: no nn.Linear layer to tune in %s%s", type(root).__name__,
                    f" ({len(skipped)} skipped: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else "")
    records: dict[str, LayerRecord] = {}
    for name, lin in layers.items():
        records[name] = LayerRecord(name, max_rows=config.activation_rows)
        lin.weight = nn.Parameter(AutoQuantizableLinearWeight.wrap(lin.weight, records[name]),
                                  requires_grad=lin.weight.requires_grad)
    session = _Session(config, layers, records, skipped, parse_candidates(candidates), cache, timer,
                       progress, on_miss)
    if config.min_cosine is not None:
        session.recorded = RecordedCalls(max_calls=config.verify_calls, outputs=outputs)
        session.capture = session.recorded.register(root)
    object.__setattr__(root, _SESSION_ATTR, session)
    hf = _hf(root)
    if example_input is not None:
        # A transformers model given token ids: a short greedy generate, so decode shapes are tuned too.
        if hf is None or not hf.generate_example(root, example_input):
            with torch.no_grad():
                _call(root, example_input)
        if not manual:
            finalize(model)
    elif not manual:
        if hf is not None:
            hf.arm(root)  # the first generate() recorded whole; or the first forward (model.forward(...) too)
        else:
            session.hooks.append(model.register_forward_pre_hook(_first_call_hook, with_kwargs=True))
    return model


def _parse_outputs(names: Sequence[str] | None, min_cosine: float | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if min_cosine is None:
        raise ValueError("budget_outputs names the outputs min_cosine applies to: pass min_cosine as well")
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"budget_outputs must be output names such as ['logits'], got {names!r}")
    return names


def _call(module: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return module(**example_input)
    if isinstance(example_input, tuple):
        return module(*example_input)
    return module(example_input)


def is_recording(model: nn.Module) -> bool:
    """Whether `model` is between ``autoquant(model, ...)`` and its finalize (recording shapes)."""
    return hasattr(_root(model), _SESSION_ATTR)


def cancel(model: nn.Module) -> nn.Module:
    """Undo ``autoquant(model, ...)`` on a model that is still recording: every layer gets its
    plain float weight Parameter back and autoquant's hooks are removed, so the model is as it was
    before (e.g. after a failed example run). Nothing is tuned, stored or reported. A model that
    is not recording is returned unchanged. Returns `model`.

    >>> m = torch.nn.Linear(8, 4)
    >>> _ = autoquant(m, manual=True, cache=None, progress=False)
    >>> is_recording(m), type(cancel(m).weight).__name__, is_recording(m)
    (True, 'Parameter', False)
    """
    root = _root(model)
    session: _Session | None = root.__dict__.pop(_SESSION_ATTR, None)
    if session is None:
        return model
    for lin in session.layers.values():
        restore_float(lin)
    for handle in [*session.hooks, session.capture]:
        if handle is not None:
            handle.remove()
    session.hooks.clear()
    session.capture = None
    return model


def record_reference(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> bool:
    """With ``min_cosine``: add one call of `model` (its arguments and float `output`) to the
    calls the accuracy budget is verified on. The model's own forward hook does this for calls
    of ``model(...)``; a caller that runs ``model.forward(...)`` directly (which fires no hook)
    records it here. False where `model` is not recording with a budget (nothing to do)."""
    session: _Session | None = getattr(_root(model), _SESSION_ATTR, None)
    if session is None or session.recorded is None:
        return False
    session.recorded.record(_root(model), args, kwargs, output)
    return True


def _first_call_hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """First forward: record on the eager module, tune, finalize; the forward then proceeds on the
    finalized model, so the caller gets the quantized model's output."""
    root = _root(model)
    session: _Session | None = getattr(root, _SESSION_ATTR, None)
    if session is None:
        return None
    for handle in session.hooks:
        handle.remove()
    session.hooks.clear()
    with torch.no_grad():
        root(*args, **kwargs)
    finalize(model)
    return None


def get_report(model: nn.Module) -> TuningReport:
    """The full TuningReport object of a finalized model, with the shapes its layers met after
    finalize that the warm run never showed (``unseen_after``) brought up to date."""
    root = _root(model)
    rep = getattr(root, _REPORT_ATTR, None)
    if rep is None:
        if hasattr(root, _SESSION_ATTR):
            raise RuntimeError("this model is still recording: call autoquant.finalize(model) first")
        raise RuntimeError("this model was not tuned by autoquant: call autoquant(model, example_input) first")
    rep.unseen_after = {name: dict(mod.unseen_m) for name, mod in root.named_modules()
                        if isinstance(mod, QuantizedLinear) and mod.unseen_m}
    return rep


def report(model: nn.Module, *, long: bool = False):  # -> pandas.DataFrame
    """Per-layer DataFrame: layer, shapes and counts, each candidate's cost (µs) or why it was not
    run, winner and kernel, speedup over the float baseline, SQNR. `long=True`: one row per
    (layer, candidate) instead."""
    rep = get_report(model)
    return rep.to_long_frame() if long else rep.to_frame()


# `from autoquant import autoquant` users can write autoquant.finalize(model) / autoquant.report(model).
autoquant.finalize = finalize  # type: ignore[attr-defined]
autoquant.report = report  # type: ignore[attr-defined]
