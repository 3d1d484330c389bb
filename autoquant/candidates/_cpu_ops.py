"""Opaque CPU ops over plain tensors for the kernels that need a prepacked weight.

fbgemm hands back its prepacked weight as a TorchScript object that dynamo cannot trace (it has no
``__obj_flatten__``, so it cannot be a fake-able module constant either) and export cannot
serialize, and inductor's lowering of ``mkldnn._linear_pointwise`` / ``onednn.qlinear_pointwise``
insists on weights it packed itself. So each such kernel is one op in the ``autoquant`` namespace
(a ``torch.library.Library`` definition with a CPU kernel) whose arguments are the layer's plain
buffers (int8 / fp16 / packed-int4 weight, scales), with a fake impl for shapes and dtypes::

    autoquant::cpu_onednn_linear(x, w, bias?) -> y                    x.dtype == w.dtype
    autoquant::cpu_fbgemm_fp16_linear(x, w_fp16) -> y float32         x float32
    autoquant::cpu_fbgemm_int8_linear(x, w_int8, w_scale) -> y float32   x float32
    autoquant::cpu_onednn_qlinear(x_u8, x_zero_point, w_int8, w_scale) -> y float32 (acc * w_scale)
    autoquant::cpu_int4pack_mm(x, w_int4, scales_and_zeros, group_size) -> y x.dtype

torch.compile and torch.export see one opaque node per layer (no graph break, nothing for inductor
to mis-lower), and an exported program holds only the portable packed tensors: the CPU-specific
layouts are rebuilt where it runs.

The prepacked handle lives in a process-level :class:`PrepackCache`, keyed by the identity of the
weight tensor. A layer's ``prepare()`` fills it with its buffers; the op looks the handle up and
rebuilds it on a miss (a loaded or exported model, a weight changed in place by
``load_state_dict``: its ``_version`` moves). An entry dies with the weight tensor it was built
for (``weakref.finalize``), so a freed layer frees its prepack.

Memory (runtime state, never saved; measured from RSS by benchmarks/bench_memory.py, whose
numbers these are). Each of these holds the weight a second time next to the plain buffers,
because the plain buffers are what a checkpoint saves and what other kernels / devices read:

- onednn (float): the reordered weight, 1.0x the weight's bytes.
- fbgemm_fp16: fbgemm's packed fp16 matrix, 1.0x the fp16 weight.
- fbgemm int8: the packed int8 matrix (+ column offsets), 1.0-1.1x the int8 bytes.
- onednn int8: the reordered int8 matrix (+ zero points), 1.0-1.3x the int8 bytes.
- int4 tinygemm_cpu: the CPU int4 layout, 0.8-0.95x the state (1.0x the packed int4 bytes,
  scales excluded). It depends on the CPU's vector width, so it cannot be what is saved.
  Building it unpacks to int32 [N, K] for a moment: a transient 8x the int4 bytes per layer.
The copy could go only by deriving the portable buffers from the prepack at save time (fbgemm and
oneDNN can unpack), which would make a finalized layer unable to move across devices or kernels;
not done. int8 weight-only (int8pack) keeps no copy (its runtime state is the scales per float
dtype), so it is the int8 scheme to pick where memory is the constraint.

In eager mode the layers call the C++ kernels from closures (``eager_*`` below), skipping even the
dispatcher's round trip into the Python body; under torch.compile / torch.export, or when a
dispatch mode is active (fake tensors), they go through the registered op. Each op has two
kernels: the Python body here (CompositeExplicitAutograd: it serves every device where nothing
more specific is registered) and, once ``_cpu_native`` has built ``_cpu_ops.cpp`` (the first
trace or registered call does it), a C++ kernel on the CPU key that does the same call without entering Python,
reading a mirror of this cache (``_native_put`` / ``_native_evict`` keep it in step).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..primitives import ACT_EPS, unpack_int4_lo_first
from . import _cpu_native
from ._util import quantized_engine

__all__ = [
    "PREPACK_CACHE",
    "PrepackCache",
    "c_op",
    "fbgemm_fp16_linear",
    "fbgemm_int8_linear",
    "int4pack_mm",
    "onednn_linear",
    "onednn_qlinear",
    "prepack",
    "tracing",
]


# ---- the prepack cache ----------------------------------------------------------------------------
def _version(t: Tensor) -> int:
    """In-place writes bump a tensor's version; inference tensors have none (they cannot be written
    outside inference mode), so they count as never changed."""
    try:
        return t._version
    except RuntimeError:
        return -1


class _Entry:
    """A handle and what it was built from. The anchor (first source) is checked by data pointer
    (catches ``.data = other``) and version (catches in-place writes such as ``load_state_dict``);
    its identity is the key, and a dead anchor's entry is evicted by its finalizer before its id
    can be reused. Other sources are also held by weak reference: a new tensor allocated where a
    dead one lived would otherwise match on pointer and version alone."""

    __slots__ = ("handle", "nbytes", "others", "ptr", "tensor_bytes", "version")

    def __init__(self, handle: Any, sources: tuple[Tensor, ...]) -> None:
        self.handle = handle
        # Tensor handles by their storage; fbgemm's are opaque: about the anchor's bytes (1.0-1.1x).
        parts = handle if isinstance(handle, tuple) else (handle,)
        self.tensor_bytes = sum(_tensor_bytes(h) for h in parts if isinstance(h, Tensor))
        self.nbytes = self.tensor_bytes or sources[0].nbytes
        self.ptr = sources[0].data_ptr()
        self.version = _version(sources[0])
        self.others = tuple((weakref.ref(t), t.data_ptr(), _version(t)) for t in sources[1:])

    def others_match(self, others: tuple[Tensor, ...]) -> bool:
        if len(others) != len(self.others):
            return False
        for (ref, ptr, version), t in zip(self.others, others):
            if ref() is not t or ptr != t.data_ptr() or version != _version(t):
                return False
        return True


class PrepackCache:
    """Prepacked handles keyed by (kind, the source tensors' identity).

    ``get(kind, sources, build)`` returns the handle built by ``build(*sources)`` for exactly these
    tensor objects in their current contents, building it on a miss. The first source is the
    anchor: its death (garbage collection) evicts the entry, so a handle lives as long as the
    layer's weight buffer, and a rebuilt one (after an in-place write) replaces the old one.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._lock = threading.Lock()
        self.builds = 0  # how many handles were built (tests check that warm calls build none)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, kind: str, sources: tuple[Tensor, ...], build: Callable[..., Any]) -> Any:
        # Runs on every eager call of a prepacked kernel, right after a large C++ kernel has
        # evicted the interpreter's caches (each bytecode then costs 3-4x its warm time): kept to
        # a few attribute reads, the common one- and two-source cases written out.
        anchor = sources[0]
        key = (kind, id(anchor))
        entry = self._entries.get(key)
        if entry is not None and entry.version == _version(anchor) and entry.ptr == anchor.data_ptr():
            others = entry.others
            if len(sources) == 1:
                if not others:
                    return entry.handle
            elif len(sources) == 2 and len(others) == 1:
                ref, ptr, version = others[0]
                t = sources[1]
                if ref() is t and ptr == t.data_ptr() and version == _version(t):
                    return entry.handle
            elif entry.others_match(sources[1:]):
                return entry.handle
        return self._insert(key, sources, build)

    def _insert(self, key: tuple[str, int], sources: tuple[Tensor, ...], build: Callable[..., Any]) -> Any:
        entry = _Entry(build(*sources), sources)
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = entry
            self.builds += 1
        if old is None:
            # One finalizer per anchor object: a rebuild after an in-place write reuses it (the
            # old entry under this key can only be this anchor's: a dead anchor's is evicted).
            # Not at exit: nothing needs freeing then, and torch may be half torn down.
            weakref.finalize(sources[0], self._evict, key, sources[0]._cdata).atexit = False
        if _cpu_native.loaded():
            _mirror(key[0], sources, entry.handle)  # the C++ kernels' copy never goes stale
        return entry.handle

    def _evict(self, key: tuple[str, int], anchor_impl: int) -> None:
        # Runs while the anchor is being freed, before its id can belong to another object.
        with self._lock:
            self._entries.pop(key, None)
        if _cpu_native.loaded():
            torch.ops.autoquant._native_evict(_cpu_native.KINDS[key[0]], anchor_impl)

    def nbytes(self) -> int:
        """Bytes of the cached handles that are tensors (oneDNN, int4); fbgemm's are opaque."""
        return sum(e.tensor_bytes for e in list(self._entries.values()))

    def held_for(self, tensors: Iterable[Tensor], kind: str | None = None) -> int:
        """Bytes of the handles anchored on any of `tensors` (what a layer holds beyond its
        buffers); only those of `kind` when given (tensors shared by layers of several kinds)."""
        ids = {id(t) for t in tensors}
        return sum(e.nbytes for (k, anchor), e in list(self._entries.items())
                   if anchor in ids and (kind is None or k == kind))

    def anchors(self, tensors: Iterable[Tensor], kind: str) -> list[Tensor]:
        """Those of `tensors` that a handle of `kind` is built from (keyed by)."""
        keys = {a for k, a in list(self._entries) if k == kind}
        return [t for t in tensors if id(t) in keys]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        if _cpu_native.loaded():
            torch.ops.autoquant._native_clear()


def _tensor_bytes(t: Tensor) -> int:
    if t.layout == torch._mkldnn:  # type: ignore[attr-defined]
        # An opaque oneDNN tensor reports no storage: count its logical elements.
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()


PREPACK_CACHE = PrepackCache()


# Bound once: two attribute lookups fewer per call (dynamo knows the function, however it is named).
_is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack


def tracing() -> bool:
    """Whether this call is being traced (torch.compile, torch.export) or runs under a dispatch
    mode (fake tensors, ...): then the registered op must be called, not its Python body.
    ``is_compiling()`` comes first: dynamo folds it to True and never looks at the second test."""
    return _is_compiling() or _dispatch_depth() > 0


@functools.cache
def c_op(qualname: str) -> Callable[..., Any]:
    """The C++ callable behind the default overload of ``torch.ops`` op `qualname` ("ns::name").

    What eager calls use instead of ``torch.ops.ns.name(...)``: the Python ``__call__`` of an op
    whose schema takes a TorchBind object (fbgemm's prepacked weights) walks every argument with
    pytree looking for fake script objects, and any other overload's adds one Python frame. Eager
    calls pass real handles, so the check has nothing to find. (The larger per-call cost of such
    ops, the ``__torch_function__`` lookup on the handle, is in the C++ entry too: see
    ``_no_torch_function``.) Traced code never comes here (it calls the registered custom ops).
    Falls back to the overload itself where torch has no ``_op``."""
    ns, name = qualname.split("::")
    overload = getattr(getattr(torch.ops, ns), name).default
    return getattr(overload, "_op", overload)


# fbgemm's ops take the prepacked handle, a TorchScript object. Calling such an op from Python
# checks every argument for ``__torch_function__``; the handle has none, and ScriptObject's
# ``__getattr__`` answers a missing name by throwing a C++ exception (turned into a Python
# AttributeError and dropped): on every call, eager closures and registered op alike, and at small
# shapes it costs more than fbgemm's int8 kernel itself (``getattr(handle, "__torch_function__",
# None)`` alone shows it; benchmarks/bench_overhead.py's fbgemm rows, before and after). With
# torch-function handling of subclasses off for the call (``DisableTorchFunctionSubclass``) the
# check is skipped: the same kernel call, no exception. Only for an exact ``Tensor`` x (a
# subclass's own ``__torch_function__`` must still run), and inside the op bodies, where the
# dispatcher has done any such handling already. Torch-function modes are unaffected.
_no_torch_function = torch._C.DisableTorchFunctionSubclass
_Tensor = torch.Tensor


# ---- builders (what prepare() and a cache miss run) -----------------------------------------------
def _build_onednn(w: Tensor) -> Tensor:
    # batch-size hint None: a layout independent of M (see float.py).
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def _build_fbgemm_fp16(w: Tensor) -> Any:
    with quantized_engine("fbgemm"):
        return torch.ops.quantized.linear_prepack_fp16(w.float(), None)


def _build_fbgemm_int8(w_int8: Tensor, w_scale: Tensor) -> Any:
    import warnings

    with warnings.catch_warnings():
        # Quantized-tensor creation is deprecated in favour of torchao; it is the only way into
        # fbgemm's prepack, and the qint8 tensor lives only inside the handle.
        warnings.simplefilter("ignore")
        zero_points = torch.zeros(w_int8.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(w_int8, w_scale.double(), zero_points, 0)
    with quantized_engine("fbgemm"):
        return torch.ops.quantized.linear_prepack(qw, None)


def _build_onednn_int8(w_int8: Tensor, w_scale: Tensor) -> tuple[Tensor, Tensor]:
    # w_scale is not part of the handle (it is passed per call) but is a source, so that a new
    # scale tensor never meets a stale entry by accident.
    return torch.ops.onednn.qlinear_prepack(w_int8, None), torch.zeros(w_int8.shape[0], dtype=torch.long)


def _build_int4(w_int4: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4_lo_first(w_int4), 1)


_BUILDERS: dict[str, tuple[Callable[..., Any], int]] = {
    # kind -> (builder, how many leading source tensors it reads)
    "onednn": (_build_onednn, 1),
    "fbgemm_fp16": (_build_fbgemm_fp16, 1),
    "fbgemm_int8": (_build_fbgemm_int8, 2),
    "onednn_int8": (_build_onednn_int8, 2),
    "int4pack": (_build_int4, 1),
}


def prepack(kind: str, *sources: Tensor) -> None:
    """Warm the cache for `sources` (called from a candidate's ``prepare``); CPU tensors only."""
    if sources[0].device.type != "cpu":
        return  # CPU kernels: supports() already says why; the op refuses other devices
    build, _ = _BUILDERS[kind]
    PREPACK_CACHE.get(kind, sources, build)


# ---- the ops: Python bodies, registered ops, fake impls -------------------------------------------
# What a compiled or exported graph calls, once per layer call. Each body goes straight to the C++
# kernel (one cache lookup, no helper frame).
def _onednn_linear_impl(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    handle = PREPACK_CACHE.get("onednn", (w,), _build_onednn)
    return c_op("mkldnn::_linear_pointwise")(x, handle, bias, "none", [], "")


def _fbgemm_fp16_impl(x: Tensor, w: Tensor) -> Tensor:
    handle = PREPACK_CACHE.get("fbgemm_fp16", (w,), _build_fbgemm_fp16)
    with _no_torch_function():  # see _no_torch_function: no exception per call
        return c_op("quantized::linear_dynamic_fp16")(x, handle)


def _fbgemm_int8_impl(x: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    # reduce_range=True: 7-bit activation codes (int16 pair saturation on AVX2, see int8_dynamic.py).
    handle = PREPACK_CACHE.get("fbgemm_int8", (w_int8, w_scale), _build_fbgemm_int8)
    with _no_torch_function():  # see _no_torch_function: no exception per call
        return c_op("quantized::linear_dynamic")(x, handle, True)


def _onednn_qlinear_impl(x_u8: Tensor, x_zero_point: int, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    packed, w_zp = PREPACK_CACHE.get("onednn_int8", (w_int8, w_scale), _build_onednn_int8)
    # x_scale 1.0: the caller applies the per-token scales after (see int8_dynamic.py).
    return c_op("onednn::qlinear_pointwise")(x_u8, 1.0, x_zero_point, packed, w_scale, w_zp,
                                             None, 1.0, 0, torch.float32, "none", [], "")


def _int4pack_impl(x: Tensor, w_int4: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    handle = PREPACK_CACHE.get("int4pack", (w_int4,), _build_int4)
    return c_op("aten::_weight_int4pack_mm_for_cpu")(x, handle, group_size, scales_and_zeros)


# Registered with a plain ``torch.library.Library``, not ``torch.library.custom_op``:
# custom_op adds a Python autograd kernel that every call crosses, grad mode on or off (the compiled
# model's per-layer cost: benchmarks/bench_compile.py). The input gradient is QuantizedLinear's (an
# autograd.Function around the kernel, only where one is needed, see grad.py); called on its own with inputs that require grad, an op
# gives none (torch warns, as for any op without an autograd formula). The schemas are those
# custom_op inferred before (exported programs name these ops). The Python bodies are registered
# as CompositeExplicitAutograd, not CPU, so that the C++ kernels (_cpu_ops.cpp) can take the CPU
# key without overriding a kernel (which the dispatcher reports on stderr); composite-explicit
# kernels are not decomposed by torch.export and get no autograd formula, as before.
_LIB = torch.library.Library("autoquant", "FRAGMENT")  # the Triton ops share the namespace
_SCHEMAS = {
    "cpu_onednn_linear": ("(Tensor x, Tensor w, Tensor? bias) -> Tensor", _onednn_linear_impl),
    "cpu_fbgemm_fp16_linear": ("(Tensor x, Tensor w) -> Tensor", _fbgemm_fp16_impl),
    "cpu_fbgemm_int8_linear": ("(Tensor x, Tensor w_int8, Tensor w_scale) -> Tensor", _fbgemm_int8_impl),
    "cpu_onednn_qlinear": ("(Tensor x_u8, SymInt x_zero_point, Tensor w_int8, Tensor w_scale) -> Tensor",
                           _onednn_qlinear_impl),
    "cpu_int4pack_mm": ("(Tensor x, Tensor w_int4, Tensor scales_and_zeros, SymInt group_size) -> Tensor",
                        _int4pack_impl),
}


def _registered(body: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`body` as the op's registered kernel: its first call in a process also tries to load the C++
    kernels, so that a graph nothing traced here (a ``torch.export.load``-ed program) gets them
    from its second call on, as a traced one does. Eager layers call the bodies directly, never
    this (no build while tuning); once the C++ kernels load, the CPU key no longer comes here."""
    def kernel(*args: Any) -> Tensor:
        _cpu_native.load()  # tried once per process: later calls return at once
        return body(*args)

    kernel.__name__ = body.__name__
    return kernel


for _name, (_schema, _impl) in _SCHEMAS.items():
    _LIB.define(_name + _schema)
    _LIB.impl(_name, _registered(_impl), "CompositeExplicitAutograd")

# What the C++ kernels (_cpu_ops.cpp) call when their mirror of PrepackCache misses: get or build
# the handle here (PrepackCache stays the one owner: its builds, bytes and finalizers) and mirror it.
_KIND_NAMES = {number: name for name, number in _cpu_native.KINDS.items()}


def _mirror(kind: str, sources: Iterable[Tensor], handle: Any) -> None:
    with _no_torch_function():  # fbgemm's handle: no thrown lookup (see _no_torch_function)
        c_op("autoquant::_native_put")(_cpu_native.KINDS[kind], list(sources), handle)


def _cpu_prepack_impl(kind: int, sources: list[Tensor]) -> None:
    name = _KIND_NAMES[kind]
    handle = PREPACK_CACHE.get(name, tuple(sources), _BUILDERS[name][0])
    _mirror(name, sources, handle)  # also after a hit here: built before the C++ kernels loaded


_LIB.define("_cpu_prepack(int kind, Tensor[] sources) -> ()")
_LIB.impl("_cpu_prepack", _cpu_prepack_impl, "CPU")

_onednn_linear_op = torch.ops.autoquant.cpu_onednn_linear.default
_fbgemm_fp16_op = torch.ops.autoquant.cpu_fbgemm_fp16_linear.default
_fbgemm_int8_op = torch.ops.autoquant.cpu_fbgemm_int8_linear.default
_onednn_qlinear_op = torch.ops.autoquant.cpu_onednn_qlinear.default
_int4pack_op = torch.ops.autoquant.cpu_int4pack_mm.default


def _out(x: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    # Every fake impl comes here: the first trace of one of these ops (torch.compile, torch.export)
    # is when the C++ kernels are worth having; tried once per process (see _cpu_native).
    _cpu_native.load()
    return x.new_empty((x.shape[0], n), dtype=dtype)


@torch.library.register_fake("autoquant::cpu_onednn_linear", lib=_LIB)
def _(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return _out(x, w.shape[0], x.dtype)


@torch.library.register_fake("autoquant::cpu_fbgemm_fp16_linear", lib=_LIB)
def _(x: Tensor, w: Tensor) -> Tensor:
    return _out(x, w.shape[0], torch.float32)


@torch.library.register_fake("autoquant::cpu_fbgemm_int8_linear", lib=_LIB)
def _(x: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    return _out(x, w_int8.shape[0], torch.float32)


@torch.library.register_fake("autoquant::cpu_onednn_qlinear", lib=_LIB)
def _(x_u8: Tensor, x_zero_point: int, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    return _out(x_u8, w_int8.shape[0], torch.float32)


@torch.library.register_fake("autoquant::cpu_int4pack_mm", lib=_LIB)
def _(x: Tensor, w_int4: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    return _out(x, w_int4.shape[0], x.dtype)


# ---- what the candidates call: the op when traced, its body in eager mode -------------------------
# The eager branches repeat the op bodies inline: every Python frame costs ~0.2 us on this CPU.
def onednn_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN linear of `x` [M, K] with the plain weight `w` [N, K] (same dtype), bias fused."""
    if tracing():
        return _onednn_linear_op(x, w, bias)
    handle = PREPACK_CACHE.get("onednn", (w,), _build_onednn)
    return c_op("mkldnn::_linear_pointwise")(x, handle, bias, "none", [], "")


def fbgemm_fp16_linear(x: Tensor, w: Tensor) -> Tensor:
    """float32 `x` [M, K] times the fp16 weight `w` [N, K], float32 accumulation and output."""
    if tracing():
        return _fbgemm_fp16_op(x, w)
    if type(x) is _Tensor:  # what the op body runs
        return _fbgemm_fp16_impl(x, w)
    handle = PREPACK_CACHE.get("fbgemm_fp16", (w,), _build_fbgemm_fp16)
    return c_op("quantized::linear_dynamic_fp16")(x, handle)  # a subclass keeps its __torch_function__


def fbgemm_int8_linear(x: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    """fbgemm dynamic int8 linear (x per tensor, 7-bit; weight per channel), float32 output."""
    if tracing():
        return _fbgemm_int8_op(x, w_int8, w_scale)
    if type(x) is _Tensor:  # what the op body runs
        return _fbgemm_int8_impl(x, w_int8, w_scale)
    handle = PREPACK_CACHE.get("fbgemm_int8", (w_int8, w_scale), _build_fbgemm_int8)
    return c_op("quantized::linear_dynamic")(x, handle, True)  # a subclass keeps its __torch_function__


def onednn_qlinear(x_u8: Tensor, x_zero_point: int, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    """float32 ``(x_u8 - x_zero_point) @ w_int8.T * w_scale`` through oneDNN."""
    if tracing():
        return _onednn_qlinear_op(x_u8, x_zero_point, w_int8, w_scale)
    return _onednn_qlinear_impl(x_u8, x_zero_point, w_int8, w_scale)


def int4pack_mm(x: Tensor, w_int4: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """CPU tinygemm int4 matmul over the portable ``w_int4`` (qparams in x's dtype)."""
    if tracing():
        return _int4pack_op(x, w_int4, scales_and_zeros, group_size)
    handle = PREPACK_CACHE.get("int4pack", (w_int4,), _build_int4)
    return c_op("aten::_weight_int4pack_mm_for_cpu")(x, handle, group_size, scales_and_zeros)


# ---- eager fast paths: one closure per finalized layer ---------------------------------------------
# A finalized layer in eager mode calls one of these closures instead of going through
# candidate.linear -> kernel helper -> op wrapper (each Python frame costs ~0.5-1 us right after a
# large C++ kernel). The closure calls the C++ op itself (`c_op`), reads the layer's buffer dict at
# call time, so a buffer replaced by load_state_dict(assign=True) is seen; the prepack cache still
# checks identity and version. The caller guarantees: eager mode (not traced), x in the dtype the
# closure was made for; any number of leading dims and any strides (the oneDNN, fbgemm and aten
# ops fold them themselves; the int4, int8pack and oneDNN int8 closures reshape). The factories
# return None where the layer's dtypes or device do not line up exactly (the generic path runs).
# A closure must not refer to itself (e.g. to recurse on the folded input): that is a reference
# cycle, and the layer's buffers would then outlive it until the garbage collector runs.
def _on_cpu(*ts: Tensor | None) -> bool:
    return all(t is None or t.device.type == "cpu" for t in ts)


class _Memo:
    """The last handle a layer's closure used, and the exact source tensors it was valid for: their
    identities, the anchor's (weight's) version and data pointer, the other sources' versions. A
    hit costs a few attribute reads instead of a cache lookup. A miss (new buffer, in-place write,
    ``.data`` swap of the weight, inference tensors) asks PREPACK_CACHE, which checks everything.
    Each closure writes the hit test out inline rather than calling a method: a call is one more
    Python frame per layer call, which is what these closures exist to save (and each tensor
    attribute read costs ~0.3 us right after a kernel, so the test reads only what can change)."""

    __slots__ = ("handle", "sources", "stamp")

    def __init__(self) -> None:
        self.handle: Any = None
        self.sources: tuple[Tensor, ...] = ()
        self.stamp: tuple[int, ...] = ()

    def refill(self, kind: str, sources: tuple[Tensor, ...], build: Callable[..., Any]) -> Any:
        handle = PREPACK_CACHE.get(kind, sources, build)
        try:
            stamp = (sources[0]._version, sources[0].data_ptr(), *(t._version for t in sources[1:]))
        except RuntimeError:  # inference tensors have no version: always ask the cache
            self.handle, self.sources, self.stamp = None, (), ()
            return handle
        self.handle, self.sources, self.stamp = handle, sources, stamp
        return handle


def eager_aten_linear(buffers: dict[str, Tensor], dtype: torch.dtype,
                      compute: torch.dtype | None = None) -> Callable[[Tensor], Tensor] | None:
    """F.linear on the layer's own weight and bias (the float baseline as a finalized layer); with
    `compute` set, x and the bias are cast to it around the kernel and the output cast back."""
    cd = compute or dtype
    w, b = buffers["weight"], buffers.get("bias")
    if w.dtype != cd or (b is not None and b.dtype not in (dtype, cd)):
        return None
    # What F.linear is. A strided x is made contiguous first, as the generic path does (BLAS on a
    # transposed operand sums in another order: the same layer would give other low bits).
    linear = torch._C._nn.linear
    if cd == dtype:
        def run(x: Tensor) -> Tensor:
            return linear(x if x.is_contiguous() else x.contiguous(), buffers["weight"], buffers["bias"])
        return run

    def run_cast(x: Tensor) -> Tensor:
        bias = buffers["bias"]
        xc = x.to(cd)
        xc = xc if xc.is_contiguous() else xc.contiguous()
        return linear(xc, buffers["weight"], None if bias is None else bias.to(cd)).to(dtype)

    return run_cast


def eager_onednn_linear(buffers: dict[str, Tensor], dtype: torch.dtype,
                        compute: torch.dtype | None = None) -> Callable[[Tensor], Tensor] | None:
    cd = compute or dtype
    w, b = buffers["weight"], buffers.get("bias")
    if w.dtype != cd or (b is not None and b.dtype not in (dtype, cd)) or not _on_cpu(w, b):
        return None
    op, memo, cast = c_op("mkldnn::_linear_pointwise"), _Memo(), cd != dtype

    def run(x: Tensor) -> Tensor:
        w = buffers["weight"]
        src = memo.sources
        if src and w is src[0] and memo.stamp == (w._version, w.data_ptr()):
            h = memo.handle
        else:
            h = memo.refill("onednn", (w,), _build_onednn)
        if not cast:
            return op(x, h, buffers["bias"], "none", [], "")
        bias = buffers["bias"]
        return op(x.to(cd), h, None if bias is None else bias.to(cd), "none", [], "").to(dtype)

    return run


def eager_fbgemm_fp16(buffers: dict[str, Tensor], dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
    """fbgemm fp16 (float32 activations): x of another float dtype is cast to float32 and the
    output back, the bias added in float32 before that."""
    w, b = buffers["weight"], buffers.get("bias")
    f32 = torch.float32
    if not dtype.is_floating_point or (b is not None and b.dtype != dtype) or not _on_cpu(w, b):
        return None
    op, memo, cast = c_op("quantized::linear_dynamic_fp16"), _Memo(), dtype != f32
    plain, no_tf = _Tensor, _no_torch_function

    def run(x: Tensor) -> Tensor:
        w = buffers["weight"]
        src = memo.sources
        if src and w is src[0] and memo.stamp == (w._version, w.data_ptr()):
            h = memo.handle
        else:
            h = memo.refill("fbgemm_fp16", (w,), _build_fbgemm_fp16)
        if cast:
            x = x.to(f32)
        if type(x) is plain:
            with no_tf():  # see _no_torch_function: no exception per call
                y = op(x, h)
        else:
            y = op(x, h)
        bias = buffers["bias"]
        if bias is not None:
            y = y.add_(bias)
        return y.to(dtype) if cast else y

    return run


def eager_fbgemm_int8(buffers: dict[str, Tensor], dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
    w, s, b = buffers["w_int8"], buffers["w_scale"], buffers.get("bias")
    if dtype != torch.float32 or (b is not None and b.dtype != dtype) or not _on_cpu(w, s, b):
        return None
    op, memo = c_op("quantized::linear_dynamic"), _Memo()
    plain, no_tf = _Tensor, _no_torch_function

    def run(x: Tensor) -> Tensor:
        w, s = buffers["w_int8"], buffers["w_scale"]
        src = memo.sources
        if src and w is src[0] and s is src[1] and memo.stamp == (w._version, w.data_ptr(), s._version):
            h = memo.handle
        else:
            h = memo.refill("fbgemm_int8", (w, s), _build_fbgemm_int8)
        if type(x) is plain:
            with no_tf():  # see _no_torch_function: no exception per call
                y = op(x, h, True)
        else:
            y = op(x, h, True)
        bias = buffers["bias"]
        return y if bias is None else y.add_(bias)

    return run


def eager_int4pack(buffers: dict[str, Tensor], dtype: torch.dtype, group_size: int) -> Callable[[Tensor], Tensor] | None:
    w, sz, b = buffers["w_int4"], buffers["scales_and_zeros"], buffers.get("bias")
    if sz.dtype != dtype or (b is not None and b.dtype != dtype) or not _on_cpu(w, sz, b):
        return None
    op, memo = c_op("aten::_weight_int4pack_mm_for_cpu"), _Memo()

    def run(x: Tensor) -> Tensor:
        lead = None
        if x.dim() != 2 or not x.is_contiguous():
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1]).contiguous()
        w = buffers["w_int4"]
        src = memo.sources
        if src and w is src[0] and memo.stamp == (w._version, w.data_ptr()):
            h = memo.handle
        else:
            h = memo.refill("int4pack", (w,), _build_int4)
        y = op(x, h, group_size, buffers["scales_and_zeros"])
        bias = buffers["bias"]
        if bias is not None:
            y = y.add_(bias)
        return y if lead is None else y.reshape(*lead, y.shape[-1])

    return run


def eager_int8pack(buffers: dict[str, Tensor], scales: Any, dtype: torch.dtype,
                   align: int) -> Callable[[Tensor], Tensor] | None:
    """``torch._weight_int8pack_mm`` with the scales cast to `dtype` once (`scales`, the layer's
    ``ScalesByDtype``: recast when ``w_scale`` changes); an x whose data is not `align`-byte
    aligned is copied first, and a misaligned weight is replaced once by an aligned copy (the CPU
    kernel's vector loads need both; a misaligned weight crashed the process)."""
    w, sc, b = buffers["w_int8"], buffers["w_scale"], buffers.get("bias")
    if dtype not in scales.casts or (b is not None and b.dtype != dtype) or not _on_cpu(w, sc, b):
        return None
    op = torch._weight_int8pack_mm

    def run(x: Tensor) -> Tensor:
        lead = None
        if x.dim() != 2 or not x.is_contiguous():
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1]).contiguous()
        if x.data_ptr() % align:
            x = x.clone()
        sc = buffers["w_scale"]
        stamp = scales.stamp
        if sc is not scales.source or (stamp is not None and stamp != (sc._version, sc.data_ptr())):
            scales.refill(sc)
        w = buffers["w_int8"]
        if w.data_ptr() % align:  # a zero-copy load (safetensors, mmap) can hand a misaligned weight:
            w = buffers["w_int8"] = w.clone()  # aligned once, in place of the layer's buffer
        y = op(x, w, scales.casts[dtype])
        bias = buffers["bias"]
        if bias is not None:
            y = y.add_(bias)
        return y if lead is None else y.reshape(*lead, y.shape[-1])

    return run


def eager_onednn_int8(buffers: dict[str, Tensor], dtype: torch.dtype, act_qmax: int,
                      x_zero_point: int) -> Callable[[Tensor], Tensor] | None:
    """oneDNN int8: per-token uint8 activation codes, ``uint8_act_per_token_offset(x, act_qmax,
    x_zero_point)`` written out here (x is float32 already; the [..., 1] scales are made once and
    serve the rescale too); the kernel returns float32 ``acc * w_scale``; then ``* x_scale +
    bias`` (as int8_dynamic does)."""
    w, s, b = buffers["w_int8"], buffers["w_scale"], buffers.get("bias")
    if dtype != torch.float32 or (b is not None and b.dtype != dtype) or not _on_cpu(w, s, b):
        return None
    op, memo = c_op("onednn::qlinear_pointwise"), _Memo()
    f32, u8, eps, round_ = torch.float32, torch.uint8, ACT_EPS, torch.round

    def run(x: Tensor) -> Tensor:
        # Any number of leading dims: the scales are per row of the last dim (keepdim), and the
        # kernel folds leading dims itself (checked bit for bit against the 2-D call).
        if not x.is_contiguous():
            x = x.contiguous()
        w, s = buffers["w_int8"], buffers["w_scale"]
        src = memo.sources
        if src and w is src[0] and s is src[1] and memo.stamp == (w._version, w.data_ptr(), s._version):
            h = memo.handle
        else:
            h = memo.refill("onednn_int8", (w, s), _build_onednn_int8)
        xs = (x.abs().amax(dim=-1, keepdim=True) / act_qmax).clamp_min(eps)
        xq = round_(x / xs).clamp_(-act_qmax, act_qmax).add_(x_zero_point).to(u8)
        y = op(xq, 1.0, x_zero_point, h[0], s, h[1], None, 1.0, 0, f32, "none", [], "").mul_(xs)
        bias = buffers["bias"]
        return y if bias is None else y.add_(bias)

    return run
