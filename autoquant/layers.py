"""Build the module that replaces one nn.Linear: its winner, a dispatch pair, or the float layer back.

Contract: :func:`make_layer` is the one constructor of a finalized layer, behind ``finalize``,
``apply_plan`` and ``load``; :func:`from_linear` / :func:`build_layer` build it from a float (or
recording) nn.Linear, :func:`restore_float` undoes the recording subclass, :func:`replace_module`
and :func:`copy_hooks` install a built layer in a model. A layer whose winner is the float
baseline, or that was never called, goes back to a plain nn.Linear with a plain Parameter (zero
overhead); others become a :class:`~autoquant.candidates.QuantizedLinear` (one kernel over plain
tensor buffers) or a :class:`DispatchLinear` (two kernels, one packed weight, switched on M).

One reason to exist on its own: the accuracy budget (trial builds), plans, saves and the
transformers integration build layers exactly as finalize does, without depending on finalize's
orchestration (tuning, selection, the report).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .candidates import Candidate, QuantizedLinear
from .candidates.quantized_linear import DispatchLinear
from .selection import Dispatch, LayerPlan, is_baseline
from .subclass import AutoQuantizableLinearWeight

__all__ = ["DispatchLinear", "build_layer", "copy_hooks", "from_linear", "label", "make_layer", "plain_weight",
           "restore_float", "replace_module", "select_layers"]


def select_layers(root: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The nn.Linear layers of `root` to quantize (name -> layer), and why each other one is left
    alone (name -> reason: filtered out, already recording, a shared weight, meta / other device,
    not floating point, NaN / Inf). One rule for ``autoquant`` and ``quantize``."""
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


def plain_weight(linear: nn.Linear) -> Tensor:
    """The float weight of `linear` as a plain tensor, whether or not it is recording."""
    w = linear.weight
    if isinstance(w, AutoQuantizableLinearWeight):
        return w.unwrap()
    return w.detach()


def restore_float(linear: nn.Linear) -> None:
    """Give `linear` back its plain float weight Parameter (undoing the recording subclass)."""
    w = linear.weight
    if isinstance(w, AutoQuantizableLinearWeight):
        linear.weight = nn.Parameter(w.unwrap(), requires_grad=w.requires_grad)


def make_layer(choice: Candidate | Dispatch, in_features: int, out_features: int, *, bias: Tensor | None,
               act_dtype: torch.dtype, tuned_m: frozenset[int], name: str, weight: Tensor | None = None,
               packed: dict[str, Tensor] | None = None, act_absmax: Tensor | None = None,
               calibration: dict[str, Tensor] | None = None) -> QuantizedLinear:
    """The finalized layer running `choice` (a candidate, or an M-dispatch pair): the one
    constructor behind finalize, ``apply_plan`` and ``load``, so the three cannot drift apart.
    `packed`: the quantized tensors (``load``), else `weight` [N, K] is quantized here; a
    calibrated candidate (int8_smooth) then needs `calibration` (from a plan) or `act_absmax`
    (recorded), else CalibrationMissing names the layer."""
    if packed is None:
        if weight is None:
            raise ValueError(f"layer {name!r}: make_layer needs the float weight or the packed tensors")
        quantizer = choice.small if isinstance(choice, Dispatch) else choice
        with torch.no_grad():
            packed = quantizer.pack(weight.detach(), act_absmax=act_absmax, calibration=calibration, where=name)
    cls = DispatchLinear if isinstance(choice, Dispatch) else QuantizedLinear
    return cls(choice, packed, bias, in_features, out_features, act_dtype=act_dtype,  # type: ignore[arg-type]
               tuned_m=tuned_m, name=name)


def build_layer(plan: LayerPlan, linear: nn.Linear, act_absmax: Tensor | None = None) -> nn.Module | None:
    """The module that replaces `linear` under `plan`, or None to keep the float nn.Linear.
    `act_absmax`: the layer's recorded activation statistics (see :func:`from_linear`)."""
    choice: Candidate | Dispatch | None = plan.dispatch or plan.winner
    if choice is None or (isinstance(choice, Candidate) and is_baseline(choice)):
        return None
    return from_linear(choice, linear, frozenset(op.m for op in plan.ops), plan.name, act_absmax=act_absmax)


def from_linear(choice: Candidate | Dispatch, linear: nn.Linear, tuned_m: frozenset[int], name: str, *,
                act_absmax: Tensor | None = None, calibration: dict[str, Tensor] | None = None) -> QuantizedLinear:
    """`choice` built from the float layer `linear` (its weight quantized, its bias copied). A
    calibrated candidate reads `calibration` (a plan's), else `act_absmax`, else the statistics the
    recording weight of `linear` holds (autoquant before finalize); uncalibrated ones none."""
    if act_absmax is None and isinstance(linear.weight, AutoQuantizableLinearWeight):
        act_absmax = linear.weight.record.act_absmax()
    weight = plain_weight(linear)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return make_layer(choice, linear.in_features, linear.out_features, bias=bias, act_dtype=weight.dtype,
                      tuned_m=tuned_m, name=name, weight=weight, act_absmax=act_absmax, calibration=calibration)


def label(layer: QuantizedLinear, name: str, tuned_m: frozenset[int] | None) -> QuantizedLinear:
    """Give a built layer its name (for messages) and the M values it was tuned on."""
    layer.layer_name = name
    layer.tuned_m = frozenset(tuned_m or ())
    return layer


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path `name` of `root` to `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def copy_hooks(old: nn.Module, new: nn.Module) -> None:
    """Carry forward hooks users registered on the old layer (e.g. accelerate's offload hooks)."""
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        src: Any = getattr(old, attr, None)
        dst: Any = getattr(new, attr, None)
        if src and dst is not None:
            dst.update(src)
