"""Typed, frozen configuration. Loose spellings are accepted only at the API edge and become these
at once (DESIGN.md section 7).

>>> CostModel.parse(("interpolate", 0.85))
CostModel(kind='interpolate', c=0.85)
>>> CostModel.parse("relu").kind
'relu'
>>> TuneConfig.from_json(TuneConfig(min_sqnr=30.0).to_json()).min_sqnr
30.0
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .bench import BenchConfig

__all__ = ["DEPLOYMENTS", "CostModel", "TuneConfig", "check_deployment", "check_min_cosine"]

CostKind = Literal["relu", "interpolate"]
# How the tuned model will run on a GPU: "eager" (finalized layers called through Python, one
# launch after another) or "graphs" (captured in CUDA graphs, or torch.compile(mode=
# "reduce-overhead")). See TuneConfig.deployment.
DEPLOYMENTS = ("eager", "graphs")


@dataclass(frozen=True)
class CostModel:
    """`relu`: every candidate timed as relu(op(relu(x))). `interpolate`: for dynamic-activation
    schemes cost = c * t_full + (1 - c) * t_matmul; other schemes cost t_full."""

    kind: CostKind = "interpolate"
    c: float = 0.85

    def __post_init__(self) -> None:
        if self.kind not in ("relu", "interpolate"):
            raise ValueError(f"unknown cost model {self.kind!r}: use 'relu' or ('interpolate', c)")
        if not 0.0 <= self.c <= 1.0:
            raise ValueError(f"interpolate weight c must be within [0, 1], got {self.c}")

    @classmethod
    def parse(cls, mode: Any) -> "CostModel":
        """Accept a CostModel, 'relu', 'interpolate', ('relu',), ('interpolate', c)."""
        if isinstance(mode, CostModel):
            return mode
        if isinstance(mode, str):
            return cls(kind=mode)  # type: ignore[arg-type]
        if isinstance(mode, (tuple, list)) and mode and isinstance(mode[0], str):
            if mode[0] == "relu" and len(mode) == 1:
                return cls(kind="relu")
            if mode[0] == "interpolate" and len(mode) in (1, 2):
                return cls(kind="interpolate", c=float(mode[1]) if len(mode) == 2 else 0.85)
        raise ValueError(
            f"mode={mode!r} is not a cost model: pass 'relu', 'interpolate' or ('interpolate', 0.85)"
        )


@dataclass(frozen=True)
class TuneConfig:
    """How one autoquant run tunes. `candidates` is None for the device's defaults, else a tuple of
    (family, params-JSON) pairs. `tie_tolerance` is the smallest relative cost difference that is
    never called a tie, on top of the measured spread. Candidates whose first calls are
    `hopeless_factor` times slower than the fastest keep a rough single-sample figure, and on a
    large op (M >= 64) a candidate predicted from probes at fewer rows to be that much slower than
    the best is skipped without a full-size call (0: both off). `op_budget_s` is the time one op's
    timing aims to take: samples adapt to it (never fewer than ``bench.min_samples``), so a large
    op is timed in seconds, not minutes; None: every job gets its full sample count.

    `min_cosine` is the model-level accuracy budget (in (0, 1], None: none): every floating
    output tensor's mean per-sample cosine similarity to the float model's, on the recorded
    inputs, stays at or above it. The budget solver aims at `budget_margin` times the allowed
    drop (1 - min_cosine), leaving room for inputs that were not recorded; what is verified is
    the budget itself. `verify_rounds` bounds the solve-and-verify rounds after the first miss;
    `verify_calls` the model calls kept (inputs and float outputs) for verification.

    `deployment` is how the tuned model will run on a GPU, and so what a candidate's cost is there:
    "eager" (the default: a finalized layer runs eagerly through Python, so each candidate is timed
    as synchronized eager calls, host time included, ``Timed.EAGER``; the cost model's fusion
    stand-ins do not apply, eager calls do not fuse) or "graphs" (the model is captured in CUDA
    graphs or compiled with mode="reduce-overhead": candidates are timed as CUDA-graph replays, GPU
    time only, under `cost_model`; a candidate that cannot be captured is timed eagerly and costs
    that). The default is "eager" because that is how a finalized model runs unless its user
    captures or compiles it, and on a GPU the two disagree (an eager call of a Triton-backed layer
    costs many times its graph replay at M=1: benchmarks/results/gpu/h200-2026-11-30/report.md).
    On a CPU every timed call is already eager: the setting is accepted and changes nothing."""

    cost_model: CostModel = field(default_factory=CostModel)
    min_sqnr: float | None = None
    candidates: tuple[tuple[str, str], ...] | None = None
    tie_tolerance: float = 0.0
    retime_top: int = 2
    hopeless_factor: float = 4.0
    activation_rows: int = 64
    op_budget_s: float | None = 5.0
    bench: BenchConfig = field(default_factory=BenchConfig)
    min_cosine: float | None = None
    budget_margin: float = 0.8
    verify_rounds: int = 4
    verify_calls: int = 16
    deployment: str = "eager"

    def __post_init__(self) -> None:
        check_deployment(self.deployment)
        if self.min_sqnr is not None and not isinstance(self.min_sqnr, (int, float)):
            raise ValueError(f"min_sqnr must be a number of dB or None, got {self.min_sqnr!r}")
        if self.min_cosine is not None:
            check_min_cosine(self.min_cosine)
        if not 0.0 < self.budget_margin <= 1.0:
            raise ValueError(f"budget_margin must be within (0, 1], got {self.budget_margin!r}")
        if self.verify_rounds < 1 or self.verify_calls < 1:
            raise ValueError("verify_rounds and verify_calls must be >= 1")
        if self.tie_tolerance < 0:
            raise ValueError("tie_tolerance must be >= 0")
        if self.activation_rows < 1:
            raise ValueError("activation_rows must be >= 1")
        if self.op_budget_s is not None and not self.op_budget_s > 0:
            raise ValueError(f"op_budget_s must be > 0 seconds or None (no budget), got {self.op_budget_s!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TuneConfig":
        data = json.loads(text)
        cands = data.get("candidates")
        return cls(
            cost_model=CostModel(**data["cost_model"]),
            min_sqnr=data.get("min_sqnr"),
            candidates=None if cands is None else tuple((f, p) for f, p in cands),
            tie_tolerance=data.get("tie_tolerance", 0.0),
            retime_top=data.get("retime_top", 2),
            hopeless_factor=data.get("hopeless_factor", 4.0),
            activation_rows=data.get("activation_rows", 64),
            op_budget_s=data.get("op_budget_s", 5.0),
            bench=BenchConfig(**data.get("bench", {})),
            min_cosine=data.get("min_cosine"),
            budget_margin=data.get("budget_margin", 0.8),
            verify_rounds=data.get("verify_rounds", 4),
            verify_calls=data.get("verify_calls", 16),
            deployment=data.get("deployment", "eager"),
        )


def check_deployment(value: object) -> str:
    """`value` as a deployment name, or a ValueError saying which ones exist.

    >>> check_deployment("graphs")
    'graphs'
    """
    if value not in DEPLOYMENTS:
        raise ValueError(
            f"deployment={value!r} is not a deployment: use 'eager' (the tuned model runs eagerly, "
            "the default) or 'graphs' (you capture it in CUDA graphs or torch.compile it with "
            "mode='reduce-overhead')")
    return str(value)


def check_min_cosine(value: object) -> float:
    """`value` as a model-level cosine budget, or a ValueError saying what a budget must be.

    >>> check_min_cosine(0.99)
    0.99
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"min_cosine must be a number in (0, 1] (e.g. 0.99), got {value!r}")
    v = float(value)
    if math.isnan(v) or not 0.0 < v <= 1.0:
        raise ValueError(
            f"min_cosine={value!r} is outside (0, 1]: it is the lowest cosine similarity the quantized "
            "model's outputs may have to the float model's, e.g. 0.99 (1.0 keeps every layer float)")
    return v
