"""The recording session: what ``autoquant()`` set up on a model and ``finalize()`` consumes.

Contract: a model between ``autoquant(model, ...)`` and its finalize carries one :class:`_Session`
on its root module (:func:`_root`) under ``_SESSION_ATTR``; after finalize it carries the report
under ``_REPORT_ATTR`` instead. The session holds the layers being recorded, their records, the
tuning settings, and where measurements go (:func:`_store_for`) and which candidates each op is
timed with (:func:`_candidates_for`).

One reason to exist on its own: the public verbs (``autoquant.api``) create and inspect a session
and ``autoquant.finalize`` consumes it; both import it from here, so imports point one way
(api -> finalize -> session) and neither depends on the other's internals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .bench import Timer
from .candidates import Candidate, default_candidates, get_family
from .config import TuneConfig
from .keys import OpShape
from .outputs import RecordedCalls
from .store import MemoryStore, Store
from .subclass import LayerRecord

__all__ = ["DEFAULT_CACHE"]

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


def parse_candidates(candidates: Iterable[Any] | None) -> tuple[Candidate | str, ...] | None:
    """The ``candidates=`` argument of autoquant / pretune / worker, checked: Candidate instances
    stay as given; family names are checked now (KeyError naming the known ones) and expanded
    per device and dtype at tuning time; None means every default candidate."""
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


def _candidates_for(op: OpShape, device: torch.device, chosen: tuple[Candidate | str, ...] | None) -> list[Candidate]:
    """The candidates `op` is timed with on `device`: the float baseline first, then `chosen`
    (family names expanded to this device's kernels for the op's dtype, instances as given), or
    every kernel this device offers; duplicates dropped."""
    base = get_family("float")(kernel="aten")
    defaults = default_candidates(device, op.torch_dtype)
    if chosen is None:
        return list(dict.fromkeys([base, *defaults]))
    cands: list[Candidate] = []
    for c in chosen:
        cands.extend([x for x in defaults if x.family == c] if isinstance(c, str) else [c])
    return list(dict.fromkeys([base, *cands]))
