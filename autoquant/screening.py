"""Screening: which candidates of one op get a full timing (issue 19). A large op's slow kernels
would cost seconds per full-size call; probes at fewer rows predict each candidate's cost, and
one predicted beyond ``hopeless_factor`` times the best is skipped, never timed at full size and
never stored as a measurement. The probes are stored (they are measurements of their own
shapes), so a warm cache reaches the same decisions without timing anything.

Screening compares like with like: a candidate's first call (``Timer.quick``) and its probes are
timed on the path its rows will say (on CUDA: synchronized eager calls for ``Timed.EAGER``, graph
replays for the graph parts), and compared with the best figure of the op's primary part; a
candidate that cannot be captured where graphs are wanted is timed and stored as EAGER, as its
cost is (``costmodel.fallback_parts``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from .candidates import Candidate, is_baseline
from .config import TuneConfig
from .costmodel import Prediction, fallback_parts, hopeless_prediction, predict, primary_part, probe_rows
from .keys import BenchKey, Measurement, OpShape, Timed
from .opbench import OpBench, Trial, bench_key, check_fatal, measure_jobs

__all__ = ["Screen", "best_known", "probe_keys", "skip_reason", "skipped_by_cache"]

log = logging.getLogger("autoquant")


def best_known(found: Mapping[BenchKey, Measurement], op: OpShape, part: Timed) -> float:
    """The fastest `part` figure of any candidate on `op` among `found` (inf: none)."""
    return min((v.median_s for k, v in found.items() if k.op == op and k.timed is part), default=math.inf)


def _probe_rows_of(found: Mapping[BenchKey, Measurement], key_at: Callable[[int], BenchKey],
                   op: OpShape) -> list[tuple[int, float]]:
    """(rows, seconds) of the probes in `found`, from the first, as long as none is missing."""
    rows = []
    for m in probe_rows(op.m):
        meas = found.get(key_at(m))
        if meas is None:
            break
        rows.append((m, meas.p25_s))
    return rows


# Probing pays off only where a full-size call of a slow kernel is expensive. CPU kernels without a
# fast path for an op (int8pack, int4 tinygemm on fp32 activations) run tens of times slower than
# the baseline at large M (issue 19: 40-220x on a 4096-row op), so an op is probed when that many
# baseline calls would last over a second: where one slow call is cheaper, it is just made.
_SLOW_KERNEL_RATIO = 50.0
_PROBE_WORTH_S = 1.0
# Samples per probe at 1 and 4 rows, where every candidate is probed; predictions read their lower
# quartile (the 2nd fastest of 5): another process only ever adds time, so a probe misleads only
# if most of its samples were hit. Higher probes (slow kernels, mostly) take the timer's minimum.
_PROBE_SAMPLES = 5


class Screen:
    """Decides which candidates of one op get a full timing, before any candidate pays more than
    one full-size call, and most none. The float baseline is never skipped (every speedup in the
    report is measured against it): its first full-size call comes first and sets the bar.

    On a large op (see ``probe_rows``) where slow kernels would cost seconds per call, the other
    candidates are then timed at 1, 4, ... rows (stored: they are measurements of those shapes,
    and what a warm cache predicts from), climbing only while their prediction is in doubt; one
    whose lower bound exceeds `hopeless_factor` times the best at two probes in a row is skipped
    (``hopeless_prediction``). Each remaining
    candidate, cheapest predicted first, makes one full-size call unless the best by then rules
    it out; a call `hopeless_factor` times slower than the best sets it aside (the probes
    under-predicted it: it costs that one call, no more)."""

    def __init__(self, bench: OpBench, known: Mapping[BenchKey, Measurement]) -> None:
        self.bench, self.known = bench, known
        self.factor = bench.config.hopeless_factor
        self.best = best_known(known, bench.op, bench.primary)
        self.rows: dict[Candidate, list[tuple[int, float]]] = {c: [] for c in bench.built}
        self.first: dict[Candidate, float] = {}
        self.skipped: dict[Candidate, Prediction] = {}
        self.fresh: dict[BenchKey, Measurement] = {}

    def run(self) -> None:
        if self.factor <= 0 or not self.bench.built:
            return
        if len(self.bench.built) < 2 and not math.isfinite(self.best):
            return
        for cand in [c for c in self.bench.built if is_baseline(c)]:
            self.first_call(cand)
        if self._worth_probing():
            self._probe()
        self._first_calls()

    def _worth_probing(self) -> bool:
        if not probe_rows(self.bench.op.m):
            return False
        # nothing to compare with (no baseline, nothing cached): probe, the op may be large
        return not math.isfinite(self.best) or self.best * _SLOW_KERNEL_RATIO >= _PROBE_WORTH_S

    def prediction(self, cand: Candidate) -> Prediction | None:
        rows = self.rows.get(cand, [])
        return predict(rows, self.bench.op.m) if len(rows) >= 2 else None

    def set_aside(self) -> dict[Candidate, float]:
        return {c: t for c, t in self.first.items() if t > self.factor * self.best}

    def _probe(self) -> None:
        bench, op = self.bench, self.bench.op
        rungs = probe_rows(op.m)
        undecided = [c for c in bench.built if c not in self.first]
        for i, m in enumerate(rungs):
            need = [c for c in undecided if bench.key(c, m) not in self.known]
            if need:  # no budget beyond _PROBE_SAMPLES: a probe informs a decision, it is not one
                jobs = bench.cold_jobs(need, bench.copies_for(need), rows=m)
                least = _PROBE_SAMPLES if i < 2 else None  # higher probes: only the slow climb
                self.fresh.update(measure_jobs(bench.timer, jobs, bench.device, 0.0, least))
            for cand in list(undecided):
                meas = self.fresh.get(bench.key(cand, m)) or self.known.get(bench.key(cand, m))
                if meas is None or cand not in bench.built:  # left to the full-size path
                    undecided.remove(cand)
                    continue
                self.rows[cand].append((m, meas.p25_s))  # noise only adds time: the lower quartile
                bench.probe_s[cand] = meas.p25_s
            if i == 0 or not undecided:
                continue
            if not math.isfinite(self.best):  # a real full-size figure to compare against
                lead = min(undecided, key=lambda c: (predict(self.rows[c], op.m).point, c.order, c.params_json()))
                self.first_call(lead)
                undecided.remove(lead)
            more = []
            for cand in undecided:
                hopeless = hopeless_prediction(self.rows[cand], op.m, self.factor, self.best)
                if hopeless is not None and not is_baseline(cand):
                    self.skipped[cand] = hopeless
                    continue
                p = predict(self.rows[cand], op.m)
                cached_next = i + 1 < len(rungs) and bench.key(cand, rungs[i + 1]) in self.known
                if p.point > self.factor * self.best or cached_next:
                    more.append(cand)  # in doubt, not yet confirmed, or free to refine: one more probe
            undecided = more

    def _first_calls(self) -> None:
        op = self.bench.op
        rest = [c for c in self.bench.built if c not in self.skipped and c not in self.first]
        rest.sort(key=lambda c: (p.point if (p := self.prediction(c)) else 0.0))  # stable: small ops keep order
        for cand in rest:
            p = hopeless_prediction(self.rows[cand], op.m, self.factor, self.best)
            if p is not None and not is_baseline(cand):
                self.skipped[cand] = p
            elif cand in self.bench.built:
                self.first_call(cand)

    def first_call(self, cand: Candidate) -> None:
        """One full-size call (the timer's quick figure) of `cand`; lowers the bar if faster."""
        try:
            t = self.bench.timer.quick(self.bench.first_job(cand), self.bench.device)
        except Exception as exc:  # left to the full timing, which records the failure
            check_fatal(exc, self.bench.device, f"screening {cand.name}")
            log.debug("screening %s on %s failed: %s", cand.name, self.bench.op.label(), exc)
            return
        self.first[cand] = t
        self.bench.first_calls[cand] = t
        self.best = min(self.best, t)

    def reconcile(self, best: float) -> list[Candidate]:
        """Against `best`, the op's best full figure as the cache will hold it: candidates skipped
        against an earlier, lower bar that their probes no longer rule out get their first call
        (so a warm cache, which compares with `best`, skips exactly those skipped now); returns
        them."""
        self.best = best
        late = [c for c in self.skipped
                if hopeless_prediction(self.rows[c], self.bench.op.m, self.factor, best) is None]
        for cand in late:
            del self.skipped[cand]
            self.first_call(cand)
        self.best = best
        return late


def skip_reason(p: Prediction, factor: float, best: float) -> str:
    return (f"skipped: {p.describe()}, over {factor:g}x the best {_seconds(best)}; never timed at "
            "full size (TuneConfig(hopeless_factor=0) times every candidate)")


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def probe_keys(ops: Mapping[OpShape, Sequence[Candidate]], results: Mapping[OpShape, Mapping[Candidate, Trial]],
                env_hash: str, config: TuneConfig, device: str = "cpu") -> list[BenchKey]:
    """Cache keys of the probes (same op at fewer rows) of every candidate that can run."""
    if config.hopeless_factor <= 0:
        return []
    parts = _probe_parts(config, device)
    return [bench_key(env_hash, cand, replace(op, m=m), part)
            for op, cands in ops.items() for m in probe_rows(op.m)
            for cand in cands if results[op][cand].reason is None for part in parts]


def _probe_parts(config: TuneConfig, device: str) -> tuple[Timed, ...]:
    """The part probes are stored under: the primary part, then the fallback (EAGER, on CUDA
    deployed in graphs) of a candidate that could not be captured."""
    path = {"device": device, "deployment": config.deployment}
    return (primary_part(config.cost_model, **path), *fallback_parts(**path))


def skipped_by_cache(op: OpShape, trial: Trial, found: Mapping[BenchKey, Measurement], env_hash: str,
                      config: TuneConfig, device: str = "cpu") -> bool:
    """Whether the cache alone rules `trial`'s candidate out on `op`: its cached probes predict it
    beyond `hopeless_factor` times the best cached figure of the op (so a warm cache times nothing,
    though skipped candidates are never stored). Marks the trial skipped if so."""
    if config.hopeless_factor <= 0 or not probe_rows(op.m) or is_baseline(trial.candidate):
        return False
    primary, *fallback = _probe_parts(config, device)
    best = best_known(found, op, primary)
    rows: list[tuple[int, float]] = []
    for part in (primary, *fallback):  # an uncapturable candidate's probes are its fallback's
        rows = rows or _probe_rows_of(
            found, lambda m, part=part: bench_key(env_hash, trial.candidate, replace(op, m=m), part), op)
    p = hopeless_prediction(rows, op.m, config.hopeless_factor, best)
    if p is None:
        return False
    trial.prediction, trial.skipped, trial.cached = p, True, True
    trial.reason = skip_reason(p, config.hopeless_factor, best)
    return True
