"""Per-layer selection: costs from the tuned ops, accuracy on the layer's own recorded activations.

Accuracy is per layer (it depends on the weights), timing per op. SQNR is computed lazily, in cost
order, only for candidates that could still win, so a large model does not quantize every layer
with every candidate. Where one layer's per-shape winners are two kernels that read the same packed
weight (int8 weight-only at small M, int8 dynamic at large M), the layer may dispatch on M.

>>> import torch
>>> sqnr_db(torch.ones(4), torch.ones(4))
inf
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .candidates import Candidate, get_family, is_baseline
from .config import TuneConfig
from .costmodel import Cost, Option, is_tie, pick, weighted_cost
from .keys import OpShape
from .primitives import sqnr
from .tune import Trial

__all__ = ["CandidateRow", "LayerOption", "LayerPlan", "Dispatch", "choice_label", "noise_power", "select_layer",
           "solve_budget", "sqnr_db", "is_baseline"]

log = logging.getLogger("autoquant")


# One SQNR definition for the whole package (primitives.sqnr); the name is kept for callers.
sqnr_db = sqnr


@dataclass(frozen=True)
class Dispatch:
    """Run `small` for M < threshold and `large` otherwise, over one shared packed weight."""

    small: Candidate
    large: Candidate
    threshold: int


@dataclass(frozen=True)
class LayerOption:
    """One way to run a layer under a model-level accuracy budget: `choice` (a candidate or an
    M-dispatch pair), its modeled `cost` in seconds over the layer's recorded calls (per-call cost
    x calls), and `noise`, the relative error power on the layer's recorded activations
    (``10 ** (-SQNR / 10)``; 0 for the float baseline)."""

    choice: Candidate | Dispatch
    cost: float
    noise: float
    sqnr_db: float


def noise_power(sqnr: float) -> float:
    """Relative error power of an SQNR in dB: 0 for inf (exact), 1 for NaN (unknown: assume the worst).

    >>> noise_power(20.0)
    0.01
    """
    if math.isnan(sqnr):
        return 1.0
    return 0.0 if math.isinf(sqnr) and sqnr > 0 else 10.0 ** (-sqnr / 10.0)


def choice_label(choice: Candidate | Dispatch | None) -> str:
    """A short readable name: 'int8_dynamic(kernel=fbgemm)', 'M<64: a | b', or 'float'."""
    if choice is None:
        return "float"
    if isinstance(choice, Dispatch):
        return f"M<{choice.threshold}: {choice.small.name} | {choice.large.name}"
    return choice.name


@dataclass
class CandidateRow:
    """One candidate for one layer, for the report: its layer cost or why it has none."""

    candidate: Candidate
    cost: Cost | None = None
    reason: str | None = None
    sqnr_db: float | None = None
    nbytes: int | None = None
    per_op: dict[OpShape, Trial] = field(default_factory=dict)


@dataclass
class LayerPlan:
    """The decision for one layer, and everything the report shows about it."""

    name: str
    ops: dict[OpShape, int]
    status: str  # "tuned", "unseen", or "kept float: <why>"
    winner: Candidate | None = None
    dispatch: Dispatch | None = None
    cost: Cost | None = None
    baseline_cost: Cost | None = None
    sqnr_db: float | None = None
    rows: list[CandidateRow] = field(default_factory=list)
    # Under a model-level accuracy budget (TuneConfig.min_cosine): the layer's options, cheapest
    # first, each strictly more accurate than every cheaper one; options[0] is the unconstrained pick.
    options: list[LayerOption] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        if self.cost is None or self.baseline_cost is None or self.cost.value <= 0:
            return math.nan
        return self.baseline_cost.value / self.cost.value


class _Accuracy:
    """Lazily computed SQNR (and packed size) per candidate on the layer's real activations."""

    def __init__(self, weight: Tensor, bias: Tensor | None, acts: Tensor, dtype: torch.dtype,
                 act_absmax: Tensor | None = None) -> None:
        self.weight, self.bias, self.dtype, self.act_absmax = weight, bias, dtype, act_absmax
        self.x = acts.to(device=weight.device, dtype=dtype)
        b32 = None if bias is None else bias.float()
        self.ref = F.linear(self.x.float(), weight.float(), b32)
        self.cache: dict[Candidate, tuple[float, int, str | None]] = {}

    def __call__(self, cand: Candidate) -> tuple[float, int, str | None]:
        if cand not in self.cache:
            self.cache[cand] = self._evaluate(cand)
        return self.cache[cand]

    def _evaluate(self, cand: Candidate) -> tuple[float, int, str | None]:
        try:
            with torch.no_grad():
                module = cand.build(self.weight.to(self.dtype), None if self.bias is None else self.bias.to(self.dtype),
                                    act_absmax=self.act_absmax)
                out = module(self.x).float()
                nbytes = sum(t.numel() * t.element_size() for t in module.packed().values())
        except Exception as exc:  # reported; the layer just does not use this candidate
            return math.nan, 0, f"failed on this layer's weights: {type(exc).__name__}: {exc}"
        value = math.inf if is_baseline(cand) else sqnr_db(self.ref, out)
        if math.isnan(value):
            return value, nbytes, "non-finite output on recorded activations"
        return value, nbytes, None


