"""``AutoQuantConfig``: autoquant's ``quantization_config`` for transformers' ``from_pretrained``.

The options a saved folder's config.json records (JSON-only fields) and the runtime-only ones
(cache, timer, progress) that are never written, because a cache URL may hold a password. The
quantizer that reads and writes it is :mod:`autoquant.hf`; the tuning it starts is
:mod:`autoquant.hf_generate`.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from torch import nn

try:
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"autoquant.hf needs transformers with a quantizer registry (tested: 5.24): {exc}. "
        "Install it with: pip install 'autoquant-tuner[hf]'"
    ) from exc

from .api import DEFAULT_CACHE, autoquant
from .bench import BenchConfig, Timer
from .profile import ShapeProfile
from .tune import ON_MISS

__all__ = ["AutoQuantConfig", "HF_FORMAT", "QUANT_METHOD"]

QUANT_METHOD = "autoquant"
# What a saved folder's quantization_config and safetensors metadata say they are. A new layout
# gets a new name: an older autoquant then refuses the folder by name instead of misreading it.
HF_FORMAT = "autoquant-hf-v1"


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
