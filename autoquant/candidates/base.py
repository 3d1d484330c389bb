"""The candidate protocol (DESIGN.md section 3): families, per-kernel classes, their registry.

A candidate is a family plus typed params, the kernel choice among them: a frozen dataclass, so it
is hashable, comparable and round-trips through JSON. Families register by name.

Contract of a family (subclass of :class:`Candidate`):

- ``supports(device, op) -> str | None``: None if this kernel can run `op` on `device`, else the
  reason, kept in the report. Never raises for a device/shape it cannot handle.
- ``quantize(weight) -> dict[str, Tensor]``: the packed state, plain tensors only (int8 data, scales,
  zeros, ...) so it saves as safetensors. ``weight`` is the float [N, K] nn.Linear weight.
- Calibrated families (``calibrated = True``, e.g. int8_smooth) also read statistics of the
  activations the layer saw: ``calibrate(weight, act_absmax)`` turns the per-input-channel absmax
  (float32 [K], recorded over every call) into the family's small calibration tensors (named by
  ``calibration_keys``), and ``quantize(weight, calibration=...)`` packs them with the weight, so a
  finalized layer, a save and a plan carry them. Callers go through :meth:`Candidate.pack`, which
  raises :class:`CalibrationMissing` (naming what to pass) where neither is at hand.
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
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..keys import OpShape, canonical_json
from .quantized_linear import _WARNED_DTYPES, QuantizedLinear  # noqa: F401 - re-exported


__all__ = ["CalibrationMissing", "Candidate", "QuantizedLinear", "candidate_from_json", "families", "get_family", "register",
           "register_kernel"]

_REGISTRY: dict[str, type[Candidate]] = {}
# family class -> {kernel name -> the class implementing that kernel}
_KERNEL_CLASSES: dict[type, dict[str, type]] = {}


def register(cls: type[Candidate]) -> type[Candidate]:
    """Class decorator: make a family findable by its `family` name."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a frozen dataclass to be a candidate family")
    if cls.family in _REGISTRY and _REGISTRY[cls.family] is not cls:
        raise ValueError(f"candidate family {cls.family!r} is registered twice")
    _REGISTRY[cls.family] = cls
    return cls


def register_kernel(family_cls: type[Candidate], kernel: str) -> Callable[[type[Candidate]], type[Candidate]]:
    """Class decorator: the class implementing `kernel` of `family_cls` (a subclass of it, adding
    no fields). ``family_cls(kernel=...)`` then builds an instance of that class, so params and
    their JSON (the identity caches and plans store) stay those of the family."""
    def deco(cls: type[Candidate]) -> type[Candidate]:
        if not issubclass(cls, family_cls):
            raise TypeError(f"{cls.__name__} must subclass {family_cls.__name__} to implement one of its kernels")
        kernels = _KERNEL_CLASSES.setdefault(family_cls, {})
        if kernels.get(kernel, cls) is not cls:
            raise ValueError(f"kernel {kernel!r} of {family_cls.family!r} is registered twice")
        kernels[kernel] = cls
        cls.kernel_name = kernel
        return cls
    return deco


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


