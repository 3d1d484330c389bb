"""``quantize(model, scheme, **params)``: one scheme on every selected layer, nothing timed.

The uniform verb users know from torchao's ``quantize_`` and optimum-quanto's ``quantize`` +
``freeze``, with autoquant's result: the same layers (``QuantizedLinear``), ``autoquant.report``,
``save`` / ``load``, ``torch.compile`` and ``torch.export`` behaviour. Per layer, the kernel is:

1. the one named in `params` (``kernel="onednn"``), or
2. the fastest kernel of the scheme in the tuning cache for this layer's op at `m` rows (only
   measurements of this very environment count), or
3. a fixed rule: the first kernel of the scheme, in ``default_candidates`` order for the layer's
   device and dtype, whose ``supports`` accepts the op (M = `m`).

The report's status names which. A layer no kernel of the scheme can run stays float, and says why.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Linear(64, 32))
>>> m = quantize(m, "int8_dynamic", cache=None)
>>> type(m[0]).__name__, m[0].candidate.kernel
('QuantizedLinear', 'fbgemm')
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .candidates import Candidate, candidate_from_json, default_candidates, get_family
from .config import CostModel, check_deployment
from .hardware import environment
from .keys import BenchKey, OpShape, Timed, dtype_name
from .layers import build_layer, copy_hooks, replace_module, select_layers
from .report import TuningReport
from .selection import LayerPlan, is_baseline
from .session import _REPORT_ATTR, _SESSION_ATTR, DEFAULT_CACHE, _root, _store_for

__all__ = ["quantize"]

log = logging.getLogger("autoquant")


def _options(scheme: str | Candidate, params: dict[str, Any], device: torch.device,
             dtype: torch.dtype) -> list[Candidate]:
    """The candidates `scheme` + `params` can mean on this device and dtype, in rule order."""
    if isinstance(scheme, Candidate):
        return [scheme]
    get_family(scheme)  # KeyError naming the known families
    if "kernel" in params:
        return [candidate_from_json(scheme, params)]
    defaults = [c for c in default_candidates(device, dtype) if c.family == scheme]
    out = [candidate_from_json(scheme, {**c.params(), **params}) for c in defaults]
    return list(dict.fromkeys(out)) or [candidate_from_json(scheme, params)]


def _from_cache(store: Any, env_hash: str, runnable: list[Candidate], op: OpShape,
                device: str = "cpu", deployment: str = "eager") -> Candidate | None:
    """The cached fastest of `runnable` on `op`. Figures of one timed path are compared: on CUDA
    with `deployment` "eager", the eager calls a quantized model makes (``Timed.EAGER``), else,
    where the cache has none, graph replays (FULL); with "graphs", graph replays only (what a
    captured or reduce-overhead-compiled model runs: eager figures would favour kernels with less
    host work); on a CPU, FULL (an eager call there)."""
    if device != "cuda":
        parts: tuple[Timed, ...] = (Timed.FULL,)
    else:
        parts = (Timed.EAGER, Timed.FULL) if deployment == "eager" else (Timed.FULL,)
    for part in parts:
        keys = {c: BenchKey(env_hash, c.family, c.params_json(), c.version, op, part) for c in runnable}
        found = store.get_many(keys.values()) if keys else {}
        timed = [(found[k].median_s, i, c) for i, (c, k) in enumerate(keys.items()) if k in found]
        if timed:
            return min(timed)[2]
    return None


def quantize(
    model: nn.Module,
    scheme: str | Candidate,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    cache: Any = DEFAULT_CACHE,
    m: int = 1,
    deployment: str = "eager",
    **params: Any,
) -> nn.Module:
    """Put `scheme` (a family name such as "int8_dynamic", or a Candidate) on every nn.Linear
    `filter_fn` selects, in place, timing nothing; returns `model`.

    - `params`: the family's params (``group_size=64``, ``kernel="onednn"``, ...); validated.
    - `cache`: where to look up kernel timings (a path, URL, Store, or None for the rule only).
    - `m`: rows per call the cached timings are read at (1: token-by-token decoding).
    - `deployment`: as for ``autoquant()``: on a GPU, "eager" reads the eager-call figures, "graphs"
      the CUDA-graph replays (a model you capture or compile with mode="reduce-overhead"). No
      effect on a CPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    check_deployment(deployment)
    root = _root(model)
    if hasattr(root, _SESSION_ATTR) or hasattr(root, _REPORT_ATTR):
        raise RuntimeError("this model was already given to autoquant / quantize: start from the float model")
    family = scheme if isinstance(scheme, Candidate) else get_family(scheme)
    if family.calibrated:  # quantize runs no forward, so it has no activation statistics to read
        raise ValueError(f"quantize: {scheme if isinstance(scheme, str) else scheme.name} is calibrated on the "
                         "activations each layer sees, and quantize runs no forward: use autoquant(model, "
                         "example_input, candidates=[...]) (which records them), or apply_plan with a plan "
                         "saved from such a model")
    started = time.perf_counter()
    layers, skipped = select_layers(root, filter_fn)
    store, problem = _store_for(cache, False) if cache is not None else (None, None)
    warnings_ = [problem] if problem else []
    plans: list[LayerPlan] = []
    envs: dict[torch.device, Any] = {}
    for name, lin in layers.items():
        w = lin.weight
        if w.device not in envs:
            envs[w.device] = environment(w.device)
        op = OpShape(m, lin.in_features, lin.out_features, lin.bias is not None, dtype_name(w.dtype))
        options = _options(scheme, dict(params), w.device, w.dtype)
        reasons = {c: c.supports(w.device, op) for c in options}
        runnable = [c for c, r in reasons.items() if r is None]
        plan = LayerPlan(name=name, ops={}, status="")
        chosen = (_from_cache(store, envs[w.device].hash, runnable, op, w.device.type, deployment)
                  if store is not None else None)
        if chosen is not None:
            plan.status = f"quantized: fastest cached {chosen.family} kernel at M={m}"
        elif runnable:
            chosen = runnable[0]
            plan.status = (f"quantized: {chosen.family} rule on {w.device.type} {dtype_name(w.dtype)} (first "
                           "kernel in default_candidates order that supports this op; none timed in the cache)")
        else:
            plan.status = "kept float: " + "; ".join(str(r) for r in reasons.values())
        plan.winner = chosen
        new = None
        if chosen is not None and not is_baseline(chosen):
            try:
                new = build_layer(plan, lin)
            except Exception as exc:  # one layer must never take the model down
                plan.status = f"kept float: building {chosen.name} failed ({type(exc).__name__}: {exc})"
                plan.winner = None
        if new is not None:
            copy_hooks(lin, new)
            new.train(lin.training)
            replace_module(root, name, new)
        elif plan.status.startswith("kept float"):
            log.warning("layer %s %s", name, plan.status)
        plans.append(plan)
    rep = TuningReport(layers=plans, skipped=dict(skipped), environments=list(envs.values()),
                       cost_model=CostModel.parse(("interpolate", 0.85)), min_sqnr=None,
                       cache=store.describe() if store is not None else "none (rule only)",
                       seconds=time.perf_counter() - started, warnings=warnings_)
    object.__setattr__(root, _REPORT_ATTR, rep)
    return model
