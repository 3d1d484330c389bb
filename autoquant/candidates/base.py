"""The candidate protocol (DESIGN.md section 3) and the one finalized-layer module all share.

A candidate is a family plus typed params, the kernel choice among them: a frozen dataclass, so it
is hashable, comparable and round-trips through JSON. Families register by name.

Contract of a family (subclass of :class:`Candidate`):

- ``supports(device, op) -> str | None``: None if this kernel can run `op` on `device`, else the
  reason, kept in the report. Never raises for a device/shape it cannot handle.
- ``quantize(weight) -> dict[str, Tensor]``: the packed state, plain tensors only (int8 data, scales,
  zeros, ...) so it saves as safetensors. ``weight`` is the float [N, K] nn.Linear weight.
- ``prepare(packed) -> object``: runtime-only state rebuilt from the packed tensors (e.g. scales
  cast once per dtype); never saved. Default: None. Kernels with an opaque prepacked handle
  (fbgemm, oneDNN, CPU int4) keep it in ``_cpu_ops.PREPACK_CACHE`` instead, keyed by the weight
  tensor, so their ops take plain tensors only and trace under torch.compile / torch.export;
  their ``prepare`` just warms that cache.
- ``linear(x2d, packed, runtime, bias) -> Tensor``: the fast path on a 2-D [M, K] activation,
  returns [M, N] in x's dtype. ``packed`` may hold more keys than ``quantize`` made (a finalized
  layer passes its whole buffer dict, bias included, to save building a dict per call).
- ``reference(x2d, packed, bias) -> Tensor``: plain-PyTorch math of exactly what the kernel
  computes (same rounding of activations), used by tests and as documentation.
- ``matmul_part(x2d, packed, runtime, bias) -> Callable[[], Tensor] | None``: for dynamic-activation
  schemes, a closure that runs the matmul alone on an activation quantized up front (the
  `interpolate` cost model's t_mm); None for the others.

>>> from autoquant.candidates import get_family
>>> c = get_family("float")(kernel="aten")
>>> layer = c.build(torch.randn(4, 8), None)
>>> layer(torch.randn(3, 8)).shape
torch.Size([3, 4])
"""

from __future__ import annotations

import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from ..keys import OpShape, canonical_json
from ._cpu_ops import tracing as _tracing

# Eager-path test of every layer call: ``is_dynamo_compiling`` is one Python frame returning False
# (``is_compiling`` is two), and dynamo folds it to True; everything else that runs this Python
# while tracing (torch.export non-strict, fake tensors, make_fx) has a dispatch mode on the stack.
_is_compiling = torch.compiler.is_dynamo_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
# nn.Module's process-wide hook registries (torch.nn.modules.module.register_module_forward_hook
# and friends fill them in place; torch never rebinds them): QuantizedLinear.__call__ takes its
# shortcut only while all four are empty, as nn.Module.__call__ does.
_G_FWD_PRE, _G_FWD = _nn_module._global_forward_pre_hooks, _nn_module._global_forward_hooks
_G_BWD_PRE, _G_BWD = _nn_module._global_backward_pre_hooks, _nn_module._global_backward_hooks
# Attributes QuantizedLinear's shortcut state is made from: setting any of them rebuilds it.
_HOT_INPUTS = frozenset({"_eager", "act_dtype", "tuned_m", "in_features", "forward", "_compiled_call_impl"})

__all__ = ["Candidate", "QuantizedLinear", "candidate_from_json", "families", "get_family", "register"]

_REGISTRY: dict[str, type[Candidate]] = {}


