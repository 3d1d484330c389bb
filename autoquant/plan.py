"""Plans: which layer runs which candidate, as JSON. Applying a plan benchmarks nothing.

A plan names, per nn.Linear layer, its scheme (family + params, the kernel included) or an
M-dispatch pair, together with the environment fingerprint it was tuned on. It carries no
weights and no pickles; a calibrated scheme (int8_smooth) also carries its calibration (K floats
per layer, "calibration"), so ``apply_plan`` rebuilds the same layer from the float model alone.

>>> import torch
>>> from autoquant.candidates import get_family
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "environment": None,
...         "layers": {"0": {"kind": "candidate", "family": "float", "params": {"kernel": "aten", "compute_dtype": "float32"}}}}
>>> type(apply_plan(m, plan)[0]).__name__
'QuantizedLinear'
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

from .candidates import Candidate, QuantizedLinear, candidate_from_json
from .hardware import Environment, environment
from .keys import dtype_name, parse_dtype
from .layers import DispatchLinear, copy_hooks, from_linear, replace_module
from .outputs import as_calls, cosine_stats, reference_outputs, run_calls
from .selection import Dispatch, choice_label, is_baseline

__all__ = ["ACCURACY_ATTR", "PLAN_FORMAT", "PLAN_VERSION", "plan_of", "save_plan", "load_plan", "apply_plan", "choice_of", "layer_from_plan", "layer_meta",
           "shape_mismatch"]

log = logging.getLogger("autoquant")

PLAN_FORMAT = "autoquant-plan"
PLAN_VERSION = 1
# A plan-applied or loaded model keeps its plan's accuracy record here, so saving it again keeps it.
ACCURACY_ATTR = "_autoquant_plan_accuracy"


def _cand_json(c: Candidate) -> dict[str, Any]:
    return {"family": c.family, "params": c.params(), "version": c.version}


def _layer_facts(mod: QuantizedLinear) -> dict[str, Any]:
    """What a rebuilt layer needs besides its candidate: the activation dtype it was tuned for and
    the M values it was tuned on (so shapes never seen stay flagged after save / load)."""
    out: dict[str, Any] = {"tuned_m": sorted(mod.tuned_m), **_shape(mod)}
    if mod.act_dtype is not None:
        out["dtype"] = dtype_name(mod.act_dtype)
    return out


def _calibration_json(mod: QuantizedLinear) -> dict[str, Any]:
    """A calibrated candidate's calibration tensors (int8_smooth: ``smooth_inv``, float32 [K]), as
    lists of floats under "calibration": what ``apply_plan`` needs besides the float weights to
    rebuild the very same layer. float32 -> Python float -> JSON -> float32 is exact."""
    keys = mod.candidate.calibration_keys
    if not keys:
        return {}
    packed = mod.packed()
    return {"calibration": {k: packed[k].detach().float().cpu().tolist() for k in keys}}


def _calibration(entry: dict[str, Any], choice: Candidate | Dispatch, where: str,
                 device: torch.device) -> dict[str, Tensor] | None:
    """The calibration tensors a plan entry carries for a calibrated candidate, checked; None for
    others. A calibrated candidate with none raises, naming the layer and what to do."""
    cands = (choice.small, choice.large) if isinstance(choice, Dispatch) else (choice,)
    keys = [k for c in cands for k in c.calibration_keys]
    if not keys:
        return None
    calib = entry.get("calibration")
    if not isinstance(calib, dict) or any(not isinstance(calib.get(k), list) for k in keys):
        raise ValueError(f"plan layer {where!r}: {choice_label(choice)} is calibrated on the activations the layer "
                         f"saw, and the plan carries no 'calibration' {{{', '.join(map(repr, keys))}: [...]}} for it: "
                         "save the plan from the tuned model with this autoquant (save_plan writes it), or tune "
                         "this model with autoquant(model, example_input)")
    try:
        return {k: torch.tensor(calib[k], dtype=torch.float32, device=device) for k in keys}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"plan layer {where!r}: 'calibration' must hold lists of numbers ({exc})") from exc


def _shape(mod: nn.Module) -> dict[str, int]:
    """The layer's in/out features: applying or loading onto another shape is then caught."""
    return {"in_features": int(mod.in_features), "out_features": int(mod.out_features)}


def shape_mismatch(entry: dict[str, Any], linear: nn.Module) -> str | None:
    """Both shapes, where the entry names one the layer does not have; None where they agree or
    the entry (a plan from autoquant 0.2.2 or older) names none."""
    if "in_features" not in entry:
        return None
    planned = (int(entry["out_features"]), int(entry["in_features"]))
    here = (int(linear.out_features), int(linear.in_features))
    if planned == here:
        return None
    return (f"out_features x in_features = {planned[0]} x {planned[1]} in the plan, {here[0]} x {here[1]} "
            "in this model")


