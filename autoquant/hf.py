"""Hugging Face transformers: ``from_pretrained`` / ``save_pretrained`` and generate-aware tuning.

Importing this module registers ``quant_method="autoquant"`` with transformers' public quantizer
registry (``register_quantization_config`` / ``register_quantizer``); that is its one side effect.

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

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"autoquant.hf needs transformers with a quantizer registry (tested: 5.24): {exc}. "
        "Install it with: pip install 'autoquant-tuner[hf]'"
    ) from exc

from .api import DEFAULT_CACHE, autoquant, finalize
from .bench import BenchConfig, Timer
from .candidates import QuantizedLinear
from .finalize import copy_hooks, make_layer, replace_module, restore_float
from .hardware import AUTOQUANT_VERSION
from .plan import ACCURACY_ATTR, choice_of, layer_meta, load_plan, plan_of, shape_mismatch
from .profile import ShapeProfile, load_profile, model_fingerprint
from .subclass import AutoQuantizableLinearWeight, LayerRecord
from .tune import ON_MISS

__all__ = ["AutoQuantConfig", "AutoQuantHfQuantizer", "HF_FORMAT", "QUANT_METHOD", "arm", "attach",
           "finalize_from_profile", "generate_example", "record_generate", "tune"]

log = logging.getLogger("autoquant")

QUANT_METHOD = "autoquant"
# What a saved folder's quantization_config and safetensors metadata say they are. A new layout
# gets a new name: an older autoquant then refuses the folder by name instead of misreading it.
HF_FORMAT = "autoquant-hf-v1"
_ARMED_ATTR = "_autoquant_hf_armed"
_SENTINEL = "weight"
_CALIBRATION_TOKENS = 16


def _plan_digest(plan: Mapping[str, Any]) -> str:
    """Ties a plan to the weights file it was saved with (canonical JSON, SHA-256)."""
    text = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class AutoQuantConfig(QuantizationConfigMixin):
    """autoquant's ``quantization_config`` for ``from_pretrained``.

    Tuning options mirror :func:`autoquant.autoquant`: `candidates` (family names), `mode`
    ('relu' or ['interpolate', c]), `min_sqnr` (dB), `min_cosine` and `budget_outputs` (the
    model-level budget; e.g. ``budget_outputs=["logits"]``), `on_miss` ('bench' | 'error' | 'baseline'),
    `op_budget_s`, `modules_to_not_convert` (module names kept float, with their children).
    `profile`: a shape-profile name stored in `cache`, a profile JSON path or a
    :class:`~autoquant.ShapeProfile`; given, the model is finalized right after loading.

    Runtime-only (never written to config.json, a cache URL may hold a password): `cache`
    ("default": $AUTOQUANT_CACHE_URL or the user cache file; None: memory only; a URL, path or
    Store), `timer`, `bench`, `progress`. `format`, `autoquant_version`, `plan` and
    `packed_tensors` are filled in by ``save_pretrained``; do not set them.
    """

    _JSON_KEYS = ("quant_method", "candidates", "mode", "min_sqnr", "min_cosine", "budget_outputs", "profile",
                  "on_miss", "op_budget_s",
                  "modules_to_not_convert", "format", "autoquant_version", "plan", "packed_tensors")

    def __init__(
        self,
        candidates: Sequence[str] | None = None,
        mode: Any = ("interpolate", 0.85),
        min_sqnr: float | None = None,
        min_cosine: float | None = None,
        budget_outputs: Sequence[str] | None = None,
        profile: str | ShapeProfile | None = None,
        cache: Any = "default",
        on_miss: str = "bench",
        op_budget_s: float | None = 5.0,
        modules_to_not_convert: Sequence[str] | None = None,
        progress: bool = True,
        timer: Timer | None = None,
        bench: BenchConfig | None = None,
        quant_method: str = QUANT_METHOD,
        format: str | None = None,  # noqa: A002 - the saved key's name
        autoquant_version: str | None = None,
        plan: dict[str, Any] | None = None,
        packed_tensors: dict[str, list[str]] | None = None,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"AutoQuantConfig has quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        if on_miss not in ON_MISS:
            raise ValueError(f"on_miss={on_miss!r}: use one of {ON_MISS}")
        if candidates is not None and not all(isinstance(c, str) for c in candidates):
            raise TypeError("AutoQuantConfig(candidates=...) takes family names such as 'int8_dynamic' "
                            "(they are written to config.json); pass Candidate objects to autoquant() instead")
        self.quant_method = QUANT_METHOD
        self.candidates = list(candidates) if candidates is not None else None
        self.mode = list(mode) if isinstance(mode, (tuple, list)) else mode
        self.min_sqnr = min_sqnr
        self.min_cosine = min_cosine
        self.budget_outputs = list(budget_outputs) if budget_outputs is not None else None
        self.profile = profile
        self.on_miss = on_miss
        self.op_budget_s = op_budget_s
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.format = format
        self.autoquant_version = autoquant_version
        self.plan = plan
        self.packed_tensors = packed_tensors
        self.unknown_keys: list[str] = []
        # runtime-only
        self.cache = cache
        self.progress = progress
        self.timer = timer
        self.bench = bench

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """From config.json. Keys this autoquant does not know (a folder written by a newer one)
        are kept aside and refused, by name, when the folder is loaded."""
        known = {k: v for k, v in config_dict.items() if k in cls._JSON_KEYS}
        config = cls(**known)
        config.unknown_keys = sorted(k for k in config_dict if k not in cls._JSON_KEYS)
        unused = {}
        for key, value in kwargs.items():
            if key in cls._JSON_KEYS or key in ("cache", "progress", "timer", "bench"):
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._JSON_KEYS}
        if isinstance(self.profile, ShapeProfile):
            out["profile"] = self.profile.name
        return json.loads(json.dumps(out))  # a deep, JSON-only copy

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __deepcopy__(self, memo: dict) -> "AutoQuantConfig":
        # from_pretrained deep-copies the model config, this included: the JSON fields are
        # copied, the runtime objects (a Store's engine, a timer the caller inspects) shared.
        out = AutoQuantConfig.from_dict(self.to_dict())
        out.unknown_keys = list(self.unknown_keys)
        out.profile = self.profile
        out.cache, out.progress, out.timer, out.bench = self.cache, self.progress, self.timer, self.bench
        return out

    # ---- what autoquant() gets ------------------------------------------------------------
    def cache_arg(self) -> Any:
        return DEFAULT_CACHE if self.cache == "default" else self.cache

    def filter_fn(self) -> Callable[[nn.Module, str], bool] | None:
        skip = tuple(self.modules_to_not_convert or ())
        if not skip:
            return None
        return lambda _mod, name: not any(name == s or name.startswith(s + ".") for s in skip)

    def start(self, model: nn.Module) -> nn.Module:
        """``autoquant(model, manual=True, ...)`` with these options: recording starts."""
        mode = tuple(self.mode) if isinstance(self.mode, list) else self.mode
        return autoquant(model, manual=True, candidates=self.candidates, mode=mode, min_sqnr=self.min_sqnr,
                         min_cosine=self.min_cosine, budget_outputs=self.budget_outputs,
                         filter_fn=self.filter_fn(), cache=self.cache_arg(), progress=self.progress,
                         timer=self.timer, bench=self.bench, on_miss=self.on_miss, op_budget_s=self.op_budget_s)


# ---- generate-aware tuning --------------------------------------------------------------------

@dataclass
class _Armed:
    """The lazy state on an armed model (its instance ``forward`` / ``generate`` are wrappers)."""

    config: AutoQuantConfig | None
    in_generate: int = 0


def _finish(model: nn.Module) -> None:
    """Finalize the recording and disarm: forward and generate back to the class's."""
    armed: _Armed | None = model.__dict__.pop(_ARMED_ATTR, None)
    model.__dict__.pop("generate", None)
    model.__dict__.pop("forward", None)
    if armed is None:
        return
    finalize(model)
    attach(model, armed.config)


