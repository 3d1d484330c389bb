"""A model's floating-point outputs, recorded and replayed, and their cosine to the float model's.

Contract: :func:`floating_outputs` names every floating-point tensor in a model's output (a tensor,
or tensors inside tuples, lists, dicts and HF ``ModelOutput``); :class:`RecordedCalls` keeps the
model's first calls while it records (inputs by reference, float outputs as CPU copies, so no
float copy of the model is made or run again); :func:`run_calls` replays them and
:func:`cosine_stats` compares what came out with the float outputs. A tensor with two or more
dimensions is one sample per row of its first (batch) dimension, a smaller one is a single
sample. Per output tensor the per-sample cosines are averaged; :meth:`CosineStats.meets` holds
when every output tensor's mean is at or above the budget. The mean reported is the lowest over
output tensors, the min the lowest single sample.

One reason to exist on its own: the accuracy budget (``autoquant.accuracy``) and a plan's
accuracy check on given inputs (``apply_plan(..., verify=...)``) measure outputs the same way;
neither needs the other's machinery.

Memory: the recorded inputs are kept by reference and the float outputs as CPU copies.

>>> import torch
>>> ref = [[("out", torch.tensor([[1.0, 0.0], [0.0, 1.0]]))]]
>>> cosine_stats(ref, [[("out", torch.tensor([[1.0, 0.0], [1.0, 1.0]]))]]).min
0.7071067811865475
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CosineStats", "Outputs", "RecordedCalls", "as_calls", "cosine_stats", "floating_outputs",
           "reference_outputs", "run_calls"]

# Cosines are computed in float64; identical outputs may still round to 1 - 1e-16.
_ROUNDING = 1e-9
Outputs = list[tuple[str, Tensor]]


def floating_outputs(output: Any) -> Outputs:
    """(path, tensor) for every floating-point tensor in `output`, in a fixed order: a tensor is
    'output', a dict entry its key, a sequence item '[i]', nested as 'hidden_states[3]'. Anything
    else (ints, caches, strings) is left out."""
    found: Outputs = []
    seen: set[int] = set()

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, Tensor):
            if obj.is_floating_point():
                found.append((path or "output", obj))
            return
        if id(obj) in seen:
            return
        if isinstance(obj, Mapping):
            seen.add(id(obj))
            for key, value in obj.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(obj, (tuple, list)):
            seen.add(id(obj))
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")

    walk(output, "")
    return found


def _shallow(obj: Any) -> Any:
    """Copies of plain containers (tensors shared), so a forward that adds entries to its input dict
    (sentence-transformers does) does not change the recorded call."""
    if type(obj) is dict:
        return {k: _shallow(v) for k, v in obj.items()}
    if type(obj) in (tuple, list):
        return type(obj)(_shallow(v) for v in obj)
    return obj


@dataclass
class RecordedCalls:
    """The first `max_calls` calls of the model (inputs by reference, float outputs as CPU copies),
    collected by a forward pre-hook and hook on the model while it records.

    A call that continues a key/value cache (a decode step of ``generate``: a cache object, any
    argument with ``get_seq_length()`` such as transformers' ``DynamicCache``, holding earlier
    tokens) is not kept: the calls after it change that object in place, so it could not be
    replayed. A call that starts one (the prompt) is kept without it, so the replay builds a fresh
    cache and computes the same outputs.
    """

    max_calls: int = 16
    outputs: tuple[str, ...] | None = None
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    refs: list[Outputs] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)
    seen: int = 0
    _pending: tuple[tuple, dict] | None = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending = None
        if len(self.calls) >= self.max_calls:
            return
        caches = [k for k, v in kwargs.items() if callable(getattr(v, "get_seq_length", None))]
        if any(callable(getattr(a, "get_seq_length", None)) for a in args):
            return  # a cache passed positionally: not replayable as recorded
        for k in caches:
            if int(kwargs[k].get_seq_length()) > 0:
                return  # a decode step: it continues a cache that later calls change in place
        kwargs = {k: v for k, v in kwargs.items() if k not in caches}
        self._pending = (_shallow(args), _shallow(kwargs))

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.seen += 1
        pending, self._pending = self._pending, None
        if pending is None or len(self.calls) >= self.max_calls:
            return
        found = floating_outputs(output)
        self.paths.update(p for p, _ in found)
        self.calls.append(pending)
        self.refs.append([(p, t.detach().to("cpu", copy=True)) for p, t in found
                          if self.outputs is None or p in self.outputs])

    def record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Record one call made outside the hooks' view: a wrapper that finalizes inside the call
        (the hook would only fire after it), or a direct ``model.forward(...)`` (no hook fires)."""
        if self._pending is None:
            self.pre_hook(module, args, kwargs)
        self.hook(module, args, kwargs, output)

    def register(self, module: nn.Module) -> "_Handles":
        """Attach both hooks to `module`; the returned handle's remove() takes both off."""
        return _Handles((module.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
                         module.register_forward_hook(self.hook, with_kwargs=True)))

    def check(self) -> None:
        """Raise a ValueError naming the problem where the recorded outputs cannot carry a budget."""
        missing = sorted(set(self.outputs or ()) - self.paths)
        if self.calls and missing:
            raise ValueError(
                f"budget_outputs names {missing}, which the model's outputs do not hold; its floating output "
                f"tensors are {sorted(self.paths) or 'none'}")
        if not self.calls:
            raise ValueError(
                "min_cosine needs the model's own outputs, but no call of the model itself was recorded (only of "
                "its layers, e.g. through another method): run model(...) on representative inputs, or pass "
                "example_input to autoquant()")
        if not any(self.refs):
            raise ValueError(
                "min_cosine compares floating-point outputs, but the model's outputs hold none (only integers "
                "or other objects): budget the model that returns the logits or embeddings, or use min_sqnr")
        for i, ref in enumerate(self.refs):
            for path, t in ref:
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(
                        f"the float model's output {path!r} holds NaN or Inf on recorded call {i}, so no cosine "
                        "can be measured against it: record finite inputs (check the model in float first), "
                        "or leave min_cosine unset")


