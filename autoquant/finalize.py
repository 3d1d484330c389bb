"""``finalize(model)``: tune what the recording saw, choose per layer, swap each layer for its winner.

Contract: consumes the :class:`~autoquant.session._Session` that ``autoquant()`` left on the
model: times the recorded ops (through the cache), selects per layer, meets ``min_cosine`` when
one was asked for (:func:`autoquant.accuracy.enforce_budget`), replaces every layer by its winner
one at a time (each float layer is freed before the next winner is built), and leaves the
TuningReport on the model. On any error or interrupt before the swap, every layer gets its float
weight back and the session is removed; a layer whose winner fails to build stays float.

One reason to exist on its own: finalize is the only step that changes the model's layers for
good; the public verbs (``autoquant.api``) only start, inspect or cancel a session. The
layer-building pieces live in :mod:`autoquant.layers` and stay importable from here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from .accuracy import BudgetResult, enforce_budget
from .bench import default_timer
from .candidates import Candidate
from .hardware import environment
from .keys import OpShape
from .layers import (
    DispatchLinear,
    build_layer,
    copy_hooks,
    from_linear,
    label,
    make_layer,
    plain_weight,
    replace_module,
    restore_float,
)
from .report import TuningReport
from .selection import LayerPlan, is_baseline, select_layer
from .session import _REPORT_ATTR, _SESSION_ATTR, _candidates_for, _hf, _root, _Session, _store_for
from .store import SafeStore
from .subclass import AutoQuantizableLinearWeight
from .tune import _return_freed_memory, tune_ops

# The layer-building names live in autoquant.layers; they stay importable from here for existing callers.
__all__ = ["DispatchLinear", "build_layer", "copy_hooks", "finalize", "from_linear", "label", "make_layer",
           "plain_weight", "restore_float", "replace_module"]

log = logging.getLogger("autoquant")


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