def arm(model: nn.Module, config: AutoQuantConfig | None = None) -> nn.Module:
    """For a model that ``autoquant(model, manual=True, ...)`` is recording: finalize when the
    first ``generate()`` returns (the whole call recorded: prefill and every decode step), or
    right after the first plain forward, which then runs again on the finalized model so the
    caller gets its output. `config`: the options ``save_pretrained`` records (default: defaults).

    Both are wrapped on the instance, not hooked: sentence-transformers and others call
    ``model.forward(...)`` directly, which no module hook sees. Returns `model`."""
    if not hasattr(model, "_autoquant_session"):
        raise RuntimeError("autoquant.hf.arm(model) needs autoquant(model, manual=True) first")
    armed = _Armed(config)
    object.__setattr__(model, _ARMED_ATTR, armed)
    forward = model.forward

    @functools.wraps(forward)
    def forward_then_finalize(*args: Any, **kwargs: Any) -> Any:
        if armed.in_generate or model.__dict__.get(_ARMED_ATTR) is not armed:
            return forward(*args, **kwargs)
        with torch.no_grad():
            out = forward(*args, **kwargs)
        # With min_cosine, this call is the reference: record it now (finalize runs before the
        # model's forward hook would, and a direct model.forward(...) call fires no hook).
        recorded = getattr(getattr(model, "_autoquant_session", None), "recorded", None)
        if recorded is not None:
            recorded.record(model, args, kwargs, out)
        _finish(model)
        return forward(*args, **kwargs)

    object.__setattr__(model, "forward", forward_then_finalize)
    generate = getattr(model, "generate", None)
    if callable(generate):
        @functools.wraps(generate)
        def generate_then_finalize(*args: Any, **kwargs: Any) -> Any:
            armed.in_generate += 1
            try:
                out = generate(*args, **kwargs)
            finally:
                armed.in_generate -= 1
            if not armed.in_generate and model.__dict__.get(_ARMED_ATTR) is armed:
                _finish(model)
            return out

        object.__setattr__(model, "generate", generate_then_finalize)
    return model


