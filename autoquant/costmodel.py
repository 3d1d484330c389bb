"""Cost models and selection (DESIGN.md section 4): pure functions over measurements, no torch.

- ``relu``: a candidate's op cost is its RELU-wrapped time.
- ``interpolate(c)``: dynamic-activation schemes cost ``c * t_full + (1 - c) * t_matmul``; the rest
  cost ``t_full``.
- On CUDA, the deployment (``TuneConfig.deployment``) decides what is timed: "eager" times every
  candidate as synchronized eager calls (``Timed.EAGER``) and costs that, whatever the cost model:
  relu and interpolate model the fusion with neighbours a compiled model gets, and eager calls do
  not fuse. "graphs" times the parts above as CUDA-graph replays; a candidate that cannot be
  captured has an EAGER figure instead (``fallback_parts``), and costs that. On a CPU, FULL already
  is an eager call: the deployment changes nothing there.
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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from .config import CostModel, check_deployment
from .keys import Measurement, Timed

__all__ = [
    "LINEAR_SLOPE",
    "SLOPE_TRUST",
    "Cost",
    "Option",
    "Prediction",
    "fallback_parts",
    "hopeless_prediction",
    "is_tie",
    "op_cost",
    "pick",
    "predict",
    "primary_part",
    "probe_rows",
    "timed_parts",
    "timing_path",
    "usable_parts",
    "weighted_cost",
]


@dataclass(frozen=True)
class Cost:
    """Estimated seconds per call, with its relative noise band (half-IQR / median)."""

    value: float
    spread: float = 0.0


def timing_path(device: str, deployment: str) -> str:
    """"eager" where candidates are timed as synchronized eager calls (a CUDA device deployed
    eagerly), "graphs" where as CUDA-graph replays (CUDA, deployed in graphs), "cpu" elsewhere
    (FULL is an eager call there). `device` is a device type ("cpu", "cuda").

    >>> timing_path("cuda", "eager"), timing_path("cuda", "graphs"), timing_path("cpu", "graphs")
    ('eager', 'graphs', 'cpu')
    """
    if device != "cuda":
        return "cpu"
    return check_deployment(deployment)


def timed_parts(cost_model: CostModel, dynamic_activation: bool, *, device: str = "cpu",
                deployment: str = "eager") -> tuple[Timed, ...]:
    """What must be measured for one candidate under `cost_model` on a `device` of that type
    deployed as `deployment` (CUDA eager: the eager call alone; elsewhere the cost model's parts).

    >>> timed_parts(CostModel(), True, device="cuda"), timed_parts(CostModel(), True)
    ((<Timed.EAGER: 'eager'>,), (<Timed.FULL: 'full'>, <Timed.MATMUL: 'matmul'>))
    """
    if timing_path(device, deployment) == "eager":
        return (Timed.EAGER,)
    if cost_model.kind == "relu":
        return (Timed.RELU,)
    if dynamic_activation:
        return (Timed.FULL, Timed.MATMUL)
    return (Timed.FULL,)


def fallback_parts(device: str = "cpu", deployment: str = "eager") -> tuple[Timed, ...]:
    """What a candidate that cannot be captured in a CUDA graph is timed as instead of its
    `timed_parts`: (EAGER,) on CUDA deployed in graphs, so that the row says which path ran;
    () elsewhere (nothing is captured)."""
    return (Timed.EAGER,) if timing_path(device, deployment) == "graphs" else ()


def usable_parts(cost_model: CostModel, dynamic_activation: bool, have: Collection[Timed], *,
                 device: str = "cpu", deployment: str = "eager") -> tuple[Timed, ...] | None:
    """The parts a candidate's cost comes from, given the parts `have` measured: its
    `timed_parts` when all are there, else its `fallback_parts` when those are, else None."""
    for parts in (timed_parts(cost_model, dynamic_activation, device=device, deployment=deployment),
                  fallback_parts(device, deployment)):
        if parts and all(p in have for p in parts):
            return parts
    return None


def primary_part(cost_model: CostModel, *, device: str = "cpu", deployment: str = "eager") -> Timed:
    """The part every candidate has under `cost_model` (and the timing path), what screening and
    prediction compare."""
    if timing_path(device, deployment) == "eager":
        return Timed.EAGER
    return Timed.RELU if cost_model.kind == "relu" else Timed.FULL


def op_cost(cost_model: CostModel, dynamic_activation: bool, parts: Mapping[Timed, Measurement]) -> Cost:
    """The cost of one candidate on one op from its measured parts (all of `timed_parts`, or of
    `fallback_parts`). An EAGER figure is the cost as it is, under any cost model: eager calls do
    not fuse with their neighbours, so neither relu nor interpolate applies to them."""
    if Timed.EAGER in parts:
        m = parts[Timed.EAGER]
        return Cost(m.median_s, m.spread)
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


# ---- predicting a large op's cost from the same op at fewer rows ---------------------------------
# Probe rows grow 4x from 1; the largest is at most M / 16, so probing a kernel whose time grows
# linearly in M costs about a fifth of one full-size call (1/16 + 1/64 + ...), however large M is.
_PROBE_STEP = 4
_PROBE_GAP = 16
# How much of a kernel's measured growth between its two largest probes the lower bound trusts.
# A kernel's log-time vs log-M slope often falls at large M (it blocks better), so extrapolating
# the probes' slope at full strength can over-predict; three quarters of it keeps the bound below
# the measured full-size time of the slow CPU kernels (issue 19's table), and skipping also needs
# two probes in a row to agree (``hopeless_prediction``).
SLOPE_TRUST = 0.75
# Below this slope a kernel is still weight-bound at the probes (fast kernels read their weight in
# about the same time at 1 and 16 rows), and a slope that small cannot be told from noise (one
# probe 1.45x slow between 1 and 4 rows reads as 0.27): the bound then extrapolates nothing.
LINEAR_SLOPE = 0.75


def probe_rows(m: int) -> tuple[int, ...]:
    """Row counts at which an op with `m` rows is probed before any full-size call: 1, 4, 16, ...
    up to m / 16; empty when fewer than two fit (a full-size call is then cheap enough)."""
    rows = []
    r = 1
    while r * _PROBE_GAP <= m:
        rows.append(r)
        r *= _PROBE_STEP
    return tuple(rows) if len(rows) >= 2 else ()


@dataclass(frozen=True)
class Prediction:
    """A candidate's seconds per call at `m` rows, predicted from its times at fewer rows (`rows`:
    (rows, seconds) ascending). `low` is a lower bound, what skipping trusts; `point` the best
    guess (the probes' growth extrapolated in full), what orders the first full-size calls."""

    m: int
    low: float
    point: float
    rows: tuple[tuple[int, float], ...]

    def describe(self) -> str:
        probes = ", ".join(f"{_fmt_s(t)} at M={r}" for r, t in self.rows)
        return f"predicted >= {_fmt_s(self.low)} at M={self.m} (from {probes})"


def _fmt_s(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} us"


def predict(rows: Sequence[tuple[int, float]], m: int, trust: float = SLOPE_TRUST) -> Prediction:
    """Extrapolate timings at fewer rows (ascending) to `m` rows. A kernel's time never falls as M
    grows, and grows at most linearly (per-row cost falls as blocking improves), so the slope of
    log-time vs log-M between the two largest probes is clamped to [0, 1]. The lower bound grows
    only from a near-linear slope (`LINEAR_SLOPE`), and then by `trust` of it; otherwise it is the
    largest probe's time.

    >>> p = predict([(1, 1e-3), (4, 4e-3)], 64)
    >>> round(p.point, 6), round(p.low, 6)
    (0.064, 0.032)
    """
    if not rows:
        raise ValueError("a prediction needs at least one timing at fewer rows")
    last_m, last_t = rows[-1]
    slope = 0.0
    if len(rows) >= 2:
        prev_m, prev_t = rows[-2]
        if prev_t > 0 and last_t > 0 and last_m > prev_m:
            slope = min(1.0, max(0.0, math.log(last_t / prev_t) / math.log(last_m / prev_m)))
    ratio = max(1.0, m / last_m)
    grows = trust * slope if slope >= LINEAR_SLOPE else 0.0
    return Prediction(m=m, low=last_t * ratio ** grows, point=last_t * ratio ** slope, rows=tuple(rows))


def hopeless_prediction(rows: Sequence[tuple[int, float]], m: int, factor: float, best: float) -> Prediction | None:
    """The first prediction whose lower bound exceeds `factor` x `best` seconds (the candidate
    cannot come within `factor` of the best) and whose predecessor, from one probe fewer, says
    the same; else None. Two in a row, because one step can mislead: a kernel with a fast path
    for one row (a matrix-vector product) jumps from 1 to 4 rows, then grows slowly. Taking the
    first such prefix makes the answer the same whether the probes are measured now or read from
    the cache, where a candidate skipped at its k-th probe has exactly k probes stored.

    >>> rows = [(1, 1e-3), (4, 4e-3), (16, 16e-3)]
    >>> hopeless_prediction(rows, 4096, 4.0, 0.02).rows[-1]
    (16, 0.016)
    >>> hopeless_prediction([(1, 1e-4), (4, 4e-3), (16, 4.2e-3)], 4096, 4.0, 0.05) is None
    True
    """
    if factor <= 0 or not math.isfinite(best):
        return None
    bar = factor * best
    for i in range(3, len(rows) + 1):
        if predict(rows[: i - 1], m).low > bar and (p := predict(rows[:i], m)).low > bar:
            return p
    return None
