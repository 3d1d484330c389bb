"""Cost models and the tie-break, on hand-made measurements (no timing)."""

import math

import pytest

from autoquant.config import CostModel
from autoquant.costmodel import Cost, Option, is_tie, op_cost, pick, timed_parts, weighted_cost
from autoquant.keys import Measurement, Timed


def m(t: float, spread: float = 0.0) -> Measurement:
    return Measurement(t, t * (1 - spread), t * (1 + spread), 5)


def test_timed_parts_per_model():
    relu, interp = CostModel("relu"), CostModel("interpolate", 0.85)
    assert timed_parts(relu, True) == (Timed.RELU,)
    assert timed_parts(relu, False) == (Timed.RELU,)
    assert timed_parts(interp, True) == (Timed.FULL, Timed.MATMUL)
    assert timed_parts(interp, False) == (Timed.FULL,)


@pytest.mark.parametrize("c", [0.0, 0.5, 0.85, 1.0])
def test_interpolate_exact_formula(c):
    cost = op_cost(CostModel("interpolate", c), True, {Timed.FULL: m(10e-6), Timed.MATMUL: m(4e-6)})
    assert cost.value == pytest.approx(c * 10e-6 + (1 - c) * 4e-6, rel=1e-12)


def test_interpolate_ignores_matmul_for_static_schemes():
    cost = op_cost(CostModel("interpolate", 0.5), False, {Timed.FULL: m(10e-6), Timed.MATMUL: m(1e-6)})
    assert cost.value == 10e-6


def test_relu_uses_relu_timing_only():
    cost = op_cost(CostModel("relu"), True, {Timed.RELU: m(7e-6), Timed.FULL: m(1e-6)})
    assert cost.value == 7e-6


def test_weighted_cost_is_count_weighted_mean():
    cost = weighted_cost([(Cost(1.0), 3), (Cost(5.0), 1)])
    assert cost.value == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least one recorded call"):
        weighted_cost([(Cost(1.0), 0)])


def test_tie_within_spread_only():
    assert is_tie(Cost(1.0, 0.05), Cost(1.04, 0.01))
    assert not is_tie(Cost(1.0, 0.01), Cost(1.04, 0.01))
    assert is_tie(Cost(1.0), Cost(1.04), tolerance=0.05)


def opt(ident, value, sqnr=30.0, nbytes=100, order=1, spread=0.0):
    return Option(ident, Cost(value, spread), sqnr, nbytes, order)


def test_pick_cheapest_when_clear():
    assert pick([opt("a", 2.0), opt("b", 1.0)]).ident == "b"


def test_pick_tie_prefers_accurate_then_small_then_order():
    # a and b tie within noise: the more accurate wins even though it is slightly slower.
    assert pick([opt("a", 1.00, sqnr=20, spread=0.1), opt("b", 1.05, sqnr=40, spread=0.1)]).ident == "b"
    # same accuracy: the smaller wins
    assert pick([opt("a", 1.0, nbytes=200), opt("b", 1.0, nbytes=100)]).ident == "b"
    # same everything: the fixed order, then the ident
    assert pick([opt("z", 1.0, order=2), opt("y", 1.0, order=1)]).ident == "y"
    assert pick([opt("b", 1.0), opt("a", 1.0)]).ident == "a"


def test_pick_is_deterministic_under_permutation():
    options = [opt(str(i), 1.0 + (i % 3) * 1e-9, sqnr=10 + i % 2, nbytes=i % 4) for i in range(12)]
    winners = {pick(options[i:] + options[:i]).ident for i in range(len(options))}
    assert len(winners) == 1


def test_pick_handles_lossless_and_nan():
    assert pick([opt("float", 1.0, sqnr=math.inf), opt("q", 1.0, sqnr=40)]).ident == "float"
    assert pick([opt("nan", 1.0, sqnr=math.nan), opt("q", 1.0, sqnr=1)]).ident == "q"


def test_parse_modes_and_errors():
    assert CostModel.parse(("interpolate", 0.5)) == CostModel("interpolate", 0.5)
    assert CostModel.parse(("relu",)) == CostModel("relu")
    assert CostModel.parse("interpolate").c == 0.85
    with pytest.raises(ValueError, match="not a cost model"):
        CostModel.parse(("fast", 1))
    with pytest.raises(ValueError, match="within"):
        CostModel("interpolate", 1.5)
