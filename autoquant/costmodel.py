"""Cost models and selection (DESIGN.md section 4): pure functions over measurements, no torch.

- ``relu``: a candidate's op cost is its RELU-wrapped time.
- ``interpolate(c)``: dynamic-activation schemes cost ``c * t_full + (1 - c) * t_matmul``; the rest
  cost ``t_full``.
- A layer's cost is the count-weighted mean of its op costs.
- The winner is the cheapest candidate that passes the accuracy floor; candidates within the
  measured noise of the cheapest are a tie, broken by higher SQNR, then fewer packed bytes, then the
  fixed family order, then the params text: the same inputs always give the same plan.

>>> from autoquant.keys import Measurement, Timed
>>> m = lambda t: Measurement(t, t, t, 1)
>>> op_cost(CostModel("interpolate", 0.85), True, {Timed.FULL: m(10.0), Timed.MATMUL: m(4.0)}).value
9.1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from .config import CostModel
from .keys import Measurement, Timed

__all__ = ["Cost", "Option", "timed_parts", "op_cost", "weighted_cost", "pick", "is_tie"]


@dataclass(frozen=True)
class Cost:
    """Estimated seconds per call, with its relative noise band (half-IQR / median)."""

    value: float
    spread: float = 0.0


def timed_parts(cost_model: CostModel, dynamic_activation: bool) -> tuple[Timed, ...]:
    """What must be measured for one candidate under `cost_model`."""
    if cost_model.kind == "relu":
        return (Timed.RELU,)
    if dynamic_activation:
        return (Timed.FULL, Timed.MATMUL)
    return (Timed.FULL,)


def op_cost(cost_model: CostModel, dynamic_activation: bool, parts: Mapping[Timed, Measurement]) -> Cost:
    """The cost of one candidate on one op from its measured parts (all of `timed_parts`)."""
    if cost_model.kind == "relu":
        m = parts[Timed.RELU]
        return Cost(m.median_s, m.spread)
    full = parts[Timed.FULL]
    if not dynamic_activation:
        return Cost(full.median_s, full.spread)
    mm = parts[Timed.MATMUL]
    c = cost_model.c
    value = c * full.median_s + (1.0 - c) * mm.median_s
    spread = max(full.spread, mm.spread)
    return Cost(value, spread)


def weighted_cost(costs_and_counts: Sequence[tuple[Cost, int]]) -> Cost:
    """Count-weighted mean over a layer's ops; the spread is the count-weighted mean spread."""
    total = sum(n for _, n in costs_and_counts)
    if total <= 0:
        raise ValueError("a layer cost needs at least one recorded call")
    value = sum(c.value * n for c, n in costs_and_counts) / total
    spread = sum(c.spread * n for c, n in costs_and_counts) / total
    return Cost(value, spread)


@dataclass(frozen=True)
class Option:
    """One candidate for one layer, ready to be compared."""

    ident: str  # stable text naming the candidate (family + params JSON)
    cost: Cost
    sqnr_db: float  # +inf for lossless
    nbytes: int
    order: int


def is_tie(a: Cost, b: Cost, tolerance: float = 0.0) -> bool:
    """True when `a` and `b` differ by no more than the measured noise (plus `tolerance`)."""
    lo = min(a.value, b.value)
    if lo <= 0:
        return a.value == b.value
    band = max(a.spread, b.spread) + tolerance
    return abs(a.value - b.value) / lo <= band


def _preference(o: Option) -> tuple:
    sqnr = o.sqnr_db if not math.isnan(o.sqnr_db) else -math.inf
    return (-sqnr, o.nbytes, o.order, o.ident)


def pick(options: Sequence[Option], tolerance: float = 0.0) -> Option:
    """The winner among accuracy-passing `options`: the cheapest, where ties within noise go to
    the more accurate, then the smaller, then the earlier in the fixed order."""
    if not options:
        raise ValueError("no candidate to pick from")
    by_cost = sorted(options, key=lambda o: (o.cost.value, _preference(o)))
    best = by_cost[0]
    tied = [o for o in by_cost if is_tie(best.cost, o.cost, tolerance)]
    return min(tied, key=_preference)
