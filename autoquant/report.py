"""What was chosen and why, as pandas DataFrames (and text). Reads tuning results only: no torch
kernels, no database.

``TuningReport.to_frame()`` has one row per nn.Linear layer: status, recorded shapes and counts,
winner and kernel, cost and baseline cost in microseconds, speedup, SQNR, ``unseen_after`` (row
counts M the finalized layer has run on that the warm run never showed, with call counts), and one
column per candidate holding its cost in µs or the reason it has none. ``to_long_frame()`` has one row per
(layer, candidate). ``to_ops_frame()`` has one row per (op, candidate): how tuning treated it, its
cost predicted from probes at fewer rows, its first full-size call and its measured cost, so a
skipped candidate shows why it was never timed. The ops and long frames' ``timed`` column says
which timed path each cost came from (``full``, ``full+matmul``, ``relu``: CUDA-graph replays on a
GPU, eager calls on a CPU; ``eager``: synchronized eager calls on a GPU, marked "not capturable"
where graphs were wanted and the candidate could not be captured), and the summary states the
deployment the plan was selected for.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from .accuracy import BudgetResult
    from .config import CostModel
    from .hardware import Environment
    from .selection import LayerPlan

__all__ = ["TuningReport", "plot_report"]

log = logging.getLogger("autoquant")


def _us(seconds: float | None) -> float:
    return math.nan if seconds is None else seconds * 1e6


def _shapes(ops: dict) -> str:
    return "; ".join(f"{op.m}x{op.k}x{op.n} {op.dtype} x{n}" for op, n in sorted(ops.items()))


def _status(trial: Any) -> str:
    if trial.skipped or trial.reason:
        return trial.reason or "skipped"
    if trial.from_m is not None:
        return f"cached at M={trial.from_m} (nearest M; on_miss='nearest')"
    if trial.cached:
        return "cached"
    return "set aside: one full-size call" if trial.set_aside else "measured"


def _nearest_note(plan: Any) -> str:
    """' (planned from the nearest measured M: M=8 from M=16)' where on_miss="nearest" lent figures."""
    pairs = sorted({(op.m, t.from_m) for r in plan.rows for op, t in r.per_op.items() if t.from_m is not None})
    if not pairs:
        return ""
    return " (planned from the nearest measured M: " + ", ".join(f"M={m} from M={f}" for m, f in pairs) + ")"


def _timed(trial: Any, deployment: str) -> str:
    """Which timed path `trial`'s cost came from: its parts' names joined ('full+matmul',
    'eager'); an EAGER cost where graph replays were wanted says it is the fallback."""
    names = "+".join(p.value for p in trial.parts)
    if deployment == "graphs" and names == "eager":
        return "eager (not capturable: graph replay failed)"
    return names


def _weighted_prediction(ops: dict, per_op: dict) -> float:
    """Count-weighted mean, in µs, of the predicted cost over the ops that have one (NaN: none)."""
    pairs = [(per_op[op].prediction.point, n) for op, n in ops.items()
             if op in per_op and per_op[op].prediction is not None]
    total = sum(n for _, n in pairs)
    return _us(sum(p * n for p, n in pairs) / total) if total else math.nan


@dataclass
class TuningReport:
    layers: list["LayerPlan"]
    skipped: dict[str, str]
    environments: list["Environment"]
    cost_model: "CostModel"
    min_sqnr: float | None
    cache: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    # layer -> {M: calls} for row counts the layer met after finalize but was never tuned on
    # (refreshed from the model by autoquant.report / get_report).
    unseen_after: dict[str, dict[int, int]] = field(default_factory=dict)
    # With min_cosine: the budget, the verified cosines and the protected layers.
    accuracy: "BudgetResult | None" = None
    # TuneConfig.deployment: how the plan's costs were timed on a GPU ("eager" or "graphs").
    deployment: str = "eager"

    def timing_note(self) -> str:
        """What the plan's costs are: per device kind, the timed path the selection compared."""
        kinds = {e.device_kind for e in self.environments}
        notes = []
        if "cuda" in kinds:
            notes.append("selected for deployment 'eager' (GPU costs: synchronized eager calls, host time "
                         "included)" if self.deployment == "eager" else
                         "selected for deployment 'graphs' (GPU costs: CUDA-graph replays; eager calls where a "
                         "candidate could not be captured)")
        if kinds - {"cuda"}:
            notes.append("CPU costs: eager calls (deployment has no effect on a CPU)")
        return "; ".join(notes) or f"deployment '{self.deployment}'"

    def _unseen(self, name: str) -> str:
        seen = self.unseen_after.get(name)
        return "; ".join(f"M={m} x{n}" for m, n in sorted(seen.items())) if seen else ""

    # ---- per-layer view ---------------------------------------------------------------------
    def _winner_fields(self, plan: "LayerPlan") -> dict[str, Any]:
        if plan.dispatch is not None:
            d = plan.dispatch
            return {"winner": f"{d.small.family} | {d.large.family}",
                    "kernel": f"M<{d.threshold}: {d.small.kernel}, else {d.large.kernel}",
                    "params": f"{d.small.params_json()} | {d.large.params_json()}"}
        if plan.winner is not None:
            return {"winner": plan.winner.family, "kernel": plan.winner.kernel, "params": plan.winner.params_json()}
        return {"winner": "float", "kernel": "aten (kept)", "params": ""}

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for plan in self.layers:
            row: dict[str, Any] = {
                "layer": plan.name, "status": plan.status + _nearest_note(plan), "shapes": _shapes(plan.ops),
                "calls": sum(plan.ops.values()), **self._winner_fields(plan),
                "cost_us": _us(plan.cost.value if plan.cost else None),
                "baseline_us": _us(plan.baseline_cost.value if plan.baseline_cost else None),
                "speedup": plan.speedup, "sqnr_db": math.nan if plan.sqnr_db is None else plan.sqnr_db,
                "unseen_after": self._unseen(plan.name),
            }
            if self.accuracy is not None:
                row["protected"] = self._protected(plan.name)
            for r in plan.rows:
                row[r.candidate.name] = round(_us(r.cost.value), 3) if r.cost is not None and r.reason is None else (r.reason or "")
            rows.append(row)
        for name, why in self.skipped.items():
            rows.append({"layer": name, "status": f"skipped: {why}", "shapes": "", "calls": 0,
                         "winner": "float", "kernel": "aten (kept)", "params": "", "cost_us": math.nan,
                         "baseline_us": math.nan, "speedup": math.nan, "sqnr_db": math.nan, "unseen_after": "",
                         **({"protected": ""} if self.accuracy is not None else {})})
        frame = pd.DataFrame(rows)
        if self.accuracy is not None:
            frame.attrs["accuracy"] = self.accuracy.to_dict()
        return frame

    def _protected(self, name: str) -> str:
        """'' for a layer on its fastest candidate; else what it was moved from, and the cost."""
        assert self.accuracy is not None
        for p in self.accuracy.protected:
            if p.name == name:
                return f"from {p.was} (+{p.extra_us:.1f} us/call)"
        return ""

    def to_long_frame(self) -> pd.DataFrame:
        rows = []
        for plan in self.layers:
            chosen = set()
            if plan.winner is not None:
                chosen.add(plan.winner)
            if plan.dispatch is not None:
                chosen.update({plan.dispatch.small, plan.dispatch.large})
            for r in plan.rows:
                rows.append({
                    "layer": plan.name, "candidate": r.candidate.name, "family": r.candidate.family,
                    "kernel": r.candidate.kernel, "params": r.candidate.params_json(),
                    "cost_us": _us(r.cost.value if r.cost else None),
                    "spread": math.nan if r.cost is None else r.cost.spread,
                    "reason": r.reason or "", "sqnr_db": math.nan if r.sqnr_db is None else r.sqnr_db,
                    "packed_bytes": r.nbytes if r.nbytes is not None else math.nan,
                    "chosen": r.candidate in chosen,
                    "cached": bool(r.per_op) and all(t.cached for t in r.per_op.values()),
                    "skipped": any(t.skipped for t in r.per_op.values()),
                    "predicted_us": _weighted_prediction(plan.ops, r.per_op),
                    "timed": "; ".join(sorted({_timed(t, self.deployment) for t in r.per_op.values() if t.parts})),
                })
        return pd.DataFrame(rows)

    def to_ops_frame(self) -> pd.DataFrame:
        """One row per (op, candidate), each op once however many layers share it: `status`
        (measured, cached, skipped, set aside, or why it was not run), `predicted_us` (the probes'
        best guess at full size) and `predicted_low_us` (the bound skipping trusts), `first_call_us`
        (its first full-size call), `cost_us` and `samples` (what the cost rests on), `timed` (the
        timed path the cost came from; see the module doc)."""
        seen: dict[tuple[Any, str], dict[str, Any]] = {}
        for plan in self.layers:
            for r in plan.rows:
                for op, t in r.per_op.items():
                    key = (op, r.candidate.name)
                    if key in seen:
                        continue
                    part = next(iter(t.parts.values()), None)
                    seen[key] = {
                        "op": op.label(), "candidate": r.candidate.name, "status": _status(t),
                        "predicted_us": _us(t.prediction.point if t.prediction else None),
                        "predicted_low_us": _us(t.prediction.low if t.prediction else None),
                        "first_call_us": _us(t.first_call_s), "cost_us": _us(t.cost.value if t.cost else None),
                        "samples": part.samples if part is not None else 0,
                        "timed": _timed(t, self.deployment),
                    }
        return pd.DataFrame(list(seen.values()))

    def to_markdown(self) -> str:
        return self.summary_frame().to_markdown(index=False)

    def to_html(self) -> str:
        return self.summary_frame().to_html(index=False)

    def summary_frame(self) -> pd.DataFrame:
        cols = ["layer", "status", "shapes", "winner", "kernel", "cost_us", "baseline_us", "speedup", "sqnr_db",
                "unseen_after"] + (["protected"] if self.accuracy is not None else [])
        frame = self.to_frame()
        out = frame[cols]
        out.attrs.update(frame.attrs)
        return out

    # ---- one-paragraph summary --------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for plan in self.layers:
            key = self._winner_fields(plan)["winner"] if plan.status == "tuned" else plan.status.split(":")[0]
            out[key] = out.get(key, 0) + 1
        if self.skipped:
            out["skipped"] = len(self.skipped)
        return out

    def summary(self) -> str:
        envs = ", ".join(e.short() for e in self.environments) or "no device"
        chosen = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        mode = self.cost_model.kind + (f"({self.cost_model.c})" if self.cost_model.kind == "interpolate" else "")
        text = (f"autoquant: {len(self.layers)} layers in {self.seconds:.1f}s on {envs}; cost model {mode}; "
                f"chosen: {chosen or 'nothing'}; cache: {self.cache}\n  {self.timing_note()}")
        if self.accuracy is not None:
            text += "\n  " + self.accuracy.summary()
        if self.unseen_after:
            text += (f"\n  note: {len(self.unseen_after)} layer(s) met row counts M after finalize that the warm run "
                     "never showed (column 'unseen_after'); outputs are correct, but the kernels were chosen "
                     "for other shapes: tune on representative inputs for the best choice")
        return text + "".join(f"\n  warning: {w}" for w in self.warnings)

    def plot(self, path: str) -> str:
        """PNG of per-layer speedup and candidate times per op; see :func:`plot_report`."""
        return plot_report(self, path)

    def log_summary(self) -> None:
        log.info("%s", self.summary())
        for w in self.warnings:
            log.warning("%s", w)


