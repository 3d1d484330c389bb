"""The public verbs: ``autoquant``, ``finalize``, ``report``. Thin orchestration only.

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
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .accuracy import BudgetResult, RecordedCalls, enforce_budget
from .bench import BenchConfig, Timer, default_timer
from .candidates import Candidate, QuantizedLinear, default_candidates, get_family
from .config import CostModel, TuneConfig
from .finalize import build_layer, copy_hooks, replace_module, restore_float
from .hardware import environment
from .keys import OpShape
from .report import TuningReport
from .selection import LayerPlan, is_baseline, select_layer
from .store import MemoryStore, SafeStore, Store
from .subclass import AutoQuantizableLinearWeight, LayerRecord
from .tune import ON_MISS, _return_freed_memory, tune_ops

__all__ = ["autoquant", "cancel", "finalize", "is_recording", "record_reference", "report", "DEFAULT_CACHE",
           "get_report"]

log = logging.getLogger("autoquant")


class _DefaultCache:
    def __repr__(self) -> str:
        return "<default cache: $AUTOQUANT_CACHE_URL or the user cache dir>"


DEFAULT_CACHE: Any = _DefaultCache()
_SESSION_ATTR = "_autoquant_session"
_REPORT_ATTR = "_autoquant_report"
_process_store: MemoryStore | None = None


@dataclass
class _Session:
    """What autoquant() set up and finalize() consumes; lives on the model until finalize."""

    config: TuneConfig
    layers: dict[str, nn.Linear]
    records: dict[str, LayerRecord]
    skipped: dict[str, str]
    candidates: tuple[Candidate | str, ...] | None
    cache: Any
    timer: Timer | None
    progress: bool
    on_miss: str = "bench"
    hooks: list[Any] = field(default_factory=list)
    # With min_cosine: the model's recorded calls and float outputs, and the hook collecting them.
    recorded: RecordedCalls | None = None
    capture: Any = None


def _root(model: nn.Module) -> nn.Module:
    """The module that owns the layers: a torch.compile wrapper's original module, else itself."""
    return getattr(model, "_orig_mod", model)


def _parse_candidates(candidates: Iterable[Any] | None) -> tuple[Candidate | str, ...] | None:
    """Candidate instances stay as given; family names are checked now and expanded per device
    and dtype at tuning time."""
    if candidates is None:
        return None
    out: list[Candidate | str] = []
    for c in candidates:
        if isinstance(c, Candidate):
            out.append(c)
        elif isinstance(c, str):
            get_family(c)  # raises KeyError naming the known families
            out.append(c)
        else:
            raise TypeError(f"candidates must be Candidate instances or family names, got {c!r}")
    if not out:
        raise ValueError("candidates=[] selects nothing: pass family names such as 'int8_dynamic', or None for all")
    return tuple(dict.fromkeys(out))


