"""The model-level accuracy budget (``autoquant(model, x, min_cosine=0.99)``): choose under it, verify it.

Contract: :func:`enforce_budget` (run by ``finalize`` after tuning) picks, per layer, among its
measured candidates the cheapest assignment whose outputs stay at or above ``min_cosine`` on the
recorded calls, verifies it end to end, and returns a :class:`BudgetResult` with the verified
modules. What is measured (the output tensors, per-sample cosines, the mean and min reported) is
defined in :mod:`autoquant.outputs`.

One reason to exist on its own: choosing under a budget is a search (sensitivities, a solver,
verification rounds) over trial builds of the model, a concept apart from measuring outputs.

How the budget is met:

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
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .candidates import Candidate, is_baseline
from .costmodel import Cost
from .layers import copy_hooks, from_linear, replace_module
from .outputs import (
    CosineStats,
    RecordedCalls,
    as_calls,
    cosine_stats,
    floating_outputs,
    reference_outputs,
    run_calls,
)
from .selection import Dispatch, LayerOption, LayerPlan, choice_label, solve_budget

# Measuring outputs lives in autoquant.outputs; its names stay importable from here for existing callers.
__all__ = ["BudgetResult", "CosineStats", "ProtectedLayer", "RecordedCalls", "as_calls", "cosine_stats",
           "enforce_budget", "floating_outputs", "group_of", "reference_outputs", "run_calls"]

log = logging.getLogger("autoquant")


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