def plot_report(rep: TuningReport, path: str) -> str:
    """Write a PNG with two panels: per-layer speedup over the float baseline, and each
    candidate's time per op (µs, log scale). Needs matplotlib (the [notebooks] extra)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError("plotting a report needs matplotlib: pip install 'autoquant-tuner[notebooks]'") from exc
    frame = rep.to_frame()
    tuned = frame[frame["status"] == "tuned"]
    per_op: dict[str, dict[str, float]] = {}
    for plan in rep.layers:
        for row in plan.rows:
            for op, trial in row.per_op.items():
                if trial.cost is not None:
                    per_op.setdefault(op.label(), {})[row.candidate.name] = trial.cost.value * 1e6
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(tuned) + 4), 9))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in tuned["speedup"].fillna(1.0)]
    ax1.bar(range(len(tuned)), tuned["speedup"].fillna(1.0), color=colors)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks(range(len(tuned)), [f"{l}\n{w}" for l, w in zip(tuned["layer"], tuned["winner"])],
                   rotation=90, fontsize=7)
    ax1.set_ylabel("speedup vs float baseline")
    ax1.set_title("per-layer speedup of the chosen kernel")
    ops = sorted(per_op)
    cands = sorted({c for v in per_op.values() for c in v})
    width = 0.8 / max(1, len(cands))
    for i, cand in enumerate(cands):
        ax2.bar([j + i * width for j in range(len(ops))], [per_op[o].get(cand, 0.0) for o in ops],
                width=width, label=cand)
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], ops, rotation=30, fontsize=7, ha="right")
    ax2.set_yscale("log")
    ax2.set_ylabel("µs per call")
    ax2.set_title("candidate times per op")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
