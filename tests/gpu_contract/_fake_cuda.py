"""A CUDA device that is not there: fake tensors on "cuda", and the device facts a GPU would give.

``FakeTensorMode`` runs PyTorch's meta kernels on tensors that report device "cuda", so a CPU
machine checks what the CUDA kernels check before they launch (shapes, dtypes, strides, scale
layouts) and what every op returns. Two pieces are needed besides the mode:

- ``assumed_gpu(capability)``: the answers ``torch.cuda`` would give on that GPU (one device, that
  compute capability), for ``supports()`` and the kernels' own capability checks. While it is
  active ``torch.cuda.is_available()`` is True, so no fake tensor may be created inside it (fake
  CUDA tensors then try to initialise the real device): ``supports_on`` wraps exactly the
  ``supports()`` calls.
- Python indexing (``t[rows]``, ``t[:, None]``, ``t[..., 0] = v``) and the bindings of
  ``contiguous``, ``copy_`` and ``to(device)`` enter a device guard in C++ before any dispatch. A
  CUDA build of torch installs a no-op guard when no GPU is present; a CPU-only build (torch
  2.13+cpu here) has none and raises "PyTorch is not linked with support for cuda devices".
  ``fake_cuda_mode()`` then also routes those calls on fake tensors to aten ops, which need no
  guard (``_BasicIndexing``); advanced (tensor) indexing stays unsupported there.

The assumed capabilities: sm_90 (H100 / H200, the GPU the prepared run meets) for building and
calling, and sm_80 (A100) as well for what ``supports()`` declines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

H100 = (9, 0)
A100 = (8, 0)


def cuda_build() -> bool:
    """Whether this torch was built with CUDA (its device guard works without a GPU)."""
    return bool(torch.backends.cuda.is_built())


@contextlib.contextmanager
def device_facts(capability: tuple[int, int]) -> Iterator[None]:
    """torch.cuda's answers for one GPU of `capability` (no availability claim: see module doc)."""
    from autoquant.candidates import _util

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "device_count", lambda: 1)
        mp.setattr(torch.cuda, "current_device", lambda: 0)
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        mp.setattr(_util, "_capability", lambda index: capability)
        yield


@contextlib.contextmanager
def assumed_gpu(capability: tuple[int, int]) -> Iterator[None]:
    """``device_facts`` plus ``torch.cuda.is_available() -> True``: for supports() calls only."""
    with device_facts(capability), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        yield


def supports_on(candidate: Any, capability: tuple[int, int], op: Any) -> str | None:
    """``candidate.supports(cuda, op)`` as on a GPU of `capability` (device given without index,
    as a user passes it)."""
    with assumed_gpu(capability):
        return candidate.supports(torch.device("cuda"), op)


@contextlib.contextmanager
def fake_cuda_mode(capability: tuple[int, int] = H100) -> Iterator[FakeTensorMode]:
    """A FakeTensorMode in which tensors can be made on "cuda", with ``device_facts``."""
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present: the fake-device checks are for machines without one")
    mode = FakeTensorMode()  # built while is_available() is False: no real device is touched
    with device_facts(capability), contextlib.ExitStack() as stack:
        stack.enter_context(mode)
        if not cuda_build():
            stack.enter_context(_BasicIndexing())
        yield mode


class _BasicIndexing(TorchFunctionMode):
    """The Tensor methods whose Python bindings enter the CUDA device guard before dispatch,
    rebuilt from aten ops for fake tensors (see the module docstring): basic indexing (ints,
    slices, None, Ellipsis; read and write), ``contiguous``, ``copy_`` and ``to(device)``.
    Anything else passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        t = args[0] if args else None
        if not isinstance(t, FakeTensor):
            return func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and _basic(args[1]):
            return basic_index(t, args[1])
        if func is torch.Tensor.__setitem__ and _basic(args[1]):
            target, value = basic_index(t, args[1]), args[2]
            if isinstance(value, torch.Tensor):
                torch.ops.aten.copy_.default(target, value)
            else:
                torch.ops.aten.fill_.Scalar(target, value)
            return None
        if func is torch.Tensor.copy_:
            return torch.ops.aten.copy_.default(t, args[1])
        if func is torch.Tensor.contiguous:
            fmt = kwargs.get("memory_format", args[1] if len(args) > 1 else torch.contiguous_format)
            if t.is_contiguous(memory_format=fmt):
                return t
            return torch.ops.aten.clone.default(t, memory_format=fmt)
        if func is torch.Tensor.to:
            return _to(t, args[1:], kwargs, func)
        return func(*args, **kwargs)


def _to(t: torch.Tensor, args: tuple, kwargs: dict, func: Any) -> torch.Tensor:
    """``t.to(...)``: through ``aten._to_copy`` when a device is named, else the binding itself."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.Tensor):
            device, dtype = arg.device, arg.dtype
        elif isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            device = arg
    if device is None:
        return func(t, *args, **kwargs)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    dtype = dtype or t.dtype
    if device == t.device and dtype == t.dtype and not kwargs.get("copy", False):
        return t
    return torch.ops.aten._to_copy.default(t, dtype=dtype, device=device)


def _basic(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool)
               for i in items)


def basic_index(t: torch.Tensor, index: object) -> torch.Tensor:
    """``t[index]`` for basic indices, built from select / slice / unsqueeze (view ops)."""
    items = list(index if isinstance(index, tuple) else (index,))
    if items.count(Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (t.dim() - used)
    out, dim = t, 0
    for item in items:
        if item is None:
            out = out.unsqueeze(dim)
            dim += 1
        elif isinstance(item, int):
            size = out.shape[dim]
            if not -size <= item < size:
                raise IndexError(f"index {item} is out of bounds for dimension {dim} with size {size}")
            out = out.select(dim, item)
        else:
            start, stop, step = item.indices(out.shape[dim])
            out = torch.ops.aten.slice.Tensor(out, dim, start, max(start, stop), step)
            dim += 1
    return out
