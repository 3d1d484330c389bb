"""The finalized-layer modules: :class:`QuantizedLinear` (one kernel over plain-tensor buffers)
and :class:`DispatchLinear` (two kernels over one packed weight, switched on M).

Contract: built by ``Candidate.build`` / ``autoquant.finalize.make_layer`` from a candidate (or an
M-dispatch pair) and its packed tensors; state dict = the packed tensors (+ bias), so a finalized
model saves as safetensors; one eager shortcut (closures straight to the C++ kernels), and one
traced path (the registered ops of ``_cpu_ops``) that torch.compile and torch.export share. Kept
apart from the candidate protocol (``base``) because they are runtime, not tuning, concepts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from ._cpu_ops import tracing as _tracing
from .grad import attach_input_grad, wants_weight_grad as _wants_weight_grad

if TYPE_CHECKING:
    from ..selection import Dispatch
    from .base import Candidate

__all__ = ["DispatchLinear", "QuantizedLinear"]

# Eager-path test of every layer call: ``is_dynamo_compiling`` is one Python frame returning False
# (``is_compiling`` is two), and dynamo folds it to True; everything else that runs this Python
# while tracing (torch.export non-strict, fake tensors, make_fx) has a dispatch mode on the stack.
_is_compiling = torch.compiler.is_dynamo_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
# nn.Module's process-wide hook registries (torch.nn.modules.module.register_module_forward_hook
# and friends fill them in place; torch never rebinds them): QuantizedLinear.__call__ takes its
# shortcut only while all four are empty, as nn.Module.__call__ does.
_G_FWD_PRE, _G_FWD = _nn_module._global_forward_pre_hooks, _nn_module._global_forward_hooks
_G_BWD_PRE, _G_BWD = _nn_module._global_backward_pre_hooks, _nn_module._global_backward_hooks
# Attributes QuantizedLinear's shortcut state is made from: setting any of them rebuilds it.
_HOT_INPUTS = frozenset({"_eager", "act_dtype", "tuned_m", "in_features", "forward", "_compiled_call_impl"})


class QuantizedLinear(nn.Module):
    """A finalized linear layer: packed plain-tensor buffers plus one candidate's fast path.

    Its forward folds leading dims into M, makes the activation contiguous, calls the kernel once
    and restores the shape. State dict = the packed tensors (+ bias): safetensors-friendly.
    Runtime state is rebuilt after ``.to()`` / ``_apply`` and after ``load_state_dict`` (in place
    or ``assign=True``); prepacked handles keyed by the weight tensor notice in-place writes on
    their own. ``copy.deepcopy`` (and pickling) gives a layer with its own runtime state.

    Calling the layer in eager mode runs the kernel's closure straight from ``__call__`` when
    nn.Module.__call__ would do nothing else (no hooks, ``forward`` not replaced, not compiled in
    place): a few microseconds less per call, the same result bit for bit. Hooks, torch.compile,
    torch.export and fake tensors take the ordinary nn.Module path.

    ``act_dtype`` is the activation dtype the layer was tuned and built for. The packed buffers
    keep their dtypes through ``model.to(dtype)`` (a float32 scale squeezed into bfloat16 would
    lose accuracy for nothing); an input of another float dtype is computed in ``act_dtype`` and
    cast back, with one warning per dtype pair naming the layer and what to do.

    ``tuned_m`` holds the row counts M the layer was tuned on; other M values seen in eager
    calls after finalize are counted in ``unseen_m`` (M -> calls) and flagged by
    ``autoquant.report``. Not counted while traced (torch.compile, torch.export).
    """

    def __init__(
        self, candidate: Candidate, packed: dict[str, Tensor], bias: Tensor | None,
        in_features: int, out_features: int, *, act_dtype: torch.dtype | None = None,
        tuned_m: frozenset[int] | None = None, name: str = "",
    ) -> None:
        super().__init__()
        self.candidate = candidate
        self.in_features = in_features
        self.out_features = out_features
        self._packed_names = tuple(sorted(packed))
        for pname in self._packed_names:
            self.register_buffer(pname, packed[pname])
        self.register_buffer("bias", bias)
        self.act_dtype = act_dtype
        self.layer_name = name
        self.tuned_m: frozenset[int] = frozenset(tuned_m or ())
        self.unseen_m: dict[int, int] = {}
        self._runtime = candidate.prepare(packed)
        self._linear = candidate.linear if candidate.traceable else torch.compiler.disable(candidate.linear)
        self._eager = self._make_eager()  # also sets self._hot (see __setattr__)

    def _make_eager(self) -> Callable[[Tensor], Tensor] | None:
        if self.act_dtype is None:
            return None
        try:
            return self.candidate.eager(self._buffers, self._runtime, self.act_dtype)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - an optional shortcut: the generic path always works
            return None

    def packed(self) -> dict[str, Tensor]:
        # Straight from _buffers: nn.Module.__getattr__ is a slow fallback path per name.
        buffers = self._buffers
        return {name: buffers[name] for name in self._packed_names}  # type: ignore[misc]

    def refresh_runtime(self) -> None:
        """Rebuild runtime-only state after buffers were replaced (load, `.to()`)."""
        self._runtime = self.candidate.prepare(self.packed())
        self._eager = self._make_eager()

    # ---- the eager shortcut's state ---------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _HOT_INPUTS:
            self._refresh_hot()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name in _HOT_INPUTS:
            self._refresh_hot()

    def _refresh_hot(self) -> None:
        """Rebuild ``_hot``: what ``__call__`` needs per call, in one tuple, or None where it must
        go through nn.Module.__call__ (no closure, ``forward`` replaced on the instance, e.g. by
        an offloading library, or compiled in place by ``.compile()``). Attribute reads on an
        nn.Module are slow (its ``__getattr__`` defeats CPython's attribute caches): the shortcut
        reads one. The hook dicts are the layer's own (hooks are added to them in place)."""
        d = self.__dict__
        fast = d.get("_eager")
        if fast is None or "forward" in d or d.get("_compiled_call_impl") is not None or "act_dtype" not in d:
            hot = None
        else:
            tuned = d.get("tuned_m")
            k = d["in_features"]
            hot = (fast, d["act_dtype"], d["_forward_pre_hooks"], d["_forward_hooks"], d["_backward_pre_hooks"],
                   d["_backward_hooks"], frozenset(m * k for m in tuned) if tuned else None, k)
        object.__setattr__(self, "_hot", hot)

    def __getstate__(self) -> dict[str, Any]:
        # The closures read this object's buffer dict: a copy (copy.deepcopy, pickle) makes its own.
        state = super().__getstate__()  # a copy of __dict__
        state.pop("_eager", None)
        state.pop("_hot", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.refresh_runtime()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            if out.dtype != t.dtype and t.is_floating_point():
                # A dtype cast (model.half(), .to(bfloat16)): move, but keep the packed dtype.
                _note_cast(self, out.dtype)
                return t.to(device=out.device)
            return out

        out = super()._apply(keep_dtype, recurse)
        self.refresh_runtime()
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_runtime()  # runtime copies (e.g. per-dtype scales) follow the loaded values

    def _kernel(self, x2: Tensor) -> Tensor:
        """The layer's kernel on a 2-D contiguous activation (overridden by DispatchLinear). The
        eager closure is not used here: ``forward`` already took it for every input it can serve,
        and an input that made it raise must get the generic kernel."""
        buffers = self._buffers
        return self._linear(x2, buffers, self._runtime, buffers["bias"])

    def _run(self, x2: Tensor) -> Tensor:
        """``_kernel`` with the input gradient attached where autograd needs one (see
        :mod:`autoquant.candidates.grad`): the kernels themselves have no autograd formula."""
        if _grad_enabled() and (x2.requires_grad or _wants_weight_grad(self)):
            return attach_input_grad(self, x2)
        return self._kernel(x2)

    def kernel_for(self, m: int) -> Candidate:
        """The candidate whose kernel runs an [m, K] input (DispatchLinear: one of two)."""
        return self.candidate

    def dequantized_weight(self, dtype: torch.dtype, candidate: Candidate | None = None) -> Tensor:
        """The float32 [N, K] weight `candidate` (the layer's own by default) multiplies an
        activation of `dtype` by, as its ``reference`` computes it: the input gradient's W."""
        cand = candidate or self.candidate
        packed = self.packed()
        with torch.no_grad():
            w = cand.dequantize(packed, dtype)
            if w is None:  # read off the reference: row k of reference(I) is column k of W
                eye = torch.eye(self.in_features, dtype=dtype, device=packed[self._packed_names[0]].device)
                w = cand.reference(eye, packed, None).float().t()
        return w.contiguous()

    def __call__(self, x: Any) -> Any:
        # Eager shortcut. nn.Module.__call__ spends two Python frames (_wrapped_call_impl,
        # _call_impl), a tracing-state query, eight hook tests and forward's own frame before
        # the kernel: 4-5 us per call here, as much as a small kernel. Where it would do nothing
        # but call forward (no hooks on this layer or process-wide, forward not replaced, not
        # compiled in place) and x is an eager tensor of the tuned dtype that needs no gradient,
        # the kernel's closure runs from here. Traced: nn.Module.__call__, and nothing of this
        # layer's eager state is read first (torch.compile inlines this method and folds
        # is_dynamo_compiling; a guard on a per-layer closure would recompile per kernel).
        # torch.export, fake tensors and make_fx run under a dispatch mode.
        if not _is_compiling():
            hot = self._hot
            if hot is not None and not (_G_FWD_PRE or _G_FWD or _G_BWD_PRE or _G_BWD or _dispatch_depth()):
                fast, dtype, fpre, fwd, bpre, bwd, tuned, k = hot
                if x.dtype is dtype and not (fpre or fwd or bpre or bwd or (x.requires_grad and _grad_enabled())):
                    try:
                        y = fast(x)
                    except Exception:  # noqa: BLE001 - the generic path says what is wrong, or runs it
                        return self._general(x)
                    if tuned is not None:
                        n = x.numel()
                        if n not in tuned:
                            self._note_unseen(n // k)
                    return y
        return super().__call__(x)

    def forward(self, x: Tensor) -> Tensor:
        # Traced (torch.compile, torch.export, fake tensors): the registered ops, reading only the
        # buffers and attributes every layer of this kernel shares the values of.
        if _is_compiling() or _dispatch_depth():
            return self._general(x)
        # Eager fast path (what __call__ does itself when no hook is set): one closure over the
        # buffers (any rank and strides), when the kernel has one and x has the tuned dtype.
        fast = self._eager
        if fast is not None and x.dtype is self.act_dtype and not (x.requires_grad and _grad_enabled()):
            try:
                y = fast(x)
            except Exception:  # noqa: BLE001 - the generic path says what is wrong, or runs it
                return self._general(x)
            if self.tuned_m:
                m = x.numel() // self.in_features
                if m not in self.tuned_m:
                    self._note_unseen(m)
            return y
        return self._general(x)

    def _general(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._who()}: input has {x.shape[-1]} features (shape {tuple(x.shape)}), the layer "
                f"expects {self.in_features}"
            )
        if self.act_dtype is not None and x.dtype != self.act_dtype:
            if not x.is_floating_point():
                raise TypeError(
                    f"{self._who()}: got a {x.dtype} input; a linear layer needs floating-point "
                    f"activations ({self.act_dtype} here)"
                )
            _warn_dtype(self, x.dtype)
            return self.forward(x.to(self.act_dtype)).to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if not _tracing() and self.tuned_m and x2.shape[0] not in self.tuned_m:  # traced: no guard on tuned_m
            self._note_unseen(x2.shape[0])
        y = self._run(x2)
        return y.reshape(*lead, self.out_features)

    def _note_unseen(self, m: int) -> None:
        m = int(m)
        if not self.unseen_m:
            log.info("%s: M=%d rows was never seen in the warm run (tuned for M in %s); running %s "
                     "anyway, flagged in autoquant.report", self._who(), m, sorted(self.tuned_m),
                     self.candidate.name)
        self.unseen_m[m] = self.unseen_m.get(m, 0) + 1

    def _who(self) -> str:
        return f"layer {self.layer_name!r} ({self.candidate.name})" if self.layer_name else self.candidate.name

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.candidate.name}"


log = logging.getLogger("autoquant")
_WARNED_DTYPES: set[tuple[Any, Any]] = set()


def _warn_dtype(layer: QuantizedLinear, got: torch.dtype) -> None:
    pair = (layer.act_dtype, got)
    if pair in _WARNED_DTYPES:
        return
    _WARNED_DTYPES.add(pair)
    log.warning(
        "%s was tuned for %s activations and got %s: computing in %s and casting the output back "
        "(correct, but its kernels were chosen for %s). To tune for %s, run autoquant on the model "
        "in that dtype; to silence this, feed %s inputs. (Warned once per dtype pair.)",
        layer._who(), layer.act_dtype, got, layer.act_dtype, layer.act_dtype, got, layer.act_dtype)


def _note_cast(layer: QuantizedLinear, to: torch.dtype) -> None:
    pair = ("cast", to)
    if pair in _WARNED_DTYPES:
        return
    _WARNED_DTYPES.add(pair)
    log.warning(
        "model cast to %s after autoquant finalized it: quantized layers (e.g. %s) keep their packed "
        "weights and compute in the dtype they were tuned for (%s), casting activations in and out. "
        "For kernels chosen for %s, run autoquant on the model cast first.",
        to, layer._who(), layer.act_dtype, to)


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

    def kernel_for(self, m: int) -> Candidate:
        return self.dispatch.small if m < self.threshold else self.dispatch.large

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