def tune(model: nn.Module, input_ids: Tensor | None = None, *, config: AutoQuantConfig | None = None,
         max_new_tokens: int = 16, attention_mask: Tensor | None = None) -> nn.Module:
    """Generate-aware autoquant for a transformers model, in place; returns `model`.

    - No `input_ids`: armed. The first ``generate()`` is recorded whole (prefill M = prompt
      tokens, decode M = batch) and the model is finalized when it returns; a plain forward that
      comes first is recorded instead (models without generate: BERT, sentence-transformers).
    - `input_ids`: a greedy ``generate(input_ids, max_new_tokens=...)`` runs now (a forward for
      models without generate), then the model is finalized before this returns.

    Options come from `config` (an :class:`AutoQuantConfig`; default: all candidates, default
    cache). After finalize, ``save_pretrained`` writes the quantized model.
    """
    config = config or AutoQuantConfig()
    if getattr(model, _ARMED_ATTR, None) is not None:
        raise RuntimeError("autoquant.hf.tune: this model is already armed and waits for its first generate()")
    config.start(model)
    if input_ids is None:
        return arm(model, config)
    try:
        example = input_ids if attention_mask is None else {"input_ids": input_ids, "attention_mask": attention_mask}
        if not generate_example(model, example, max_new_tokens=max_new_tokens):
            with torch.no_grad():
                _run_example(model, input_ids, attention_mask, max_new_tokens)
    except BaseException:
        _abandon(model)
        raise
    finalize(model)
    attach(model, config)
    return model


def _abandon(model: nn.Module) -> None:
    """Undo ``autoquant(model, manual=True)`` after a failed recording run: float weights back,
    the session's hooks removed. (autoquant has no public cancel verb yet.)"""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            restore_float(mod)
    session = model.__dict__.pop("_autoquant_session", None)
    for handle in [*getattr(session, "hooks", ()), getattr(session, "capture", None)]:
        if handle is not None:
            handle.remove()


