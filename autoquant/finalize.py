"""Swap each layer for its winner; free the float weights of quantized layers.

A layer whose winner is the float baseline, or that was never called, goes back to a plain
nn.Linear with a plain Parameter (zero overhead). Others become a
:class:`~autoquant.candidates.QuantizedLinear` (one kernel over plain tensor buffers) or a
:class:`DispatchLinear` (two kernels, one packed weight, switched on M).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .candidates import Candidate, QuantizedLinear
from .candidates._cpu_ops import tracing as _tracing
from .selection import Dispatch, LayerPlan, is_baseline
from .subclass import AutoQuantizableLinearWeight

__all__ = ["DispatchLinear", "build_layer", "label", "restore_float", "replace_module"]


class DispatchLinear(QuantizedLinear):
    """One packed weight read by two kernels: `small` for M < threshold, `large` otherwise.

    Both candidates declare the same ``weight_format``, so ``small.quantize`` produces tensors
    ``large`` reads too: the layer costs no more memory than either alone.
    """

    def __init__(self, dispatch: Dispatch, packed: dict[str, Tensor], bias: Tensor | None,
                 in_features: int, out_features: int, *, act_dtype: torch.dtype | None = None,
                 tuned_m: frozenset[int] | None = None, name: str = "") -> None:
        super().__init__(dispatch.small, packed, bias, in_features, out_features, act_dtype=act_dtype,
                         tuned_m=tuned_m, name=name)
        self.dispatch = dispatch
        self.threshold = dispatch.threshold
        self._large_runtime = dispatch.large.prepare(packed)
        large = dispatch.large
        self._large_linear = large.linear if large.traceable else torch.compiler.disable(large.linear)

    def refresh_runtime(self) -> None:
        super().refresh_runtime()
        if hasattr(self, "dispatch"):
            self._large_runtime = self.dispatch.large.prepare(self.packed())

    def _make_eager(self) -> None:
        return None  # two kernels switched on M: no single closure

    def _kernel(self, x2: Tensor) -> Tensor:
        buffers = self._buffers
        if x2.shape[0] < self.threshold:
            return self._linear(x2, buffers, self._runtime, buffers["bias"])
        return self._large_linear(x2, buffers, self._large_runtime, buffers["bias"])

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.act_dtype and x.dim() == 2 and x.is_contiguous() and x.shape[1] == self.in_features:
            m = x.shape[0]
            if self.tuned_m and not _tracing() and m not in self.tuned_m:
                self._note_unseen(m)
            buffers = self._buffers
            if m < self.threshold:
                return self._linear(x, buffers, self._runtime, buffers["bias"])
            return self._large_linear(x, buffers, self._large_runtime, buffers["bias"])
        return self._general(x)

    def extra_repr(self) -> str:
        d = self.dispatch
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"M<{d.threshold}: {d.small.name}, else {d.large.name}")


def plain_weight(linear: nn.Linear) -> Tensor:
    w = linear.weight
    if isinstance(w, AutoQuantizableLinearWeight):
        return w.unwrap()
    return w.detach()


def restore_float(linear: nn.Linear) -> None:
    """Give `linear` back its plain float weight Parameter (undoing the recording subclass)."""
    w = linear.weight
    if isinstance(w, AutoQuantizableLinearWeight):
        linear.weight = nn.Parameter(w.unwrap(), requires_grad=w.requires_grad)


def build_layer(plan: LayerPlan, linear: nn.Linear) -> nn.Module | None:
    """The module that replaces `linear` under `plan`, or None to keep the float nn.Linear."""
    weight = plain_weight(linear)
    bias = None if linear.bias is None else linear.bias.detach()
    tuned_m = frozenset(op.m for op in plan.ops)
    if plan.dispatch is not None:
        with torch.no_grad():
            packed = plan.dispatch.small.quantize(weight)
        return DispatchLinear(plan.dispatch, packed, None if bias is None else bias.clone(),
                              linear.in_features, linear.out_features, act_dtype=weight.dtype,
                              tuned_m=tuned_m, name=plan.name)
    winner: Candidate | None = plan.winner
    if winner is None or is_baseline(winner):
        return None
    return label(winner.build(weight, bias), plan.name, tuned_m)


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