def _passes(acc: tuple[float, int, str | None], cand: Candidate, min_sqnr: float | None) -> bool:
    value, _, err = acc
    if err is not None:
        return False
    return is_baseline(cand) or min_sqnr is None or value >= min_sqnr


def _floor_extra_work(costs: dict[Candidate, Cost]) -> dict[Candidate, Cost]:
    """`costs` (changed in place, and returned) with each candidate that runs another's kernel
    plus work of its own (``adds_work_to``) costing at least what that one costs: a lower
    figure is noise. Its spread stays its own."""
    for cand, cost in costs.items():
        base = cand.adds_work_to()
        if base is not None and base in costs and cost.value < costs[base].value:
            costs[cand] = Cost(costs[base].value, cost.spread)
    return costs


def _choose(
    costs: Mapping[Candidate, Cost], accuracy: _Accuracy, config: TuneConfig
) -> Candidate | None:
    """Cheapest passing candidate with the tie-break, evaluating accuracy in cost order only as far
    as the tie band of the first passing one."""
    ordered = sorted(costs, key=lambda c: (costs[c].value, c.order, c.params_json()))
    passing: list[Candidate] = []
    for cand in ordered:
        if passing and not is_tie(costs[passing[0]], costs[cand], config.tie_tolerance):
            break
        if _passes(accuracy(cand), cand, config.min_sqnr):
            passing.append(cand)
    if not passing:
        return None
    # A candidate tied with the one whose kernel it runs plus extra work is the slower of the two
    # (Candidate.adds_work_to): that one wins the tie, however much more accurate this one is.
    passing = [c for c in passing if c.adds_work_to() not in passing]
    options = [
        Option(ident=f"{c.family}:{c.params_json()}", cost=costs[c], sqnr_db=accuracy(c)[0],
               nbytes=accuracy(c)[1], order=c.order)
        for c in passing
    ]
    chosen = pick(options, config.tie_tolerance)
    return next(c for c in passing if f"{c.family}:{c.params_json()}" == chosen.ident)


def _dispatch(
    ops: Mapping[OpShape, int], per_op: Mapping[OpShape, Mapping[Candidate, Cost]], accuracy: _Accuracy,
    config: TuneConfig, single: Cost,
) -> tuple[Dispatch, Cost] | None:
    """M-dispatch when the per-shape winners are exactly two kernels sharing a packed format, split
    cleanly by M, and together cheaper (beyond noise) than the best single candidate."""
    winners = {op: _choose(per_op[op], accuracy, config) for op in ops}
    if any(w is None for w in winners.values()):
        return None
    distinct = set(winners.values())
    if len(distinct) != 2:
        return None
    a, b = sorted(distinct, key=lambda c: min(op.m for op, w in winners.items() if w == c))
    if a.weight_format is None or a.weight_format != b.weight_format:
        return None
    max_a = max(op.m for op, w in winners.items() if w == a)
    min_b = min(op.m for op, w in winners.items() if w == b)
    if max_a >= min_b:
        return None
    cost = weighted_cost([(per_op[op][winners[op]], n) for op, n in ops.items()])
    if cost.value >= single.value or is_tie(cost, single, config.tie_tolerance):
        return None
    return Dispatch(small=a, large=b, threshold=min_b), cost