def register(cls: type[Candidate]) -> type[Candidate]:
    """Class decorator: make a family findable by its `family` name."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a frozen dataclass to be a candidate family")
    if cls.family in _REGISTRY and _REGISTRY[cls.family] is not cls:
        raise ValueError(f"candidate family {cls.family!r} is registered twice")
    _REGISTRY[cls.family] = cls
    return cls


def get_family(name: str) -> type[Candidate]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown candidate family {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def families() -> dict[str, type[Candidate]]:
    return dict(_REGISTRY)


def candidate_from_json(family: str, params: str | dict) -> Candidate:
    """Rebuild a candidate from its family name and params (JSON text or dict), validating them."""
    cls = get_family(family)
    data = json.loads(params) if isinstance(params, str) else dict(params)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"candidate {family!r} has no params {sorted(unknown)}; it takes {sorted(names)}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class Candidate(ABC):
    """Base of every family. Subclasses are ``@register``-ed frozen dataclasses whose fields are
    the params; every family has a ``kernel`` field naming the implementation."""

    family: ClassVar[str] = ""
    version: ClassVar[int] = 1
    # True for schemes that quantize activations at run time: `interpolate` applies to them.
    dynamic_activation: ClassVar[bool] = False
    # Position in the fixed tie-break order (lower wins a tie); float baseline is 0.
    order: ClassVar[int] = 100
    # Documented accuracy vs F.linear (float32 math), for tests: min SQNR in dB on random data.
    min_sqnr_db: ClassVar[float] = 0.0
    # Whether this candidate computes exactly what the float baseline does (no quantization).
    lossless: ClassVar[bool] = False

    kernel: str

    # ---- identity -------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params_json(self) -> str:
        return canonical_json(self.params())

    @property
    def name(self) -> str:
        """Human label, e.g. 'int4_weight_only(group_size=64, kernel=tinygemm_cpu)'."""
        inner = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.family}({inner})"

    @property
    def traceable(self) -> bool:
        """Whether torch.compile can trace `linear` (and inductor lower it). Every built-in kernel
        can (opaque handles hide behind the plain-tensor ops of ``_cpu_ops``); a family that
        cannot returns False and then runs as an eager island inside a compiled model (a graph
        break)."""
        return True

    @property
    def weight_format(self) -> str | None:
        """Name of the packed layout, where two kernels of different families can read the same
        packed tensors (for M-dispatch). None: not shareable."""
        return None

    @property
    def prepack_kind(self) -> str | None:
        """The ``_cpu_ops.PREPACK_CACHE`` kind of the opaque handle this kernel reads instead of its
        plain weight buffer (the handle is anchored on that buffer), or None: it reads its
        buffers. The tuner's cold timer counts and copies what a call reads."""
        return None

    # ---- protocol ---------------------------------------------------------------------------
    @abstractmethod
    def supports(self, device: torch.device, op: OpShape) -> str | None: ...

    @abstractmethod
    def quantize(self, weight: Tensor) -> dict[str, Tensor]: ...

    def prepare(self, packed: dict[str, Tensor]) -> Any:
        return None

    @abstractmethod
    def linear(self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None) -> Tensor: ...

    @abstractmethod
    def reference(self, x: Tensor, packed: dict[str, Tensor], bias: Tensor | None) -> Tensor: ...

    def matmul_part(
        self, x: Tensor, packed: dict[str, Tensor], runtime: Any, bias: Tensor | None
    ) -> Callable[[], Tensor] | None:
        return None

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        """Optional eager-mode fast path of a finalized layer: a closure ``f(x) -> y`` over the
        layer's buffer dict (read at call time; bias under "bias") for an `x` of `dtype` with any
        number of leading dims and any strides, computing exactly what ``linear`` does on the
        folded 2-D input with fewer Python frames. None: the layer calls ``linear``. Never used
        while traced. If it raises, the layer's generic path runs instead."""
        return None

    # ---- helpers built on the protocol ------------------------------------------------------
    def build(self, weight: Tensor, bias: Tensor | None, packed: dict[str, Tensor] | None = None) -> QuantizedLinear:
        """The finalized layer for `weight` [N, K] (and `bias` [N] or None). `packed`: this very
        weight already quantized by a candidate of the same ``weight_format``, to share (the
        tuner builds an op's candidates side by side: one int8 copy serves every int8 kernel)."""
        if packed is None:
            with torch.no_grad():
                packed = self.quantize(weight.detach())
        b = None if bias is None else bias.detach().clone()
        return QuantizedLinear(self, packed, b, in_features=weight.shape[1], out_features=weight.shape[0],
                               act_dtype=weight.dtype)


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

    def __call__(self, x: Any) -> Any:
        # Eager shortcut. nn.Module.__call__ spends two Python frames (_wrapped_call_impl,
        # _call_impl), a tracing-state query, eight hook tests and forward's own frame before
        # the kernel: 4-5 us per call here, as much as a small kernel. Where it would do nothing
        # but call forward (no hooks on this layer or process-wide, forward not replaced, not
        # compiled in place) and x is an eager tensor of the tuned dtype, the kernel's closure
        # runs from here. Traced (torch.compile inlines this method and folds is_dynamo_compiling;
        # torch.export, fake tensors and make_fx run under a dispatch mode): nn.Module.__call__.
        hot = self._hot
        if hot is not None and not (_G_FWD_PRE or _G_FWD or _G_BWD_PRE or _G_BWD or _is_compiling()
                                    or _dispatch_depth()):
            fast, dtype, fpre, fwd, bpre, bwd, tuned, k = hot
            if x.dtype is dtype and not (fpre or fwd or bpre or bwd):
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
        # Eager fast path (what __call__ does itself when no hook is set): one closure over the
        # buffers (any rank and strides), when the kernel has one and x has the tuned dtype.
        fast = self._eager
        if fast is not None and x.dtype is self.act_dtype and not (_is_compiling() or _dispatch_depth()):
            try:
                y = fast(x)
            except Exception:  # noqa: BLE001 - the generic path says what is wrong, or runs it
                return self._general(x)
            if self.tuned_m:
                m = x.numel() // self.in_features
                if m not in self.tuned_m:
                    self._note_unseen(m)
            return y
        # [M, K] contiguous in the tuned dtype: the kernel directly. The buffer dict itself is
        # the packed state (plus "bias"): no dict built per call.
        if x.dtype == self.act_dtype and x.dim() == 2 and x.is_contiguous() and x.shape[1] == self.in_features:
            if self.tuned_m and not _tracing() and x.shape[0] not in self.tuned_m:
                self._note_unseen(x.shape[0])
            buffers = self._buffers
            return self._linear(x, buffers, self._runtime, buffers["bias"])
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
        if self.tuned_m and not _tracing() and x2.shape[0] not in self.tuned_m:
            self._note_unseen(x2.shape[0])
        y = self._kernel(x2)
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
