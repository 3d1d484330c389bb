"""Hugging Face transformers: ``from_pretrained`` / ``save_pretrained`` and generate-aware tuning.

Importing this module registers ``quant_method="autoquant"`` with transformers' public quantizer
registry (``register_quantization_config`` / ``register_quantizer``); that is its one side effect.
This module is the quantizer (load, save) and the public face; the config is
:mod:`autoquant.hf_config`, the generate-aware tuning :mod:`autoquant.hf_generate`.

- ``from_pretrained(path, quantization_config=AutoQuantConfig())``: the float model, armed to tune
  on its first ``generate()`` (the whole call is recorded, prefill and decode shapes, and the model
  is finalized when it returns) or, if a plain forward comes first, on that forward.
- ``AutoQuantConfig(profile="chat", cache=URL, on_miss="error")``: finalized right after loading,
  from the shape profile and the cache, with zero benchmarks (a missing measurement raises).
- ``save_pretrained`` on a finalized model writes the packed tensors into ``model.safetensors``
  and the plan into ``config.json``'s ``quantization_config``; ``from_pretrained`` on that folder
  (after ``import autoquant.hf``) rebuilds the same layers, benchmarks nothing and computes the
  same outputs bit for bit. Each quantized layer also stores an empty ``<layer>.weight``: plain
  transformers (autoquant not imported) then stops with a size-mismatch error instead of loading
  random weights into those layers, after warning that it does not know ``autoquant``.
- Tied weights (an ``lm_head`` sharing the input embedding) stay float; the report says so.
- ``tune(model)`` / ``tune(model, input_ids)``: the same generate-aware tuning for a model loaded
  without a quantization_config; ``record_generate`` records a profile of a whole generate().
- For ``autoquant()`` itself: ``arm(model)`` (finalize a recording model after its first
  generate or forward), ``generate_example(model, token_ids)`` (a short greedy generate as the
  example run) and ``attach(model)`` (make ``save_pretrained`` of a finalized model write it).

>>> import autoquant.hf as aqhf
>>> aqhf.AutoQuantConfig(candidates=["int8_dynamic"], min_sqnr=30).to_dict()["quant_method"]
'autoquant'
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

try:
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"autoquant.hf needs transformers with a quantizer registry (tested: 5.24): {exc}. "
        "Install it with: pip install 'autoquant-tuner[hf]'"
    ) from exc

from .api import is_recording
from .candidates import QuantizedLinear
from .hardware import AUTOQUANT_VERSION
from .hf_config import HF_FORMAT, QUANT_METHOD, AutoQuantConfig
from .hf_generate import ARMED_ATTR as _ARMED_ATTR
from .hf_generate import arm, finalize_from_profile, generate_example, record_generate, tune
from .layers import copy_hooks, make_layer, replace_module
from .plan import ACCURACY_ATTR, choice_of, layer_meta, load_plan, plan_of, shape_mismatch

__all__ = ["AutoQuantConfig", "AutoQuantHfQuantizer", "HF_FORMAT", "QUANT_METHOD", "arm", "attach",
           "finalize_from_profile", "generate_example", "record_generate", "tune"]

log = logging.getLogger("autoquant")

_SENTINEL = "weight"


def _plan_digest(plan: Mapping[str, Any]) -> str:
    """Ties a plan to the weights file it was saved with (canonical JSON, SHA-256)."""
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ---- the transformers quantizer ------------------------------------------------------------------

def attach(model: nn.Module, config: AutoQuantConfig | None = None) -> None:
    """Make ``save_pretrained`` of a finalized transformers model write the quantized model
    (transformers asks ``model.hf_quantizer``); for models finalized by ``autoquant.finalize``
    outside this module. `config`: the options config.json records (default: the defaults).
    A model that is not a transformers model (no ``config``) is left alone."""
    config = config or AutoQuantConfig()
    if not hasattr(model, "config"):
        return
    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, AutoQuantHfQuantizer):
        log.warning("autoquant: model was loaded with %s; save_pretrained stays theirs", type(current).__name__)
        return
    if current is None:
        object.__setattr__(model, "hf_quantizer", AutoQuantHfQuantizer(config, pre_quantized=False))
    model.config.quantization_config = model.hf_quantizer.quantization_config
    model.quantization_method = QUANT_METHOD


class _PackedSlot(nn.Module):
    """Stands in for a planned layer while transformers loads the checkpoint: empty (meta)
    buffers named and shaped as the saved packed tensors, filled by transformers' loader."""

    def __init__(self, in_features: int, out_features: int, tensors: Mapping[str, Tensor],
                 packed_names: Sequence[str]) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed_names = tuple(packed_names)
        for key, t in tensors.items():
            self.register_buffer(key, t)