def select_layer(
    name: str, ops: Mapping[OpShape, int], trials: Mapping[OpShape, Mapping[Candidate, Trial]],
    weight: Tensor, bias: Tensor | None, activations: Tensor | None, config: TuneConfig,
    act_absmax: Tensor | None = None,
) -> LayerPlan:
    """Decide one layer. `trials[op]` must hold a Trial for every candidate considered.
    `act_absmax`: the per-input-channel absmax over every recorded call, which calibrated
    candidates (int8_smooth) are built from; without it they fail this layer's accuracy check."""
    plan = LayerPlan(name=name, ops=dict(ops), status="tuned")
    if not ops or activations is None:
        plan.status = "unseen"
        return plan
    cands = list(dict.fromkeys(c for op in ops for c in trials[op]))
    costs: dict[Candidate, Cost] = {}
    for cand in cands:
        row = CandidateRow(cand, per_op={op: trials[op][cand] for op in ops if cand in trials[op]})
        missing = [op for op in ops if cand not in trials[op] or not trials[op][cand].ok]
        if missing:
            first = trials[missing[0]].get(cand)
            why = first.reason if first is not None and first.reason else "not timed"
            row.reason = f"{missing[0].label()}: {why}"
        else:
            row.cost = weighted_cost([(trials[op][cand].cost, n) for op, n in ops.items()])
            costs[cand] = row.cost
            if is_baseline(cand):
                plan.baseline_cost = row.cost
        plan.rows.append(row)
    _floor_extra_work(costs)
    dtype = max(ops, key=lambda op: ops[op]).torch_dtype
    accuracy = _Accuracy(weight, bias, activations, dtype, act_absmax)
    winner = _choose(costs, accuracy, config) if costs else None
    if winner is None:
        plan.status = "kept float: no candidate could be timed" if not costs else "kept float: no candidate passed the accuracy floor"
        log.warning("layer %s %s", name, plan.status)
    else:
        plan.winner, plan.cost = winner, costs[winner]
        plan.sqnr_db = accuracy(winner)[0]
        # Per op, every candidate measured there: one skipped at a large op (predicted hopeless,
        # so never timed there) can still win the small ops of a dispatch.
        per_op = {op: _floor_extra_work({c: t.cost for c, t in trials[op].items() if t.ok and t.cost is not None})
                  for op in ops}
        found = _dispatch(ops, per_op, accuracy, config, plan.cost) if len(ops) > 1 else None
        if found is not None:
            plan.dispatch, plan.cost = found
            plan.winner = None
            plan.sqnr_db = min(accuracy(found[0].small)[0], accuracy(found[0].large)[0])
    if config.min_cosine is not None and (plan.winner is not None or plan.dispatch is not None):
        plan.options = _options(plan, costs, accuracy, config)
    for row in plan.rows:
        if row.candidate in accuracy.cache:
            row.sqnr_db, row.nbytes, err = accuracy.cache[row.candidate]
            if err and row.reason is None:
                row.reason = err
            elif row.reason is None and not _passes(accuracy.cache[row.candidate], row.candidate, config.min_sqnr):
                row.reason = f"SQNR {row.sqnr_db:.1f} dB below min_sqnr {config.min_sqnr} dB"
    return plan