class CalibrationMissing(ValueError):
    """A calibrated candidate was asked to quantize a weight with no activation statistics."""


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
    # Whether quantize needs activation statistics (see the module doc); the packed tensors named by
    # calibration_keys are the calibration, which a plan carries so it can rebuild the layer.
    calibrated: ClassVar[bool] = False
    calibration_keys: ClassVar[tuple[str, ...]] = ()

    kernel: str
    # Set on each per-kernel class by register_kernel; None on a family class (its constructor
    # builds the class registered for the kernel asked for).
    kernel_name: ClassVar[str | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Candidate:
        # A family with one class per kernel: build the kernel's class. `kernel` is every
        # family's first field, so a positional first argument is it.
        kernels = _KERNEL_CLASSES.get(cls)
        if kernels is None:
            return super().__new__(cls)
        kernel = args[0] if args else kwargs.get("kernel", cls.__dataclass_fields__["kernel"].default)
        impl = kernels.get(kernel)
        if impl is None:
            raise ValueError(f"{cls.family}: unknown kernel {kernel!r}; expected one of {tuple(kernels)}")
        return super().__new__(impl)

    def __post_init__(self) -> None:
        if self.kernel_name is not None and self.kernel != self.kernel_name:
            raise ValueError(f"{type(self).__name__} implements kernel {self.kernel_name!r}, not {self.kernel!r}")

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

    def adds_work_to(self) -> Candidate | None:
        """The candidate whose kernel this one runs on the same shape, plus work of its own (e.g.
        a multiply of the activation), or None. Such a candidate is never faster than that one,
        so a timing that says otherwise is noise: selection floors its cost at that one's, and a
        tie between the two goes to that one whatever their accuracy (accuracy floors and the
        model-level budget can still pick this one for its accuracy)."""
        return None

    # ---- protocol ---------------------------------------------------------------------------
    @abstractmethod
    def supports(self, device: torch.device, op: OpShape) -> str | None: ...

    @abstractmethod
    def quantize(self, weight: Tensor) -> dict[str, Tensor]: ...

    def calibrate(self, weight: Tensor, act_absmax: Tensor) -> dict[str, Tensor]:
        """Calibrated families: the calibration tensors for `weight` [N, K] given the per-input-channel
        absmax of its activations (float32 [K]). Others have none."""
        return {}

    def pack(self, weight: Tensor, *, act_absmax: Tensor | None = None,
             calibration: dict[str, Tensor] | None = None, where: str = "") -> dict[str, Tensor]:
        """``quantize(weight)``, for a calibrated family with its calibration: `calibration` as given
        (from a plan), else derived from `act_absmax`; uncalibrated families ignore both. Raises
        CalibrationMissing, naming the layer (`where`), when a calibrated family has neither."""
        if not self.calibrated:
            return self.quantize(weight)
        if calibration is None:
            if act_absmax is None:
                who = f"layer {where!r}: " if where else ""
                raise CalibrationMissing(
                    f"{who}{self.name} smooths activations with statistics recorded on real inputs, and none "
                    "were given: tune with autoquant(model, example_input) (which records them), or apply a "
                    "plan saved from such a model (it carries them), or pass act_absmax= (the per-input-"
                    "channel absmax of the layer's activations, float32 [K]) where the layer is built")
            calibration = self.calibrate(weight, act_absmax)
        return self.quantize(weight, calibration=calibration)  # type: ignore[call-arg]

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

    def dequantize(self, packed: dict[str, Tensor], dtype: torch.dtype) -> Tensor | None:
        """The float32 [N, K] weight ``reference`` multiplies an activation of `dtype` by (the
        packed weight dequantized with the scales the kernel reads), for the input gradient.
        None: not written out; the layer then reads it off ``reference`` on the identity."""
        return None

    def eager(self, buffers: dict[str, Tensor], runtime: Any, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
        """Optional eager-mode fast path of a finalized layer: a closure ``f(x) -> y`` over the
        layer's buffer dict (read at call time; bias under "bias") for an `x` of `dtype` with any
        number of leading dims and any strides, computing exactly what ``linear`` does on the
        folded 2-D input with fewer Python frames. None: the layer calls ``linear``. Never used
        while traced. If it raises, the layer's generic path runs instead."""
        return None

    # ---- helpers built on the protocol ------------------------------------------------------
    def build(self, weight: Tensor, bias: Tensor | None, packed: dict[str, Tensor] | None = None, *,
              act_absmax: Tensor | None = None) -> QuantizedLinear:
        """The finalized layer for `weight` [N, K] (and `bias` [N] or None). `packed`: this very
        weight already quantized by a candidate of the same ``weight_format``, to share (the
        tuner builds an op's candidates side by side: one int8 copy serves every int8 kernel).
        `act_absmax`: the activations' per-input-channel absmax, for calibrated families (see
        :meth:`pack`); ignored by the others."""
        if packed is None:
            with torch.no_grad():
                packed = self.pack(weight.detach(), act_absmax=act_absmax)
        b = None if bias is None else bias.detach().clone()
        return QuantizedLinear(self, packed, b, in_features=weight.shape[1], out_features=weight.shape[0],
                               act_dtype=weight.dtype)