def _select_layers(root: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The nn.Linear layers to tune, and why the others are left alone."""
    owners: dict[int, list[str]] = {}
    for name, mod in root.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    layers: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for name, mod in root.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            skipped[name] = "excluded by filter_fn"
            continue
        w = mod.weight
        if isinstance(w, AutoQuantizableLinearWeight):
            skipped[name] = "already being recorded"
            continue
        if len(owners.get(id(w), [])) > 1:
            skipped[name] = f"weight shared with {', '.join(o for o in owners[id(w)] if not o.startswith(name + '.'))}: kept float"
            continue
        if w.device.type == "meta":
            skipped[name] = "weight on the meta device (not loaded): kept float"
            continue
        if w.device.type not in ("cpu", "cuda"):
            skipped[name] = f"weight on {w.device.type}: only cpu and cuda are tuned"
            continue
        if not w.dtype.is_floating_point:
            skipped[name] = f"weight dtype {w.dtype} is not floating point"
            continue
        if not bool(torch.isfinite(w.detach()).all()):
            skipped[name] = "weight holds NaN or Inf: kept float"
            continue
        layers[name] = mod
    return layers, skipped


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
    layers, skipped = _select_layers(root, filter_fn)
    if not layers:
        log.warning("autoquant: no nn.Linear layer to tune in %s%s", type(root).__name__,
                    f" ({len(skipped)} skipped: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else "")
    records: dict[str, LayerRecord] = {}
    for name, lin in layers.items():
        records[name] = LayerRecord(name, max_rows=config.activation_rows)
        lin.weight = nn.Parameter(AutoQuantizableLinearWeight.wrap(lin.weight, records[name]),
                                  requires_grad=lin.weight.requires_grad)
    session = _Session(config, layers, records, skipped, _parse_candidates(candidates), cache, timer,
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


def _hf(root: nn.Module) -> Any:
    """autoquant.hf for a transformers model (it has `config` and `can_generate`), else None."""
    if not (hasattr(root, "config") and callable(getattr(root, "can_generate", None))):
        return None
    try:
        from . import hf  # noqa: PLC0415 - transformers is importable: the model is one of its classes
    except ImportError as exc:  # a transformers without the quantizer registry: plain forwards then
        log.warning("autoquant: %s; tuning this transformers model on plain forwards (no generate-aware "
                    "recording, save_pretrained writes the float model)", exc)
        return None
    return hf


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


def _store_for(cache: Any, custom_timer: bool) -> tuple[Store, str | None]:
    """The store for `cache`. cache=None keeps measurements in memory: one store per process for
    the real harness, a fresh one per call when a custom timer is injected (its figures must never
    be mistaken for real timings by a later call)."""
    global _process_store
    if cache is None:
        if custom_timer:
            return MemoryStore(), None
        if _process_store is None:
            _process_store = MemoryStore()
        return _process_store, None
    if hasattr(cache, "get_many") and hasattr(cache, "put_many"):
        return cache, None
    from .cache_db import default_cache_url, open_store_or_memory  # noqa: PLC0415 - SQL only when used

    return open_store_or_memory(default_cache_url() if cache is DEFAULT_CACHE else cache)


def _candidates_for(op: OpShape, device: torch.device, chosen: tuple[Candidate | str, ...] | None) -> list[Candidate]:
    base = get_family("float")(kernel="aten")
    defaults = default_candidates(device, op.torch_dtype)
    if chosen is None:
        return list(dict.fromkeys([base, *defaults]))
    cands: list[Candidate] = []
    for c in chosen:
        cands.extend([x for x in defaults if x.family == c] if isinstance(c, str) else [c])
    return list(dict.fromkeys([base, *cands]))


def finalize(model: nn.Module) -> nn.Module:
    """Tune what the recorded forwards saw and swap every layer for its winner; returns `model`.

    Layers never called stay float and are listed as unseen in ``autoquant.report(model)``.
    Interrupting (Ctrl-C) leaves every layer in float and the cache consistent.
    """
    root = _root(model)
    session: _Session | None = getattr(root, _SESSION_ATTR, None)
    if session is None:
        if hasattr(root, _REPORT_ATTR):
            log.warning("autoquant.finalize: model already finalized; nothing to do")
            return model
        raise RuntimeError("autoquant.finalize(model) needs autoquant(model, manual=True) first")
    started = time.perf_counter()
    if session.layers and not any(r.calls for r in session.records.values()):
        log.warning("autoquant.finalize: no forward pass was recorded, so every layer stays float; "
                    "run the model on representative inputs before finalize")
    if session.capture is not None:
        session.capture.remove()
        session.capture = None
    try:
        if session.recorded is not None and (session.recorded.calls or any(r.calls for r in session.records.values())):
            session.recorded.check()  # before tuning: a budget that cannot be checked fails fast
        tuning = _tune_session(session)
        budget, built = _budget(root, session, tuning[0]) if session.recorded is not None else (None, {})
    except BaseException:
        for lin in session.layers.values():
            restore_float(lin)
        for handle in session.hooks:
            handle.remove()
        object.__delattr__(root, _SESSION_ATTR)
        raise
    plans, envs, store_desc, warnings_ = tuning
    if budget is not None and not budget.met:
        warnings_.append(f"autoquant: accuracy budget min_cosine={budget.min_cosine} not met: {budget.note}")
    names = list(session.layers)
    _return_freed_memory()  # what selection freed (its trial builds), before the winners are built
    for name in names:
        # Taken out of the session as it is swapped: the float layer (and its weight, unless the
        # caller holds it) is freed before the next winner is built, so finalizing never holds
        # the float model and the quantized one whole side by side.
        lin = session.layers.pop(name)
        plan = plans[name]
        new = None
        try:
            new = built.pop(name) if name in built else build_layer(plan, lin, session.records[name].act_absmax())
        except Exception as exc:  # the model must never be taken down by one layer
            plan.status = f"kept float: building the winner failed ({type(exc).__name__}: {exc})"
            plan.winner, plan.dispatch, plan.cost = None, None, plan.baseline_cost
            log.warning("layer %s %s", name, plan.status)
        if new is None:
            restore_float(lin)
        else:
            copy_hooks(lin, new)
            new.train(lin.training)
            replace_module(root, name, new)
        del lin, new
        _return_freed_memory()
    for handle in session.hooks:
        handle.remove()
    object.__delattr__(root, _SESSION_ATTR)
    rep = TuningReport(
        layers=[plans[n] for n in names], skipped=dict(session.skipped), environments=envs,
        cost_model=session.config.cost_model, min_sqnr=session.config.min_sqnr, cache=store_desc,
        deployment=session.config.deployment,
        seconds=time.perf_counter() - started, warnings=warnings_, accuracy=budget,
    )
    object.__setattr__(root, _REPORT_ATTR, rep)
    rep.log_summary()
    hf = _hf(root)
    if hf is not None:
        hf.attach(root)  # save_pretrained now writes the quantized model
    return model


def _budget(root: nn.Module, session: _Session, plans: dict[str, LayerPlan]
            ) -> tuple[BudgetResult, dict[str, nn.Module | None]]:
    """Meet session.config.min_cosine on the recorded calls (accuracy.enforce_budget): the layers
    get their plain float weights back first, so the checking forwards record nothing."""
    assert session.recorded is not None and session.config.min_cosine is not None
    cfg = session.config
    if not session.recorded.calls:
        note = "no forward pass was recorded, so every layer stays float and nothing was verified"
        return BudgetResult(cfg.min_cosine, None, None, 0, met=True, note=note, outputs=session.recorded.outputs), {}
    for lin in session.layers.values():
        restore_float(lin)
    return enforce_budget(root, session.layers, plans, session.recorded, cfg.min_cosine,
                          margin=cfg.budget_margin, rounds=cfg.verify_rounds,
                          act_absmax={n: a for n, r in session.records.items() if (a := r.act_absmax()) is not None})


def _tune_session(session: _Session) -> tuple[dict[str, LayerPlan], list[Any], str, list[str]]:
    warnings_: list[str] = []
    store, problem = _store_for(session.cache, session.timer is not None)
    if problem:
        warnings_.append(problem)
    safe = SafeStore(store)
    by_device: dict[torch.device, dict[OpShape, list[Candidate]]] = {}
    for name, lin in session.layers.items():
        device = lin.weight.device
        for op in session.records[name].counts:
            if op.m > 0:
                by_device.setdefault(device, {})[op] = _candidates_for(op, device, session.candidates)
    trials: dict[torch.device, dict] = {}
    envs = []
    for device, ops in by_device.items():
        env = environment(device)
        envs.append(env)
        timer = session.timer or default_timer(device, session.config.bench)
        trials[device] = tune_ops(ops, device, safe, timer, session.config, progress=session.progress,
                                  env=env, on_miss=session.on_miss)
    if safe.failure:
        warnings_.append(safe.failure)
    plans: dict[str, LayerPlan] = {}
    for name, lin in session.layers.items():
        rec = session.records[name]
        ops = {op: n for op, n in rec.counts.items() if op.m > 0}
        weight = lin.weight.unwrap() if isinstance(lin.weight, AutoQuantizableLinearWeight) else lin.weight.detach()
        bias = None if lin.bias is None else lin.bias.detach()
        device_trials = trials.get(weight.device, {})
        plans[name] = select_layer(name, ops, device_trials, weight, bias, rec.activations(), session.config,
                                   act_absmax=rec.act_absmax())
    timed_any = any(t.ok for dev in trials.values() for per in dev.values() for t in per.values())
    f64 = sorted(name for name, rec in session.records.items()
                 if any(op.m > 0 and op.dtype == "float64" for op in rec.counts))
    for name in f64:
        if plans[name].winner is None or is_baseline(plans[name].winner):
            plans[name].status = f"kept float: {_FLOAT64}"
    if by_device and not timed_any:
        if f64 and len(f64) == sum(1 for r in session.records.values() if r.calls):
            msg = f"autoquant: nothing was timed and the model stays float: {_FLOAT64}"
        else:
            msg = "autoquant: NOTHING could be timed (every candidate failed or no timing backend): the model stays float"
        log.error("%s", msg)
        warnings_.append(msg)
    warnings_.extend(_nonfinite_notes(session, plans))
    return plans, envs, safe.describe(), warnings_


_FLOAT64 = ("no quantized kernel takes float64 activations; cast the model and its inputs to float32 "
            "or bfloat16 (model.float() / model.bfloat16()) and run autoquant again")


def _nonfinite_notes(session: _Session, plans: dict[str, LayerPlan]) -> list[str]:
    """Say why layers whose recorded activations hold NaN or Inf stayed float: their accuracy
    cannot be measured (SQNR of NaN), so no quantized kernel can be shown to be safe."""
    bad = []
    for name, rec in session.records.items():
        acts = rec.activations()
        if acts is None or bool(torch.isfinite(acts).all()):
            continue
        bad.append(name)
        plan = plans.get(name)
        if plan is not None and (plan.winner is None or is_baseline(plan.winner)):
            plan.status = ("kept float: its recorded activations hold NaN or Inf (from the example input or "
                           "an earlier layer), so no quantized kernel's accuracy could be checked; tune on finite inputs")
    if not bad:
        return []
    msg = (f"autoquant: the recorded activations of {len(bad)} layer(s) ({', '.join(bad[:5])}"
           f"{', ...' if len(bad) > 5 else ''}) hold NaN or Inf: accuracy cannot be measured on them, so "
           "they stay float unless a winner was found anyway; run autoquant on finite example inputs")
    log.warning("%s", msg)
    return [msg]


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