def layer_meta(entry: dict[str, Any], linear: nn.Linear) -> tuple[torch.dtype, frozenset[int]]:
    """(activation dtype, tuned M values) of a plan entry; older plans fall back to the float
    layer's dtype and no M values."""
    dtype = parse_dtype(entry["dtype"]) if "dtype" in entry else linear.weight.dtype
    return dtype, frozenset(int(m) for m in entry.get("tuned_m", ()))


def plan_of(model: nn.Module) -> dict[str, Any]:
    """The plan a finalized (or plan-applied) model runs, as a JSON-able dict."""
    root = getattr(model, "_orig_mod", model)
    layers: dict[str, Any] = {}
    device = None
    for name, mod in root.named_modules():
        if isinstance(mod, DispatchLinear):
            d = mod.dispatch
            layers[name] = {"kind": "dispatch", "small": _cand_json(d.small), "large": _cand_json(d.large),
                            "threshold": d.threshold, **_layer_facts(mod)}
        elif isinstance(mod, QuantizedLinear):
            layers[name] = {"kind": "candidate", **_cand_json(mod.candidate), **_layer_facts(mod),
                            **_calibration_json(mod)}
        elif isinstance(mod, nn.Linear):
            layers[name] = {"kind": "float", **_shape(mod)}
        else:
            continue
        if device is None:
            device = next((t.device for t in mod.buffers()), None) or next((p.device for p in mod.parameters()), None)
    rep = getattr(root, "_autoquant_report", None)
    envs = rep.environments if rep is not None and rep.environments else (
        [environment(device)] if device is not None and device.type in ("cpu", "cuda") else [])
    out = {"format": PLAN_FORMAT, "version": PLAN_VERSION,
           "environment": envs[0].to_dict() if envs else None, "layers": layers}
    budget = rep.accuracy.to_dict() if rep is not None and getattr(rep, "accuracy", None) is not None else \
        getattr(root, ACCURACY_ATTR, None)
    if budget is not None:
        out["accuracy"] = budget  # the min_cosine budget and the cosines verified when it was tuned
    return out


def save_plan(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the model's plan as JSON to `path`; returns it."""
    plan = plan_of(model)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(plan, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return plan


def load_plan(source: str | os.PathLike[str] | dict) -> dict[str, Any]:
    """Read and validate a plan (a path or an already parsed dict)."""
    if isinstance(source, dict):
        plan = source
    else:
        try:
            with open(source, encoding="utf-8") as fh:
                plan = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan file {source} is not valid JSON ({exc}); re-save it with autoquant.save_plan") from exc
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{source if not isinstance(source, dict) else 'plan'} is not an autoquant plan "
                         f"(expected format {PLAN_FORMAT!r})")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"plan version {plan.get('version')!r} is not supported (this autoquant reads "
                         f"version {PLAN_VERSION}); re-create it with this version's autoquant.save_plan")
    if not isinstance(plan.get("layers"), dict):
        raise ValueError("plan has no 'layers' mapping")
    acc = plan.get("accuracy")
    if acc is not None and not (isinstance(acc, dict) and isinstance(acc.get("min_cosine"), (int, float))):
        raise ValueError("plan 'accuracy' must be a mapping with a numeric 'min_cosine' (written by save_plan)")
    for name, entry in plan["layers"].items():
        if not isinstance(entry, dict) or entry.get("kind") not in ("float", "candidate", "dispatch"):
            raise ValueError(f"plan layer {name!r}: 'kind' must be float, candidate or dispatch")
    return plan


