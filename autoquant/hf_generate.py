"""Generate-aware tuning of transformers models, and finalizing one from a stored shape profile.

- ``arm(model)``: a model ``autoquant(model, manual=True)`` is recording is finalized when its
  first ``generate()`` returns (the whole call recorded: prefill and every decode step), or right
  after its first plain forward (models without generate).
- ``tune(model[, input_ids])``: ``autoquant`` with those semantics, from an ``AutoQuantConfig``.
- ``generate_example(model, token_ids)``: the example run ``autoquant(model, token_ids)`` makes.
- ``record_generate(model, input_ids)``: the shape profile of one whole generate.
- ``finalize_from_profile(model, config)``: finalize from a stored profile and the cache.

Why a model is wrapped on the instance and not hooked: sentence-transformers and others call
``model.forward(...)`` directly, which no module hook sees. Public through :mod:`autoquant.hf`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .api import DEFAULT_CACHE, cancel, finalize, is_recording, record_reference
from .hf_config import AutoQuantConfig
from .profile import ShapeProfile, load_profile, model_fingerprint
from .subclass import AutoQuantizableLinearWeight, LayerRecord

__all__ = ["arm", "finalize_from_profile", "generate_example", "record_generate", "tune"]

log = logging.getLogger("autoquant")

ARMED_ATTR = "_autoquant_hf_armed"
_CALIBRATION_TOKENS = 16


def _attach(model: nn.Module, config: AutoQuantConfig | None) -> None:
    from .hf import attach  # noqa: PLC0415 - the quantizer module imports this one

    attach(model, config)


@dataclass
class _Armed:
    """The lazy state on an armed model (its instance ``forward`` / ``generate`` are wrappers)."""

    config: AutoQuantConfig | None
    in_generate: int = 0


def _finish(model: nn.Module) -> None:
    """Finalize the recording and disarm: forward and generate back to the class's."""
    armed: _Armed | None = model.__dict__.pop(ARMED_ATTR, None)
    model.__dict__.pop("generate", None)
    model.__dict__.pop("forward", None)
    if armed is None:
        return
    finalize(model)
    _attach(model, armed.config)


def arm(model: nn.Module, config: AutoQuantConfig | None = None) -> nn.Module:
    """For a model that ``autoquant(model, manual=True, ...)`` is recording: finalize when the
    first ``generate()`` returns (the whole call recorded: prefill and every decode step), or
    right after the first plain forward, which then runs again on the finalized model so the
    caller gets its output. `config`: the options ``save_pretrained`` records (default: defaults).

    Both are wrapped on the instance, not hooked: sentence-transformers and others call
    ``model.forward(...)`` directly, which no module hook sees. Returns `model`."""
    if not is_recording(model):
        raise RuntimeError("autoquant.hf.arm(model) needs autoquant(model, manual=True) first")
    armed = _Armed(config)
    object.__setattr__(model, ARMED_ATTR, armed)
    forward = model.forward

    @functools.wraps(forward)
    def forward_then_finalize(*args: Any, **kwargs: Any) -> Any:
        if armed.in_generate or model.__dict__.get(ARMED_ATTR) is not armed:
            return forward(*args, **kwargs)
        with torch.no_grad():
            out = forward(*args, **kwargs)
        # With min_cosine, this call is the reference: record it now (finalize runs before the
        # model's forward hook would, and a direct model.forward(...) call fires no hook).
        record_reference(model, args, kwargs, out)
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
            if not armed.in_generate and model.__dict__.get(ARMED_ATTR) is armed:
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
    if getattr(model, ARMED_ATTR, None) is not None:
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
        cancel(model)
        raise
    finalize(model)
    _attach(model, config)
    return model


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
        cancel(model)
        raise
    if not matched:
        log.warning("autoquant: shape profile %r matches no layer of this model in its loaded dtype: "
                    "every layer stays float (record the profile in the dtype you load)", profile.name)
    finalize(model)
    _attach(model, config)
    return model
