"""AutoQuantizableLinearWeight: the weight of a layer waiting to be tuned.

It is the original float weight (same storage) plus a :class:`LayerRecord`. Through
``__torch_function__`` it intercepts ``F.linear``: the call is logged as an
:class:`~autoquant.keys.OpShape` (leading dims folded into M) with a count, a bounded sample of real
activation rows is kept for the accuracy check, and the result is computed in float exactly as
before. Ops that make a new version of the weight (``.to()``, ``.detach()``, ``.clone()``,
``deepcopy``, ``state_dict()``) keep the subclass and its record, so a model can be moved or saved
before finalize.

>>> import torch
>>> lin = torch.nn.Linear(8, 4)
>>> w = AutoQuantizableLinearWeight.wrap(lin.weight, LayerRecord("lin", max_rows=16))
>>> lin.weight = torch.nn.Parameter(w, requires_grad=False)
>>> _ = lin(torch.randn(2, 3, 8))
>>> dict(lin.weight.record.counts)
{OpShape(m=6, k=8, n=4, bias=True, dtype='float32'): 1}
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .keys import OpShape, dtype_name

__all__ = ["LayerRecord", "AutoQuantizableLinearWeight", "is_autoquant_weight"]

_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}

# Ops whose result is "the same weight, elsewhere or copied": they keep the subclass and its record.
_PRESERVING = {
    Tensor.to, Tensor.detach, Tensor.clone, Tensor.cpu, Tensor.cuda, Tensor.contiguous,
    Tensor.requires_grad_, Tensor.float, Tensor.half, Tensor.bfloat16, Tensor.double,
    Tensor.pin_memory, Tensor.share_memory_, torch.detach, torch.clone,
    Tensor.__deepcopy__,
}


@dataclass
class LayerRecord:
    """What the warm run saw for one layer: op -> call count, up to `max_rows` activation rows
    (the first rows seen, then a deterministic stride sample so late calls are represented too),
    and the per-input-channel absmax over EVERY recorded row (float32 [K], what calibrated
    candidates such as int8_smooth read: outliers in one late call must not be missed, and the
    row sample could miss them)."""

    name: str
    max_rows: int = 64
    counts: Counter = field(default_factory=Counter)
    rows: list[Tensor] = field(default_factory=list)
    _seen_rows: int = 0
    _absmax: Tensor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def log(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        op = OpShape(m=m, k=k, n=weight.shape[0], bias=bias is not None, dtype=dtype_name(x.dtype))
        with self._lock:
            self.counts[op] += 1
            if m == 0:
                return
            have = sum(r.shape[0] for r in self.rows)
            flat = x.detach().reshape(-1, k)
            amax = flat.abs().amax(dim=0).to(torch.float32)
            self._absmax = amax if self._absmax is None else torch.maximum(self._absmax, amax.to(self._absmax.device))
            if have < self.max_rows:
                self.rows.append(flat[: self.max_rows - have].to(torch.float32, copy=True))
            else:
                # Replace one slot per call, cycling, so the sample is not only the first batch.
                slot = self._seen_rows % self.max_rows
                self._replace_row(slot, flat[m // 2].to(torch.float32))
            self._seen_rows += 1

    def _replace_row(self, slot: int, row: Tensor) -> None:
        for chunk in self.rows:
            if slot < chunk.shape[0]:
                chunk[slot] = row.to(chunk.device)
                return
            slot -= chunk.shape[0]

    def activations(self) -> Tensor | None:
        """The sampled activation rows as one float32 [R, K] tensor, or None if never called."""
        return torch.cat(self.rows) if self.rows else None

    def act_absmax(self) -> Tensor | None:
        """max |x[:, k]| over every recorded activation row, float32 [K]; None if never called."""
        return None if self._absmax is None else self._absmax.clone()

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    def __deepcopy__(self, memo: dict) -> "LayerRecord":
        copy = LayerRecord(self.name, self.max_rows, Counter(self.counts), [r.clone() for r in self.rows])
        copy._seen_rows = self._seen_rows
        copy._absmax = None if self._absmax is None else self._absmax.clone()
        return copy


class AutoQuantizableLinearWeight(Tensor):
    """A float weight that records how it is used. Created with :meth:`wrap`, never directly."""

    record: LayerRecord

    @staticmethod
    def wrap(weight: Tensor, record: LayerRecord) -> "AutoQuantizableLinearWeight":
        data = weight.detach()
        if isinstance(data, AutoQuantizableLinearWeight):
            data = data.as_subclass(Tensor)
        out = Tensor._make_subclass(AutoQuantizableLinearWeight, data, False)
        out.record = record
        return out

    def unwrap(self) -> Tensor:
        """The plain float tensor (same storage)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.detach().as_subclass(Tensor) if type(self) is not Tensor else self

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # noqa: D105
        with torch._C.DisableTorchFunctionSubclass():
            shape = tuple(self.shape)
        return f"AutoQuantizableLinearWeight(layer={self.record.name!r}, shape={shape}, calls={self.record.calls})"

    def __reduce_ex__(self, proto: int) -> Any:
        # Refuse pickling: a record holds activation samples, and nothing we save is a pickle.
        raise TypeError(
            "an AutoQuantizableLinearWeight is not picklable: finalize the model first "
            "(autoquant.finalize(model)), then save it with autoquant.save"
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS:
            x, weight, bias = _linear_args(args, kwargs)
            if isinstance(weight, AutoQuantizableLinearWeight):
                weight.record.log(x, weight, bias)
            with torch._C.DisableTorchFunctionSubclass():
                return F.linear(_plain(x), _plain(weight), _plain(bias) if bias is not None else None)
        if func is Tensor.__deepcopy__:
            src = args[0]
            memo = args[1] if len(args) > 1 else kwargs.get("memo", {})
            import copy  # noqa: PLC0415 - only on deepcopy

            with torch._C.DisableTorchFunctionSubclass():
                data = src.as_subclass(Tensor).clone()
            out = cls.wrap(data, copy.deepcopy(src.record, memo))
            out.requires_grad_(src.requires_grad)
            return out
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if func in _PRESERVING and args and isinstance(args[0], AutoQuantizableLinearWeight):
            if isinstance(result, Tensor) and not isinstance(result, AutoQuantizableLinearWeight):
                wrapped = Tensor._make_subclass(cls, result.as_subclass(Tensor), result.requires_grad)
                wrapped.record = args[0].record
                return wrapped
            if isinstance(result, AutoQuantizableLinearWeight) and not hasattr(result, "record"):
                result.record = args[0].record
            return result
        return _unwrap_all(result)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    names = ("input", "weight", "bias")
    values = list(args) + [None] * (3 - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    return values[0], values[1], values[2]


def _plain(t: Tensor) -> Tensor:
    return t.as_subclass(Tensor) if isinstance(t, AutoQuantizableLinearWeight) else t


def _unwrap_all(result: Any) -> Any:
    if isinstance(result, AutoQuantizableLinearWeight):
        return result.as_subclass(Tensor)
    if isinstance(result, (tuple, list)):
        return type(result)(_unwrap_all(r) for r in result)
    return result


def is_autoquant_weight(t: Any) -> bool:
    return isinstance(t, AutoQuantizableLinearWeight)