@dataclass(frozen=True)
class _Handles:
    handles: tuple[Any, ...]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class CosineStats:
    """Per-sample cosine similarity of outputs against the float reference. `mean`: the lowest,
    over output tensors, of the mean over samples; `min`: the lowest single sample; `worst`: the
    output tensor with the lowest mean; `drops`: 1 - mean per output tensor."""

    mean: float
    min: float
    samples: int
    worst: str
    drops: Mapping[str, float]
    nonfinite: bool = False

    def meets(self, budget: float) -> bool:
        return not self.nonfinite and self.mean >= budget - _ROUNDING


def _row_cosines(ref: Tensor, out: Tensor) -> Tensor:
    """float64 cosine per sample (row of the first dimension; a whole tensor under 2-D is one
    sample). Both zero: 1; one zero: 0; non-finite: -1 (the worst)."""
    rows = ref.shape[0] if ref.dim() >= 2 else 1
    a, b = ref.reshape(rows, -1), out.reshape(rows, -1)
    chunk = max(1, (1 << 22) // max(1, a.shape[1]))
    parts = []
    for i in range(0, rows, chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        dot, nx, ny = (x * y).sum(1), x.norm(dim=1), y.norm(dim=1)
        cos = dot / (nx * ny)
        cos = torch.where((nx == 0) & (ny == 0), torch.ones_like(cos), cos)
        cos = torch.where((nx == 0) ^ (ny == 0), torch.zeros_like(cos), cos)
        parts.append(torch.nan_to_num(cos, nan=-1.0, posinf=-1.0, neginf=-1.0).clamp(-1.0, 1.0))
    return torch.cat(parts)


def cosine_stats(refs: Sequence[Outputs], outs: Sequence[Outputs]) -> CosineStats:
    """Compare each call's outputs with its reference (same paths, same shapes)."""
    per: dict[str, list[Tensor]] = {}
    nonfinite = False
    for i, (ref, out) in enumerate(zip(refs, outs)):
        got = dict(out)
        for path, r in ref:
            o = got.get(path)
            if o is None or tuple(o.shape) != tuple(r.shape):
                raise RuntimeError(
                    f"recorded call {i}: the quantized model's output {path!r} is "
                    f"{'missing' if o is None else list(o.shape)}, the float model's was {list(r.shape)}: "
                    "the model's output structure depends on something besides its inputs")
            o = o.detach().to("cpu")
            nonfinite = nonfinite or not bool(torch.isfinite(o).all())
            per.setdefault(path, []).append(_row_cosines(r, o))
    if not per:
        return CosineStats(1.0, 1.0, 0, "", {}, nonfinite)
    cat = {p: torch.cat(v) for p, v in per.items()}
    means = {p: float(v.mean()) for p, v in cat.items()}
    worst = min(means, key=lambda p: (means[p], p))
    return CosineStats(mean=means[worst], min=min(float(v.min()) for v in cat.values()),
                       samples=sum(v.numel() for v in cat.values()), worst=worst,
                       drops={p: max(0.0, 1.0 - m) for p, m in means.items()}, nonfinite=nonfinite)


def as_calls(inputs: Any) -> list[tuple[tuple, dict]]:
    """Model calls from inputs given as for ``autoquant(model, example_input)``: a tensor, a tuple of
    positional arguments, a dict of keyword arguments, or a list of those (one call each)."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise ValueError("inputs is an empty list: pass at least one input to run the model on")
    calls = []
    for x in items:
        if isinstance(x, Mapping):
            calls.append(((), dict(x)))
        elif isinstance(x, tuple):
            calls.append((x, {}))
        else:
            calls.append(((x,), {}))
    return calls


def reference_outputs(root: nn.Module, calls: Sequence[tuple[tuple, dict]], outputs: Sequence[str] | None
                      ) -> list[Outputs]:
    """The float model's floating outputs for `calls` as CPU copies (only `outputs`, if given)."""
    refs = []
    for out in run_calls(root, calls):
        refs.append([(p, t.to("cpu", copy=True)) for p, t in out if outputs is None or p in outputs])
    if not any(refs):
        raise ValueError("the model's outputs on these inputs hold no floating-point tensor"
                         + (f" named {list(outputs)}" if outputs else "") + ": nothing to compare a cosine on")
    return refs


def run_calls(root: nn.Module, calls: Sequence[tuple[tuple, dict]]) -> list[Outputs]:
    """Run the recorded calls through `root` without gradients; their floating outputs."""
    outs = []
    with torch.no_grad():
        for args, kwargs in calls:
            outs.append(floating_outputs(root(*_shallow(args), **_shallow(kwargs))))
    return outs
