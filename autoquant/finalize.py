"""Swap each layer for its winner; free the float weights of quantized layers.

A layer whose winner is the float baseline, or that was never called, goes back to a plain
nn.Linear with a plain Parameter (zero overhead). Others become a
:class:`~autoquant.candidates.QuantizedLinear` (one kernel over plain tensor buffers) or a
:class:`DispatchLinear` (two kernels, one packed weight, switched on M).
"""

from __future__ import annotations

from collections.abc import Callable
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
        self._eager = self._make_eager()  # now that both kernels are known

    def refresh_runtime(self) -> None:
        if hasattr(self, "dispatch"):
            self._large_runtime = self.dispatch.large.prepare(self.packed())
        super().refresh_runtime()

    def _make_eager(self) -> Callable[[Tensor], Tensor] | None:
        """One closure switching on M between the two kernels' closures. A kernel without one
        runs its ``linear`` on the folded input. None until both kernels are known."""
        d = self.__dict__
        if "dispatch" not in d or self.act_dtype is None:
            return None
        buffers, dtype = self._buffers, self.act_dtype
        try:
            small = self.dispatch.small.eager(buffers, self._runtime, dtype)  # type: ignore[arg-type]
            large = self.dispatch.large.eager(buffers, self._large_runtime, dtype)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - an optional shortcut: the generic path always works
            return None
        small = small or _folded_linear(self._linear, buffers, self._runtime, self.in_features)
        large = large or _folded_linear(self._large_linear, buffers, self._large_runtime, self.in_features)
        rows_times_k = self.threshold * self.in_features  # M < threshold <=> numel < threshold * K

        def run(x: Tensor) -> Tensor:
            return small(x) if x.numel() < rows_times_k else large(x)

        return run

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


def _folded_linear(linear: Callable[..., Tensor], buffers: dict[str, Any], runtime: Any,
                   k: int) -> Callable[[Tensor], Tensor]:
    """A kernel's generic ``linear`` as an eager closure: x folded to a contiguous [M, K]."""
    def run(x: Tensor) -> Tensor:
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = linear(x2, buffers, runtime, buffers["bias"])
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    return run


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