def _run_example(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> Any:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if _can_generate(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, do_sample=False)
    return model(input_ids=input_ids, attention_mask=attention_mask)


def generate_example(model: nn.Module, example_input: Any, *, max_new_tokens: int = 16) -> bool:
    """What ``autoquant(model, example_input)`` should run for a transformers model: where `model`
    can generate and `example_input` is token ids (an integer tensor, or a mapping holding
    ``input_ids`` and optionally ``attention_mask``), a greedy ``generate`` of `max_new_tokens`
    runs on it, so prefill and decode shapes are both recorded, and this returns True. Anything
    else: nothing runs, False (the caller runs its forward)."""
    if not _can_generate(model):
        return False
    if isinstance(example_input, Tensor) and not example_input.is_floating_point():
        ids, mask = example_input, None
    elif isinstance(example_input, Mapping) and isinstance(example_input.get("input_ids"), Tensor):
        ids, mask = example_input["input_ids"], example_input.get("attention_mask")
    else:
        return False
    with torch.no_grad():
        _run_example(model, ids if ids.dim() == 2 else ids.reshape(1, -1), mask, max_new_tokens)
    return True


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def record_generate(model: nn.Module, input_ids: Tensor, *, max_new_tokens: int = 16, name: str = "generate",
                    attention_mask: Tensor | None = None) -> ShapeProfile:
    """The shape profile of one greedy ``generate()`` (prefill and every decode step); the model
    is left exactly as it was (its Parameters, tied ones included, are put back as they were).
    Store it with ``SQLStore.save_profile`` (or ``autoquant profile``), pre-tune a device from it
    (``autoquant pretune``), then load with ``AutoQuantConfig(profile=name, cache=URL)``."""
    originals: list[tuple[nn.Linear, nn.Parameter]] = []
    records: list[LayerRecord] = []
    try:
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and not isinstance(mod.weight, AutoQuantizableLinearWeight):
                rec = LayerRecord("", max_rows=1)
                originals.append((mod, mod.weight))
                records.append(rec)
                mod.weight = nn.Parameter(AutoQuantizableLinearWeight.wrap(mod.weight, rec),
                                          requires_grad=mod.weight.requires_grad)
        with torch.no_grad():
            _run_example(model, input_ids, attention_mask, max_new_tokens)
    finally:
        for mod, weight in originals:
            mod.weight = weight
    total: dict[Any, int] = {}
    for rec in records:
        for op, n in rec.counts.items():
            total[op] = total.get(op, 0) + n
    return ShapeProfile(name, model_fingerprint(model), tuple(sorted(total.items())))


# ---- finalize from a profile and the cache ------------------------------------------------------

def _resolve_profile(profile: str | ShapeProfile, cache: Any) -> ShapeProfile:
    if isinstance(profile, ShapeProfile):
        return profile
    if str(profile).endswith(".json") or os.path.isfile(str(profile)):
        return load_profile(profile)
    from .cache_db import default_cache_url, open_store  # noqa: PLC0415 - SQL only when used

    store = open_store(default_cache_url() if cache == "default" or cache is DEFAULT_CACHE else cache)
    if store is None or not hasattr(store, "load_profile"):
        raise ValueError(f"profile={profile!r} names a stored profile, but cache={cache!r} is no SQL cache: "
                         "pass cache=URL (where `autoquant profile --store` put it) or a profile JSON path")
    return store.load_profile(str(profile))  # KeyError names the stored profiles


def _calibration_ids(model: nn.Module) -> Tensor:
    """A fixed pseudo-random token sequence: real activations for the accuracy check."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not vocab:
        raise ValueError("finalizing from a profile runs one short forward for the accuracy check and needs a "
                         f"text model (config.vocab_size); {type(model).__name__} has none")
    gen = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.randint(0, int(vocab), (1, _CALIBRATION_TOKENS), generator=gen).to(device)


def finalize_from_profile(model: nn.Module, config: AutoQuantConfig) -> nn.Module:
    """Finalize `model` for the ops of ``config.profile`` from the cache: each layer gets the
    profile's ops of its own (K, N, bias, dtype); one short forward on fixed token ids gives the
    activations its accuracy check needs. Benchmarks only what the cache lacks (none with
    ``on_miss="error"``, which raises ``CacheMissError`` instead). Returns `model`."""
    if config.profile is None:
        raise ValueError("finalize_from_profile needs AutoQuantConfig(profile=...)")
    profile = _resolve_profile(config.profile, config.cache)
    here = model_fingerprint(model)
    if profile.model_fingerprint != here:
        raise ValueError(f"shape profile {profile.name!r} was recorded on another architecture (fingerprint "
                         f"{profile.model_fingerprint}, this model's is {here}): record one on this model "
                         "with autoquant.hf.record_generate")
    ids = _calibration_ids(model)
    config.start(model)
    matched = 0
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        for name, mod in model.named_modules():
            weight = getattr(mod, "weight", None)
            if not isinstance(mod, nn.Linear) or not isinstance(weight, AutoQuantizableLinearWeight):
                continue
            rec = weight.record
            dtypes = {op.dtype for op in rec.counts}
            ops = {op: n for op, n in profile.ops if (op.k, op.n, op.bias) == (mod.in_features, mod.out_features,
                                                                              mod.bias is not None)
                   and op.dtype in dtypes}
            rec.counts.clear()
            rec.counts.update(ops)
            if ops:
                matched += 1
            else:
                log.warning("autoquant: profile %r has no op for layer %s (%dx%d %s): it stays float", profile.name,
                            name, mod.in_features, mod.out_features, "/".join(sorted(dtypes)) or "never called")
    except BaseException:
        _abandon(model)
        raise
    if not matched:
        log.warning("autoquant: shape profile %r matches no layer of this model in its loaded dtype: "
                    "every layer stays float (record the profile in the dtype you load)", profile.name)
    finalize(model)
    attach(model, config)
    return model


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
        if getattr(model, _ARMED_ATTR, None) is not None or hasattr(model, "_autoquant_session"):
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
