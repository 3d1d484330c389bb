"""Save and load a finalized model as safetensors + the plan JSON: no pickle, no benchmark.

``save(model, dir)`` writes ``dir/model.safetensors`` (every parameter and buffer, quantized
layers' packed tensors included; shared tensors stored once) and ``dir/plan.json``.
``load(model, dir)`` takes the float architecture (on any device, or a ``torch.device("meta")``
skeleton that holds no memory), rebuilds every planned layer from the saved packed tensors, and
loads the rest: the loaded model computes exactly what the saved one did.

>>> import tempfile, torch
>>> from autoquant.plan import apply_plan
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> plan = {"format": "autoquant-plan", "version": 1, "environment": None,
...         "layers": {"0": {"kind": "candidate", "family": "float", "params": {"kernel": "aten", "compute_dtype": "float32"}}}}
>>> _ = apply_plan(m, plan)
>>> d = tempfile.mkdtemp(); _ = save(m, d)
>>> with torch.device("meta"):
...     skeleton = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> x = torch.randn(2, 8)
>>> torch.equal(load(skeleton, d)(x), m(x))
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .candidates import QuantizedLinear
from .finalize import copy_hooks, make_layer, replace_module
from .plan import ACCURACY_ATTR, choice_of, layer_meta, load_plan, plan_of, shape_mismatch

__all__ = ["save", "load", "WEIGHTS_FILE", "PLAN_FILE"]

WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
_FORMAT = "autoquant-save-v1"


def _root(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _all_tensors(root: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """Parameters and buffers by qualified name, non-persistent buffers too (a meta skeleton has
    no values for them); returns (tensors, names of the non-persistent ones)."""
    tensors = dict(root.state_dict(keep_vars=False))
    nonpersistent = []
    for mod_name, mod in root.named_modules():
        for buf_name in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = getattr(mod, buf_name, None)
            if isinstance(buf, Tensor):
                name = f"{mod_name}.{buf_name}" if mod_name else buf_name
                tensors[name] = buf
                nonpersistent.append(name)
    return tensors, nonpersistent


def save(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write `model` (finalized by autoquant, or with a plan applied) to `directory`."""
    from safetensors.torch import save_file  # noqa: PLC0415 - only when saving

    root = _root(model)
    if hasattr(root, "_autoquant_session"):
        raise RuntimeError("this model is still recording shapes: call autoquant.finalize(model) before save")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, nonpersistent = _all_tensors(root)
    canonical: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    flat: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device (load real weights first)")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in canonical:
            aliases[name] = canonical[ident]  # tied weights: stored once, restored as one tensor
            continue
        canonical[ident] = name
        flat[name] = t.detach().contiguous().cpu()
    meta = {"format": _FORMAT, "aliases": json.dumps(aliases, sort_keys=True),
            "nonpersistent": json.dumps(sorted(nonpersistent))}
    save_file(flat, str(out / WEIGHTS_FILE), metadata=meta)
    with open(out / PLAN_FILE, "w", encoding="utf-8") as fh:
        json.dump(plan_of(root), fh, indent=1, sort_keys=True)
        fh.write("\n")
    return out


def _read(directory: Path, device: torch.device | str) -> tuple[dict[str, Tensor], list[str], dict[str, Any]]:
    from safetensors import safe_open  # noqa: PLC0415

    wpath, ppath = directory / WEIGHTS_FILE, directory / PLAN_FILE
    for p in (wpath, ppath):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: {directory} is not a directory written by autoquant.save")
    tensors: dict[str, Tensor] = {}
    with safe_open(str(wpath), framework="pt", device=str(device)) as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{wpath} was not written by autoquant.save (format {meta.get('format')!r})")
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[target]
    return tensors, json.loads(meta.get("nonpersistent", "[]")), load_plan(ppath)


def _layer(entry: dict[str, Any], name: str, linear: nn.Linear, tensors: dict[str, Tensor]) -> nn.Module | None:
    choice = choice_of(entry, name)
    if choice is None:
        return None
    prefix = name + "."
    packed = {k[len(prefix):]: v for k, v in tensors.items()
              if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] != "bias"}
    dtype, tuned_m = layer_meta(entry, linear)
    return make_layer(choice, linear.in_features, linear.out_features, bias=tensors.get(prefix + "bias"),
                      act_dtype=dtype, tuned_m=tuned_m, name=name, packed=packed)


# Packed tensors whose shape gives the saved layer's [out_features, in_features] (int4: two codes a byte).
_WEIGHT_KEYS = {"weight": 1, "w_int8": 1, "w_fp8": 1, "w_int4": 2}


def _saved_shape_mismatch(entry: dict[str, Any], name: str, linear: nn.Linear,
                          tensors: dict[str, Tensor]) -> str | None:
    """For saves that name no shape (autoquant 0.2.2): read it off the packed weight."""
    if entry["kind"] == "float" or "in_features" in entry:
        return None
    for key, per_byte in _WEIGHT_KEYS.items():
        t = tensors.get(f"{name}.{key}")
        if t is not None and t.dim() == 2:
            saved = (t.shape[0], t.shape[1] * per_byte)
            here = (linear.out_features, linear.in_features)
            if saved != here:
                return (f"out_features x in_features = {saved[0]} x {saved[1]} in the save, {here[0]} x "
                        f"{here[1]} in this model")
            return None
    return None


def _check_shapes(root: nn.Module, tensors: dict[str, Tensor], directory: Any) -> None:
    """torch's own size-mismatch error lists raw keys; this names the tensor and both shapes."""
    here = root.state_dict(keep_vars=True)
    for key, t in tensors.items():
        mine = here.get(key)
        if mine is not None and tuple(mine.shape) != tuple(t.shape):
            raise ValueError(f"{directory}: {key} was saved with shape {list(t.shape)}, this model's is "
                             f"{list(mine.shape)}: load into the architecture that was saved")


def load(model: nn.Module, directory: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the saved quantized model into `model` (the float architecture, possibly a meta
    skeleton), in place, with no benchmark and no pickle; tensors land on `device`."""
    root = _root(model)
    tensors, nonpersistent, plan = _read(Path(directory), device)
    for name, entry in plan["layers"].items():
        try:
            linear = root.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"saved plan names layer {name!r}, which this model does not have: "
                             "load into the same architecture that was saved") from exc
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"layer {name!r} is a {type(linear).__name__} here; load() needs the float architecture")
        problem = shape_mismatch(entry, linear) or _saved_shape_mismatch(entry, name, linear, tensors)
        if problem:
            raise ValueError(f"{directory}: layer {name!r} has {problem}: load into the architecture "
                             "that was saved (same layer sizes)")
        new = _layer(entry, name, linear, tensors)
        if new is not None:
            copy_hooks(linear, new)
            replace_module(root, name, new)
    persistent = {k: v for k, v in tensors.items() if k not in set(nonpersistent)}
    _check_shapes(root, persistent, directory)
    missing, unexpected = root.load_state_dict(persistent, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{directory} does not match this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name in nonpersistent:
        mod_name, _, buf = name.rpartition(".")
        owner = root.get_submodule(mod_name) if mod_name else root
        owner.register_buffer(buf, tensors[name], persistent=False)
    for mod in root.modules():
        if isinstance(mod, QuantizedLinear):
            mod.refresh_runtime()
    if plan.get("accuracy") is not None:
        object.__setattr__(root, ACCURACY_ATTR, plan["accuracy"])  # saved again, it stays recorded
    return model
