"""The model-level accuracy budget (``autoquant(model, x, min_cosine=0.99)``).

What is measured: every floating-point tensor in the model's output (a tensor, or tensors inside
tuples, lists, dicts and HF ``ModelOutput``), compared with what the float model returned for the
same recorded call. A tensor with two or more dimensions is one sample per row of its first
(batch) dimension, a smaller one is a single sample. Per output tensor the per-sample cosines are
averaged; the budget holds when every output tensor's mean is at or above ``min_cosine``. The
report gives that mean (the lowest over output tensors) and the lowest single sample.

How the budget is met (:func:`enforce_budget`, run by ``finalize`` after tuning):

1. The float outputs were kept from the recording forwards themselves (copied to the CPU), so no
   float copy of the model is made or run again.
2. The unconstrained plan (each layer's fastest candidate) is built and verified end to end on the
   recorded calls. If it meets the budget it is kept as is.
3. Otherwise, per group of like layers (the same name up to block indices, e.g. every
   ``layers.#.mlp.down_proj``), the group alone is quantized and its drop in cosine measured. A
   layer's sensitivity is its group's drop shared in proportion to the layers' error power on
   their own recorded activations (SQNR). :func:`~autoquant.selection.solve_budget` then picks,
   per layer, among the measured candidates (more accurate kernels, float casts, the float
   baseline) the cheapest assignment whose modeled drop fits, and the result is verified. A miss
   rescales the model by what was measured and solves again, at most ``verify_rounds`` times;
   after that every layer stays float (and if even that misses, the model does not reproduce its
   own outputs: the report and the log say so).

Memory: the recorded inputs are kept by reference and the float outputs as CPU copies; while the
budget is checked the float layers are still there, next to the quantized modules of the plan being
verified (for a float32 model with int8 weights about 1.25x the float weights, for bf16 to int8 1.5x),
never a second float model. Cost: one forward over the recorded calls per verification, plus one
per layer group when the unconstrained plan misses.

>>> import torch
>>> ref = [[("out", torch.tensor([[1.0, 0.0], [0.0, 1.0]]))]]
>>> cosine_stats(ref, [[("out", torch.tensor([[1.0, 0.0], [1.0, 1.0]]))]]).min
0.7071067811865475
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .candidates import Candidate, is_baseline
from .costmodel import Cost
from .finalize import copy_hooks, from_linear, replace_module
from .selection import Dispatch, LayerOption, LayerPlan, choice_label, solve_budget

__all__ = ["BudgetResult", "CosineStats", "ProtectedLayer", "RecordedCalls", "as_calls", "cosine_stats",
           "enforce_budget", "floating_outputs", "group_of", "reference_outputs", "run_calls"]

log = logging.getLogger("autoquant")

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


@dataclass(frozen=True)
class ProtectedLayer:
    """A layer moved off its fastest candidate to meet the budget; `extra_us`: modeled microseconds
    added per call of the layer (count-weighted over its recorded shapes)."""

    name: str
    was: str
    now: str
    extra_us: float


@dataclass
class BudgetResult:
    """What the budget did: the budget, the verified cosines (mean / min over the recorded samples)
    of the plan the model now runs and of the unconstrained one, the protected layers, and how many
    forwards and seconds checking it took. `met` is False only where even float could not meet it."""

    min_cosine: float
    cosine_mean: float | None
    cosine_min: float | None
    samples: int
    met: bool
    unconstrained_mean: float | None = None
    unconstrained_min: float | None = None
    worst_output: str = ""
    protected: list[ProtectedLayer] = field(default_factory=list)
    extra_us: float = 0.0
    fastest_us: float = 0.0
    forwards: int = 0
    seconds: float = 0.0
    note: str = ""

    outputs: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """What plans and saves record (JSON-able)."""
        return {"min_cosine": self.min_cosine, "cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min,
                "samples": self.samples, "met": self.met, "outputs": None if self.outputs is None else list(self.outputs),
                "protected": [p.name for p in self.protected]}

    def summary(self) -> str:
        if self.cosine_mean is None:
            return f"accuracy budget min_cosine={self.min_cosine}: {self.note}"
        pct = 100.0 * self.extra_us / self.fastest_us if self.fastest_us > 0 else 0.0
        text = (f"accuracy budget min_cosine={self.min_cosine}: {'met' if self.met else 'NOT MET'}, cosine mean "
                f"{self.cosine_mean:.5f} / min {self.cosine_min:.5f} over {self.samples} recorded samples "
                f"(worst output {self.worst_output!r})")
        if self.unconstrained_mean is not None:
            text += f"; fastest plan {self.unconstrained_mean:.5f} / {self.unconstrained_min:.5f}"
        text += (f"; {len(self.protected)} layer(s) protected, +{self.extra_us:.1f} us modeled per forward "
                 f"(+{pct:.1f}%); checked in {self.forwards} forwards, {self.seconds:.1f}s")
        return text + (f"; {self.note}" if self.note else "")


class _BuildFailed(Exception):
    def __init__(self, name: str, index: int, exc: Exception) -> None:
        super().__init__(f"{name}: {type(exc).__name__}: {exc}")
        self.name, self.index = name, index


class _Trials:
    """Swaps quantized modules for some layers into the model, runs the recorded calls, and puts the
    float layers back. Built modules are cached per (layer, choice) and evicted on request."""

    def __init__(self, root: nn.Module, layers: Mapping[str, nn.Linear], plans: Mapping[str, LayerPlan],
                 recorded: RecordedCalls, act_absmax: Mapping[str, Tensor] | None = None) -> None:
        self.root, self.layers, self.plans, self.recorded = root, layers, plans, recorded
        self.act_absmax = dict(act_absmax or {})
        self.built: dict[tuple[str, Candidate | Dispatch], nn.Module] = {}
        self.forwards = 0

    def module(self, name: str, index: int) -> nn.Module | None:
        choice = self.plans[name].options[index].choice
        if isinstance(choice, Candidate) and is_baseline(choice):
            return None
        key = (name, choice)
        if key not in self.built:
            lin = self.layers[name]
            try:
                new = from_linear(choice, lin, frozenset(op.m for op in self.plans[name].ops), name,
                                  act_absmax=self.act_absmax.get(name))
            except Exception as exc:  # that option is dropped; the layer has others
                raise _BuildFailed(name, index, exc) from exc
            copy_hooks(lin, new)
            new.train(lin.training)
            self.built[key] = new
        return self.built[key]

    def run(self, pick: Mapping[str, int], calls: int | None = None) -> CosineStats:
        """Cosines with `pick` swapped in, on the first `calls` recorded calls (None: all)."""
        swapped = []
        try:
            for name, index in pick.items():
                mod = self.module(name, index)
                if mod is not None:
                    replace_module(self.root, name, mod)
                    swapped.append(name)
            self.forwards += 1
            outs = run_calls(self.root, self.recorded.calls[:calls])
        finally:
            for name in swapped:
                replace_module(self.root, name, self.layers[name])
        return cosine_stats(self.recorded.refs[:calls], outs)

    def keep_only(self, pick: Mapping[str, int]) -> None:
        wanted = {(n, self.plans[n].options[i].choice) for n, i in pick.items()}
        for key in [k for k in self.built if k not in wanted]:
            del self.built[key]


def group_of(name: str) -> str:
    """Layers alike up to block indices share a group: 'model.layers.3.mlp.up_proj' ->
    'model.layers.#.mlp.up_proj'. An index that ends the name is the layer itself (the '0' and
    '2' of an nn.Sequential are different layers), so it stays.

    >>> group_of("encoder.layer.11.intermediate.dense"), group_of("blocks.3.0")
    ('encoder.layer.#.intermediate.dense', 'blocks.#.0')
    """
    return re.sub(r"(?<![^.])\d+(?=\.)", "#", name)


def _sensitivities(trials: _Trials, options: Mapping[str, list[LayerOption]], fastest: CosineStats
                   ) -> dict[str, dict[str, float]]:
    """Per layer and output tensor, drop in cosine per unit of the layer's error power, measured on
    the first recorded call (verification uses them all).

    One forward per layer group (its layers alone on their fastest options); then, most harmful
    group first, one forward per layer of the groups that fit in as many forwards again, at least 8 (depth
    changes how far a layer's error carries, so like layers differ). A layer not measured alone gets its
    group's drop (less what its measured peers took) in proportion to its error power. Finally
    each output's sensitivities are scaled up where the groups together fall short of the fastest
    plan's measured drop (errors do not add exactly)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(options):
        if options[name][0].noise > 0:
            groups.setdefault(group_of(name), []).append(name)
    drops: dict[str, Mapping[str, float]] = {}
    for g, members in groups.items():
        drops[g] = trials.run({n: 0 for n in members}, calls=1).drops
        log.debug("accuracy budget: group %s (%d layers) alone: drops %s", g, len(members),
                  {t: round(d, 6) for t, d in drops[g].items()})
    left = max(len(groups), 8)
    alone: dict[str, Mapping[str, float]] = {}
    for g in sorted(groups, key=lambda g: (-max(drops[g].values(), default=0.0), g)):
        members = groups[g]
        if len(members) < 2 or len(members) > left or max(drops[g].values(), default=0.0) <= 0:
            continue
        for n in members:
            alone[n] = trials.run({n: 0}, calls=1).drops
        left -= len(members)
    sens: dict[str, dict[str, float]] = {}
    for g, members in groups.items():
        for t, d in drops[g].items():
            rest = [n for n in members if n not in alone]
            share = max(0.0, d - sum(alone[n].get(t, 0.0) for n in members if n in alone))
            power = sum(options[n][0].noise for n in rest)
            for n in members:
                per = alone[n].get(t, 0.0) if n in alone else (share / power if power > 0 else 0.0) * options[n][0].noise
                sens.setdefault(n, {})[t] = per / options[n][0].noise
    # Group drops need not add up exactly to the whole plan's: one factor per output tensor fixes it.
    whole = trials.run({n: 0 for n in options}, calls=1) if len(trials.recorded.calls) > 1 else fastest
    for t, measured in whole.drops.items():
        total = sum(d.get(t, 0.0) for d in drops.values())
        scale = measured / total if total > 0 else 1.0
        for n in sens:
            sens[n][t] = sens[n].get(t, 0.0) * max(scale, 1.0)
    return sens


def enforce_budget(root: nn.Module, layers: Mapping[str, nn.Linear], plans: dict[str, LayerPlan],
                   recorded: RecordedCalls, budget: float, margin: float = 0.8, rounds: int = 4,
                   act_absmax: Mapping[str, Tensor] | None = None,
                   ) -> tuple[BudgetResult, dict[str, nn.Module | None]]:
    """Choose per layer under `budget` and verify it end to end (see the module docstring).

    `layers` are the float layers (plain weights, no recording), `plans` their tuned decisions,
    each with ``options`` (the unconstrained pick first), `act_absmax` the layers' recorded
    per-input-channel activation absmax (what calibrated candidates such as int8_smooth are built
    from; a layer without one cannot use them: that option is dropped). Updates the plans to the
    verified choice and returns the result with the verified modules (None: stays float) for
    finalize to install. The model is left as it came in (every layer float)."""
    started = time.perf_counter()
    options = {n: p.options for n, p in plans.items() if p.options}
    trials = _Trials(root, layers, plans, recorded, act_absmax)
    result = BudgetResult(min_cosine=budget, cosine_mean=None, cosine_min=None, samples=0, met=True,
                          outputs=recorded.outputs)
    pick, stats = _search(trials, options, result, budget, margin, rounds, {n: 0 for n in options})
    # Each layer's fastest option that could be built (a failed build was dropped from the front).
    fastest = {n: o[0] for n, o in options.items()}
    result.fastest_us = 1e6 * sum(o.cost for o in fastest.values()) / max(1, recorded.seen)
    if stats is None or not stats.meets(budget):
        pick = {n: len(o) - 1 for n, o in options.items()}  # the baseline ends every frontier
        trials.keep_only({})
        stats = trials.run({})
        if not stats.meets(budget):
            result.met = False
            result.note = (f"cannot be met even with every layer float: the float model itself reaches cosine "
                           f"{stats.mean:.6f} against its own recorded outputs (is it in train mode, with dropout, "
                           "or otherwise random? call model.eval()); every layer is kept float")
            log.warning("autoquant: accuracy budget min_cosine=%s %s", budget, result.note)
        else:
            result.note = result.note or ("every layer kept float: no mix of the measured candidates met the "
                                          f"budget within {rounds} verified rounds")
            if budget < 1.0:
                log.warning("autoquant: accuracy budget min_cosine=%s: %s", budget, result.note)
    modules = _install_choices(trials, plans, options, fastest, pick, result)
    result.cosine_mean, result.cosine_min, result.samples = stats.mean, stats.min, stats.samples
    result.worst_output, result.forwards = stats.worst, trials.forwards
    result.seconds = time.perf_counter() - started
    return result, modules


def _search(trials: _Trials, options: dict[str, list[LayerOption]], result: BudgetResult, budget: float,
            margin: float, rounds: int, pick: dict[str, int]) -> tuple[dict[str, int], CosineStats | None]:
    """Verify the fastest plan; where it misses, solve and verify up to `rounds` times: a miss
    scales the modeled drops up by what was measured, a pass scales them down (to try a cheaper
    plan). Returns the cheapest verified pick and its cosines, else the last pick tried and its
    cosines (None where the budget is 1.0: every layer float, verified by the caller)."""
    if budget >= 1.0:
        result.note = "min_cosine=1.0: every layer kept float"
        return pick, None
    while True:
        try:
            first = trials.run(pick)
            break
        except _BuildFailed as exc:
            _drop_option(options, exc)
    result.unconstrained_mean, result.unconstrained_min = first.mean, first.min
    if first.meets(budget):
        return pick, first
    sens = _sensitivities(trials, options, first)
    allowed = {t: margin * (1.0 - budget) for t in first.drops}
    best: tuple[float, dict[str, LayerOption], CosineStats] | None = None
    stats, tried = first, set()
    for _ in range(rounds):
        pick = solve_budget(options, sens, allowed)
        chosen = {n: options[n][i] for n, i in pick.items()}
        cost = sum(o.cost for o in chosen.values())
        key = frozenset((n, o.choice) for n, o in chosen.items())
        if key in tried or (best is not None and cost >= best[0]):
            break  # nothing new, or nothing cheaper than what already passed
        tried.add(key)
        trials.keep_only({**pick, **({n: options[n].index(o) for n, o in best[1].items()} if best else {})})
        try:
            stats = trials.run(pick)
        except _BuildFailed as exc:
            _drop_option(options, exc)
            continue
        predicted = {t: sum(sens.get(n, {}).get(t, 0.0) * o.noise for n, o in chosen.items()) for t in allowed}
        log.debug("accuracy budget: %d layer(s) moved, modeled +%.1f us: cosine mean %.6f (drops predicted %s, "
                  "measured %s)", sum(1 for i in pick.values() if i), 1e6 * (cost - sum(o[0].cost for o in
                  options.values())) / max(1, trials.recorded.seen), stats.mean,
                  {t: round(d, 6) for t, d in predicted.items()}, {t: round(d, 6) for t, d in stats.drops.items()})
        if stats.meets(budget):
            best = (cost, chosen, stats)
        _rescale(sens, predicted, stats, budget, passed=stats.meets(budget))
    if best is None:
        return pick, stats
    return {n: options[n].index(o) for n, o in best[1].items()}, best[2]


def _rescale(sens: dict[str, dict[str, float]], predicted: Mapping[str, float], stats: CosineStats,
             budget: float, passed: bool) -> None:
    """Scale each output's modeled sensitivities by measured / predicted drop: up (at least 1.25x)
    for an output over the budget after a miss, down (at most 2x per round, never up) after a pass."""
    for t, measured in stats.drops.items():
        p = predicted.get(t, 0.0)
        if p <= 0:
            continue
        if passed:
            factor = min(1.0, max(measured / p, 0.5))
        elif measured > (1.0 - budget):
            factor = max(measured / p, 1.25)
        else:
            continue
        for n in sens:
            sens[n][t] = sens[n].get(t, 0.0) * factor


def _drop_option(options: dict[str, list[LayerOption]], exc: _BuildFailed) -> None:
    log.warning("autoquant: accuracy budget: building %s failed (%s); that option is dropped",
                choice_label(options[exc.name][exc.index].choice), exc)
    options[exc.name].pop(exc.index)  # never the float baseline, which builds nothing


def _install_choices(trials: _Trials, plans: dict[str, LayerPlan], options: Mapping[str, list[LayerOption]],
                     fastest: Mapping[str, LayerOption], pick: Mapping[str, int], result: BudgetResult,
                     ) -> dict[str, nn.Module | None]:
    """Write the picked options into the plans (and the protected layers into `result`); returns
    the verified modules (None: float) for finalize to install."""
    modules: dict[str, nn.Module | None] = {}
    forwards = max(1, trials.recorded.seen)
    for name, index in sorted(pick.items()):
        plan, chosen, first = plans[name], options[name][index], fastest[name]
        modules[name] = None if _is_float(chosen.choice) else trials.module(name, index)
        if chosen == first:
            continue
        calls = max(1, sum(plan.ops.values()))
        result.protected.append(ProtectedLayer(name, choice_label(first.choice), choice_label(chosen.choice),
                                               1e6 * (chosen.cost - first.cost) / calls))
        result.extra_us += 1e6 * (chosen.cost - first.cost) / forwards
        plan.dispatch = chosen.choice if isinstance(chosen.choice, Dispatch) else None
        plan.winner = None if isinstance(chosen.choice, Dispatch) else chosen.choice
        plan.cost = Cost(chosen.cost / calls, plan.cost.spread if plan.cost else 0.0)
        plan.sqnr_db = chosen.sqnr_db
    return modules


def _is_float(choice: Candidate | Dispatch) -> bool:
    return isinstance(choice, Candidate) and is_baseline(choice)