def _options(plan: LayerPlan, costs: Mapping[Candidate, Cost], accuracy: _Accuracy, config: TuneConfig) -> list[LayerOption]:
    """The layer's accuracy/cost frontier, for the model-level budget: the unconstrained pick, then
    every candidate passing ``min_sqnr`` that costs more and is strictly more accurate than all
    cheaper ones, up to the first exact one (the float baseline, or a lossless float kernel such
    as prepacked oneDNN: nothing dearer can be more accurate), and then the float baseline, which
    ends every frontier. SQNR is evaluated only for the lossy candidates on the way."""
    calls = sum(plan.ops.values())
    first: Candidate | Dispatch | None = plan.dispatch or plan.winner
    if first is None or plan.cost is None:
        return []  # nothing chosen: the layer stays as it is, outside the budget's choices
    sqnr = math.nan if plan.sqnr_db is None else plan.sqnr_db
    out = [LayerOption(first, plan.cost.value * calls, noise_power(sqnr), sqnr)]
    if isinstance(first, Candidate) and is_baseline(first):
        return out
    floor = plan.cost.value
    for cand in sorted(costs, key=lambda c: (costs[c].value, c.order, c.params_json())):
        if costs[cand].value < floor or cand == first:
            continue
        exact = is_baseline(cand) or bool(cand.lossless)  # nothing rounded: no need to measure it
        acc = (math.inf, 0, None) if exact else accuracy(cand)
        if not _passes(acc, cand, config.min_sqnr):
            continue
        noise = 0.0 if exact else noise_power(acc[0])
        if noise < out[-1].noise or is_baseline(cand):
            out.append(LayerOption(cand, costs[cand].value * calls, noise, acc[0]))
        if is_baseline(cand):
            return out
        if exact:
            break
    # The float baseline ends every frontier (the fallback); untimed, it is priced as the dearest option.
    base = next((c for c in costs if is_baseline(c)), None) or get_family("float")(kernel="aten")
    cost = costs[base].value * calls if base in costs else max(o.cost for o in out)
    out.append(LayerOption(base, max(cost, out[-1].cost), 0.0, math.inf))
    return out


def solve_budget(
    options: Mapping[str, list[LayerOption]], sensitivity: Mapping[str, Mapping[str, float]],
    allowed: Mapping[str, float],
) -> dict[str, int]:
    """Per layer, the index of its option that keeps every output's modeled drop within `allowed`
    at the least total cost (a multiple-choice knapsack, solved greedily).

    The model: output t's drop in cosine is ``sum over layers of sensitivity[layer][t] * noise``
    (independent small errors add in power). Starting from the cheapest options, the upgrade with
    the most drop removed per second added, on the output furthest over its allowance, is taken
    until every output fits; then upgrades that are no longer needed are undone, largest saving
    first. Where no upgrade is left, the most accurate assignment found is returned (the caller
    verifies it). Deterministic: ties go to the layer name.

    >>> from autoquant.candidates import get_family
    >>> fast, exact = get_family("int8_dynamic")(kernel="fbgemm"), get_family("float")(kernel="aten")
    >>> opts = {n: [LayerOption(fast, 1.0, 0.01, 20.0), LayerOption(exact, 3.0, 0.0, math.inf)] for n in "ab"}
    >>> solve_budget(opts, {"a": {"y": 1.0}, "b": {"y": 0.1}}, {"y": 0.005})
    {'a': 1, 'b': 0}
    """
    pick = {name: 0 for name in options}
    tensors = sorted(allowed)
    sens = {n: {t: sensitivity.get(n, {}).get(t, 0.0) for t in tensors} for n in options}
    total = {t: sum(sens[n][t] * options[n][0].noise for n in options) for t in tensors}

    def moved(name: str, j: int) -> dict[str, float]:
        """Every output's total drop with layer `name` on option j instead of its current one."""
        d = options[name][j].noise - options[name][pick[name]].noise
        return {t: total[t] + sens[name][t] * d for t in tensors}

    def fits(drops: Mapping[str, float]) -> bool:
        return all(drops[t] <= allowed[t] for t in tensors)

    while not fits(total):
        worst = max(tensors, key=lambda t: (total[t] - allowed[t], t))
        best: tuple[float, str, int] | None = None
        for name in sorted(options):
            s = sens[name][worst]
            if s <= 0:
                continue
            cur = options[name][pick[name]]
            for j in range(pick[name] + 1, len(options[name])):
                gain = s * (cur.noise - options[name][j].noise)
                extra = max(options[name][j].cost - cur.cost, 1e-12)
                if gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, name, j)
        if best is None:
            return pick
        total = moved(best[1], best[2])
        pick[best[1]] = best[2]
    # Undo what the greedy order over-bought: the largest saving that still fits, repeatedly.
    while True:
        undo: tuple[float, str, int] | None = None
        for name in sorted(options):
            for j in range(pick[name]):
                saving = options[name][pick[name]].cost - options[name][j].cost
                if saving > 0 and (undo is None or saving > undo[0]) and fits(moved(name, j)):
                    undo = (saving, name, j)
        if undo is None:
            return pick
        total = moved(undo[1], undo[2])
        pick[undo[1]] = undo[2]