def _headers(files: Iterable[str]) -> tuple[dict[str, tuple[str, list[int], str]], dict[str, str]]:
    """key -> (file, shape, safetensors dtype) from the checkpoint headers, and the metadata of
    the file that carries autoquant's; reads no tensor data."""
    from safetensors import safe_open  # noqa: PLC0415

    keys: dict[str, tuple[str, list[int], str]] = {}
    meta: dict[str, str] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            m = fh.metadata() or {}
            if "autoquant_format" in m:
                meta = {**m, "_file": f}
            for key in fh.keys():
                sl = fh.get_slice(key)
                keys[key] = (f, list(sl.get_shape()), sl.get_dtype())
    return keys, meta


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


_ALIGN = 64  # bytes: what torch's CPU allocator gives, and what vectorized kernels may assume


def _aligned(t: Tensor) -> Tensor:
    """`t`, or a fresh (allocator-aligned) copy of it where its data is not `_ALIGN`-aligned."""
    return t.clone() if t.numel() and t.data_ptr() % _ALIGN else t


class AutoQuantHfQuantizer(HfQuantizer):
    """transformers' side of autoquant: see the module docstring for the contract."""

    requires_calibration = False

    def __init__(self, quantization_config: AutoQuantConfig, pre_quantized: bool = True) -> None:
        super().__init__(quantization_config, pre_quantized=pre_quantized)
        self.folder: Path | None = None

    # ---- environment ----
    def validate_environment(self, device_map: Any = None, weights_only: Any = None, **_: Any) -> None:
        if isinstance(device_map, Mapping) and any(str(d) == "disk" for d in device_map.values()):
            raise ValueError("autoquant does not support disk offload (device_map with 'disk'): load on cpu or cuda")

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    # ---- load ----
    def _config_file(self) -> str:
        return str(self.folder / "config.json") if self.folder is not None else "config.json"

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Sequence[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return model
        files = [str(f) for f in checkpoint_files or ()]
        if not files or not all(f.endswith(".safetensors") for f in files):
            raise ValueError(f"an autoquant folder loads from safetensors files only, got {files or 'none'}")
        self.folder = Path(files[0]).parent
        cfg: AutoQuantConfig = self.quantization_config
        where = self._config_file()
        if cfg.format != HF_FORMAT or cfg.unknown_keys:
            raise ValueError(
                f"{where}: quantization_config was written by autoquant {cfg.autoquant_version or '(unknown)'} in "
                f"format {cfg.format!r}{' with keys ' + str(cfg.unknown_keys) if cfg.unknown_keys else ''}; this "
                f"autoquant ({AUTOQUANT_VERSION}) reads {HF_FORMAT!r}: install the autoquant that saved it, or "
                "re-tune the float model and save_pretrained again")
        try:
            plan = load_plan(cfg.plan if isinstance(cfg.plan, dict) else {})
        except ValueError as exc:
            raise ValueError(f"{where}: quantization_config.plan is unusable: {exc}") from exc
        keys, meta = _headers(files)
        weights = meta.get("_file", files[0])
        if meta.get("autoquant_format") != HF_FORMAT:
            raise ValueError(f"{weights}: carries no autoquant metadata ({HF_FORMAT}): the weights were not written "
                             "by autoquant's save_pretrained, or were rewritten since; save the model again")
        if meta.get("autoquant_plan_sha256") != _plan_digest(plan):
            raise ValueError(f"{where}: quantization_config.plan is not the plan {weights} was saved with "
                             "(digest differs): a plan for other weights; save the quantized model again")
        packed = cfg.packed_tensors or {}
        for name, entry in plan["layers"].items():
            if entry["kind"] == "float":
                continue
            self._slot(model, name, entry, packed.get(name), keys, weights, where)
        return model

    def _slot(self, model: nn.Module, name: str, entry: dict, packed: list[str] | None,
              keys: Mapping[str, tuple[str, list[int], str]], weights: str, where: str) -> None:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: the plan names layer {name!r}, which {type(model).__name__} does not have: "
                             "a plan made for another model") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{where}: plan layer {name!r} is a {type(linear).__name__} here, not an nn.Linear")
        problem = shape_mismatch(entry, linear)
        if problem:
            raise ValueError(f"{where}: layer {name!r} has {problem}: a plan made for another model")
        if not packed:
            raise ValueError(f"{where}: quantization_config.packed_tensors lists no tensors for layer {name!r}")
        names = [*packed, *(["bias"] if linear.bias is not None else [])]
        sentinel = _SENTINEL not in packed
        tensors: dict[str, Tensor] = {}
        for key in names + ([_SENTINEL] if sentinel else []):
            found = keys.get(f"{name}.{key}")
            if found is None:
                raise ValueError(f"{weights}: tensor {name}.{key} is missing (layer {name!r} runs "
                                 f"{entry.get('family', entry['kind'])}): the file is incomplete; save the model again")
            _, shape, st_dtype = found
            if st_dtype not in _ST_DTYPES:
                raise ValueError(f"{weights}: tensor {name}.{key} has dtype {st_dtype}, which autoquant does not load")
            tensors[key] = torch.empty(shape, dtype=_ST_DTYPES[st_dtype], device="meta")
        slot = _PackedSlot(linear.in_features, linear.out_features, tensors, packed)
        copy_hooks(linear, slot)
        replace_module(model, name, slot)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg: AutoQuantConfig = self.quantization_config
        if self.pre_quantized:
            self._build(model, load_plan(cfg.plan))
        elif cfg.profile is not None:
            finalize_from_profile(model, cfg)
        else:
            cfg.start(model)
            arm(model, cfg)
        return model

    def _build(self, model: nn.Module, plan: dict[str, Any]) -> None:
        where = str(self.folder) if self.folder is not None else "the checkpoint"
        for name, slot in [(n, m) for n, m in model.named_modules() if isinstance(m, _PackedSlot)]:
            entry = plan["layers"][name]
            left = [k for k, t in slot.named_buffers() if t.device.type == "meta"]
            if left:
                raise ValueError(f"{where}: tensors {[f'{name}.{k}' for k in left]} were not loaded")
            if "dtype" not in entry:
                raise ValueError(f"{self._config_file()}: plan layer {name!r} names no activation dtype")
            # transformers may hand back zero-copy views of the safetensors file, aligned to 8 bytes
            # only; CPU kernels such as _weight_int8pack_mm read the packed weight with aligned
            # vector loads (measured: a segfault on a bf16 int8 weight 56 bytes off). Copy those.
            buffers = {k: _aligned(t) for k, t in slot.named_buffers()}
            act_dtype, tuned_m = layer_meta(entry, slot)  # type: ignore[arg-type]
            try:
                new = make_layer(choice_of(entry, name), slot.in_features, slot.out_features,  # type: ignore[arg-type]
                                 bias=buffers.get("bias"), act_dtype=act_dtype, tuned_m=tuned_m, name=name,
                                 packed={k: buffers[k] for k in slot.packed_names})
            except Exception as exc:
                raise ValueError(f"{where}: layer {name!r} cannot be rebuilt from its saved tensors "
                                 f"({type(exc).__name__}: {exc}): save the model again") from exc
            copy_hooks(slot, new)
            replace_module(model, name, new)
        if plan.get("accuracy") is not None:  # the min_cosine record travels on, as autoquant.load keeps it
            object.__setattr__(model, ACCURACY_ATTR, plan["accuracy"])

    # ---- save ----
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The quantized state dict (packed tensors), an empty ``<layer>.weight`` per quantized
        layer (so plain transformers refuses the folder), and the plan in this config."""
        if getattr(model, _ARMED_ATTR, None) is not None or is_recording(model):
            raise RuntimeError("save_pretrained: this model has not been tuned yet (autoquant waits for its first "
                               "generate() or forward, or for autoquant.finalize(model)); run it, then save")
        plan = plan_of(model)
        state = dict(model.state_dict())
        packed: dict[str, list[str]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, QuantizedLinear):
                packed[name] = sorted(mod.packed())
                if _SENTINEL not in packed[name]:
                    state[f"{name}.{_SENTINEL}"] = torch.zeros(0, dtype=torch.uint8)
        cfg: AutoQuantConfig = self.quantization_config
        cfg.format, cfg.autoquant_version, cfg.plan, cfg.packed_tensors = HF_FORMAT, AUTOQUANT_VERSION, plan, packed
        cfg.unknown_keys = []
        model.config.quantization_config = cfg
        meta = {"autoquant_format": HF_FORMAT, "autoquant_version": AUTOQUANT_VERSION,
                "autoquant_plan_sha256": _plan_digest(plan)}
        return state, meta


def _register() -> None:
    """Register with transformers once; a re-import (importlib.reload) replaces the old classes."""
    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = AutoQuantConfig
    else:
        register_quantization_config(QUANT_METHOD)(AutoQuantConfig)
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = AutoQuantHfQuantizer
    else:
        register_quantizer(QUANT_METHOD)(AutoQuantHfQuantizer)


_register()