def _candidate(entry: dict[str, Any], where: str) -> Candidate:
    try:
        cand = candidate_from_json(entry["family"], entry["params"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"plan layer {where}: bad candidate {entry!r}: {exc}") from exc
    if entry.get("version", cand.version) != cand.version:
        log.warning("plan layer %s: %s was planned at version %s, this autoquant has version %s",
                    where, cand.family, entry.get("version"), cand.version)
    return cand


def choice_of(entry: dict[str, Any], where: str) -> Candidate | Dispatch | None:
    """What a plan entry asks a layer to run; None keeps the float nn.Linear."""
    if entry["kind"] == "float":
        return None
    if entry["kind"] == "candidate":
        cand = _candidate(entry, where)
        return None if is_baseline(cand) else cand
    return Dispatch(_candidate(entry["small"], where), _candidate(entry["large"], where), int(entry["threshold"]))


def layer_from_plan(entry: dict[str, Any], linear: nn.Linear, where: str) -> nn.Module | None:
    """The module `entry` asks for, built from `linear`'s weights; None keeps the float layer."""
    choice = choice_of(entry, where)
    if choice is None:
        return None
    _, tuned_m = layer_meta(entry, linear)
    calibration = _calibration(entry, choice, where, linear.weight.device)
    return from_linear(choice, linear, tuned_m, where, calibration=calibration)


def _env_mismatch(plan: dict[str, Any], device: torch.device) -> str | None:
    if plan.get("environment") is None or device.type not in ("cpu", "cuda"):
        return None
    planned = Environment.from_dict(plan["environment"])
    here = environment(device)
    if planned.hash == here.hash:
        return None
    diff = [k for k, v in planned.to_dict().items() if here.to_dict()[k] != v]
    return f"plan was tuned on {planned.short()}, this is {here.short()} (differs in: {', '.join(diff)})"


def apply_plan(model: nn.Module, plan: str | os.PathLike[str] | dict, *, strict: bool = False,
               verify: bool = False, inputs: Any = None, min_cosine: float | None = None) -> nn.Module:
    """Turn each float nn.Linear named in `plan` into its planned layer; benchmarks nothing.
    Warns when the plan's environment fingerprint differs from this device's. A layer whose
    shape differs from the one the plan was made for keeps float, with a warning naming both
    shapes; ``strict=True`` raises instead (a plan applied to the wrong model).

    The accuracy a plan records (its ``min_cosine`` budget and the cosines verified when it was
    tuned) is not checked again unless asked: ``verify=True`` with `inputs` (as for autoquant's
    example_input, or a list of them) runs the float model on them first, applies the plan, and
    compares the outputs (the plan's budget outputs only) against `min_cosine` (default: the plan's
    budget). A miss raises ValueError and leaves every layer float; meanwhile the float layers are
    held next to the quantized ones."""
    plan = load_plan(plan)
    root = getattr(model, "_orig_mod", model)
    if verify:
        return _apply_verified(model, root, plan, strict, inputs, min_cosine)
    if inputs is not None or min_cosine is not None:
        raise ValueError("apply_plan: inputs and min_cosine are for verify=True; pass verify=True to check the plan")
    _apply(root, plan, strict)
    if plan.get("accuracy") is not None:
        object.__setattr__(root, ACCURACY_ATTR, plan["accuracy"])
    return model


def _apply_verified(model: nn.Module, root: nn.Module, plan: dict[str, Any], strict: bool, inputs: Any,
                    min_cosine: float | None) -> nn.Module:
    from .config import check_min_cosine  # noqa: PLC0415

    record = plan.get("accuracy") or {}
    if inputs is None:
        raise ValueError("apply_plan(verify=True) needs inputs=...: the inputs to compare the float and the "
                         "quantized model on")
    if min_cosine is None and "min_cosine" not in record:
        raise ValueError("apply_plan(verify=True): this plan records no min_cosine budget; pass min_cosine=...")
    budget = check_min_cosine(min_cosine if min_cosine is not None else record["min_cosine"])
    calls = as_calls(inputs)
    refs = reference_outputs(root, calls, record.get("outputs"))  # before any layer is swapped
    replaced = _apply(root, plan, strict, keep=True)
    try:
        stats = cosine_stats(refs, run_calls(root, calls))
    except BaseException:
        _undo(root, replaced)
        raise
    if not stats.meets(budget):
        _undo(root, replaced)
        raise ValueError(f"apply_plan(verify=True): on these inputs the planned model reaches cosine mean "
                         f"{stats.mean:.6f} (min {stats.min:.6f}, worst output {stats.worst!r}), below min_cosine "
                         f"{budget}: every layer was left float")
    log.info("apply_plan: verified cosine mean %.6f / min %.6f over %d samples (min_cosine %s)",
             stats.mean, stats.min, stats.samples, budget)
    object.__setattr__(root, ACCURACY_ATTR, {**record, "min_cosine": budget})
    return model


def _undo(root: nn.Module, replaced: dict[str, nn.Module]) -> None:
    for name, linear in replaced.items():
        replace_module(root, name, linear)


def _apply(root: nn.Module, plan: dict[str, Any], strict: bool, keep: bool = False) -> dict[str, nn.Module]:
    """Swap the planned layers in. `keep`: return the float layers replaced, by name (else each is
    dropped as it is replaced, so applying never holds the float and the quantized model whole)."""
    replaced: dict[str, nn.Module] = {}
    warned = False
    for name, entry in plan["layers"].items():
        try:
            linear = root.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"plan names layer {name!r}, which this model does not have") from exc
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"plan layer {name!r} is a {type(linear).__name__} here, not a float nn.Linear "
                             "(apply a plan to the float model, before any autoquant)")
        mismatch = shape_mismatch(entry, linear)
        if mismatch:
            msg = f"apply_plan: layer {name!r} has {mismatch}"
            if strict:
                raise ValueError(f"{msg}: this plan was made for another model (strict=True)")
            log.warning("%s: kept float (pass strict=True to make this an error)", msg)
            continue
        if not warned:
            problem = _env_mismatch(plan, linear.weight.device)
            if problem:
                log.warning("apply_plan: %s; the choices may not be the fastest here", problem)
            warned = True
        new = layer_from_plan(entry, linear, name)
        if new is not None:
            copy_hooks(linear, new)
            replace_module(root, name, new)
            if keep:
                replaced[name] = linear
        del linear, new
    return replaced
