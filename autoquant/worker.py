"""Pre-tuning workers: keep a shared tuning cache full for this machine's device (issue 17).

A worker looks at every shape profile stored in the cache, splits their ops into units (one op and
the candidate set for it on this device), skips the units already done for this machine's
environment fingerprint, and for each other unit: claims it (``autoquant.cache_db.claims``), times
what the cache lacks exactly as ``pretune`` does, writes the measurements, marks the unit done. N
workers of one SKU on one cache therefore split the work and time nothing twice; a worker that dies
leaves a claim whose lease runs out, after which another worker takes the unit over. Storing a
profile (``autoquant profile ... --cache URL --name NAME``) is all it takes to have workers pick it up.

    python -m autoquant.worker --cache postgresql://... --until-idle     # or: autoquant worker ...

SIGTERM / SIGINT: the unit being timed is finished and written, then the worker exits (a second
signal stops at once, leaving the claim to run out). A cache that cannot be reached is retried with
backoff (1, 2, 4, ... 60 s), said once per outage in the log, never a crash loop.

>>> import torch
>>> from autoquant.bench import FakeTimer
>>> from autoquant.cache_db import SQLStore
>>> from autoquant.profile import record_shapes
>>> store = SQLStore("sqlite://")  # in memory
>>> p = record_shapes(torch.nn.Linear(8, 4), torch.randn(2, 8), name="tiny")
>>> store.save_profile(p.name, p.model_fingerprint, p.counts())
>>> Worker(store, device="cpu", timer=FakeTimer(lambda k: 1e-6)).run(until_idle=True).units_done
1
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from .bench import BenchConfig, Timer, default_timer
from .config import DEPLOYMENTS, CostModel, TuneConfig
from .hardware import environment
from .keys import OpShape, canonical_json

__all__ = ["CoverageRow", "Unit", "Worker", "WorkerSummary", "coverage", "coverage_lines", "main", "pending_units",
           "unit_key"]

log = logging.getLogger("autoquant.worker")

_MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Unit:
    """One op of the stored profiles and the candidates to time for it on this device."""

    key: str
    op: OpShape
    candidates: tuple[Any, ...]
    profiles: tuple[str, ...]


@dataclass
class WorkerSummary:
    """What a run did: units finished (timed now or found measured), units another worker had
    let lapse and this one took over, (op, candidate) parts timed, and cache outages."""

    owner: str
    environment: str
    units_done: int = 0
    taken_over: int = 0
    timed: int = 0
    cached: int = 0
    outages: int = 0
    claim_seconds: float = 0.0  # spent claiming and completing units (the coordination cost)
    stopped_by_signal: bool = False
    seconds: float = 0.0

    def line(self) -> str:
        return (f"worker {self.owner} on {self.environment}: {self.units_done} units done "
                f"({self.taken_over} taken over), {self.timed} parts timed, {self.cached} found cached, "
                f"{self.outages} cache outages, {self.seconds:.1f}s ({self.claim_seconds:.2f}s claiming)"
                + ("; stopped by a signal" if self.stopped_by_signal else ""))


def unit_key(op: OpShape, candidates: Sequence[Any], timed: str | None = None) -> str:
    """The name of a unit in the claims table: the op and a digest of its candidate set (another
    candidate list, or a new candidate version, is another unit). `timed`: "eager" for a GPU
    timed for an eager deployment (another unit than the graph replays a GPU unit meant before
    TuneConfig.deployment existed, whose name is unchanged), None elsewhere."""
    names = sorted(f"{c.family}:{c.params_json()}:{c.version}" for c in candidates)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return canonical_json({"m": op.m, "k": op.k, "n": op.n, "bias": op.bias, "dtype": op.dtype,
                           "candidates": digest, **({"timed": timed} if timed else {})})


def _unit_timed(device: torch.device, deployment: str) -> str | None:
    return "eager" if device.type == "cuda" and deployment == "eager" else None


def pending_units(store: Any, env_hash: str, device: torch.device,
                  candidates: Sequence[Any] | None = None, deployment: str = "eager") -> list[Unit]:
    """Units of every stored profile not done yet for `env_hash`, in profile order (by name)."""
    from .cache_db import claims  # noqa: PLC0415

    units = _units_of(store.list_profiles(), device, candidates, deployment)
    done = claims.done_units(store, env_hash)
    return [u for k, u in units.items() if k not in done]


def _units_of(profiles: Sequence[Any], device: torch.device, candidates: Sequence[Any] | None,
              deployment: str = "eager") -> dict[str, Unit]:
    from .session import _candidates_for, parse_candidates  # noqa: PLC0415

    chosen = parse_candidates(candidates)
    units: dict[str, Unit] = {}
    for profile in profiles:
        for op, _count in profile.ops:
            if op.m <= 0:
                continue
            cands = tuple(_candidates_for(op, device, chosen))
            key = unit_key(op, cands, _unit_timed(device, deployment))
            prev = units.get(key)
            units[key] = Unit(key, op, cands, (prev.profiles if prev else ()) + (profile.name,))
    return units


@dataclass(frozen=True)
class CoverageRow:
    """One stored profile on one environment of the cache: units done (what workers skip) and
    (op, candidate) pairs with a full-op measurement (candidates that cannot run there never get
    one), and the claims held right now."""

    profile: str
    environment: str  # Environment.short() and its hash
    units_done: int
    units_total: int
    pairs_measured: int
    pairs_total: int
    claimed: tuple[str, ...]  # "owner since HH:MM:SSZ, lease until HH:MM:SSZ"


def coverage(store: Any, profile: str | None = None, candidates: Sequence[Any] | None = None) -> list[CoverageRow]:
    """Profiles x environments of `store` (see CoverageRow). An environment's candidate set is the
    default one for its device kind (or `candidates`), as a worker there would use."""
    from .cache_db import claims  # noqa: PLC0415
    from .keys import BenchKey, Timed  # noqa: PLC0415

    profiles = [store.load_profile(profile)] if profile else store.list_profiles()
    every = claims.claims(store)
    rows = []
    for env in store.environments():
        units_by_profile = {p.name: _units_of([p], torch.device(env.device_kind), candidates) for p in profiles}
        done = {c.unit for c in every if c.env_hash == env.hash and c.state == "done"}
        for name, units in units_by_profile.items():
            keys = [BenchKey(env.hash, c.family, c.params_json(), c.version, u.op, Timed.FULL)
                    for u in units.values() for c in u.candidates]
            # a whole-op figure of either timed path (a GPU deployed eagerly has EAGER rows)
            full = store.get_many(keys)
            eager = store.get_many([replace(k, timed=Timed.EAGER) for k in keys])
            measured = [k for k in keys if k in full or replace(k, timed=Timed.EAGER) in eager]
            held = tuple(f"{c.owner} since {c.claimed_at:%H:%M:%SZ}, lease until {c.lease_until:%H:%M:%SZ}"
                         for c in every if c.env_hash == env.hash and c.state == "claimed" and c.unit in units)
            rows.append(CoverageRow(name, f"{env.short()} [{env.hash}]", len(done & set(units)), len(units),
                                    len(measured), len(keys), held))
    return rows


def coverage_lines(rows: Sequence[CoverageRow]) -> list[str]:
    """A plain-text table of `rows` (the ``autoquant cache coverage`` output)."""
    if not rows:
        return ["no coverage to show: the cache holds no shape profile or no environment yet "
                "(store one with `autoquant profile ... --cache URL --name NAME`; a worker's first "
                "measurement adds its environment)"]
    out = [f"{'profile':16s} {'units done':>12s} {'pairs measured':>15s}  environment"]
    for r in rows:
        pct = 100.0 * r.units_done / r.units_total if r.units_total else 100.0
        out.append(f"{r.profile:16s} {f'{r.units_done}/{r.units_total}':>7s} {pct:3.0f}% "
                   f"{f'{r.pairs_measured}/{r.pairs_total}':>15s}  {r.environment}")
        out += [f"{'':16s}   claimed: {c}" for c in r.claimed]
    return out


class Worker:
    """Claims, times and completes units for one device until stopped (see the module doc)."""

    def __init__(self, store: Any, *, device: torch.device | str | None = None,
                 candidates: Sequence[Any] | None = None, timer: Timer | None = None,
                 mode: Any = ("interpolate", 0.85), bench: BenchConfig | None = None,
                 lease: timedelta | None = None, poll_s: float = 5.0, owner: str | None = None,
                 deployment: str = "eager") -> None:
        from .cache_db import claims  # noqa: PLC0415

        self.store = store
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.candidates = candidates
        self.config = TuneConfig(cost_model=CostModel.parse(mode), bench=bench or BenchConfig(), deployment=deployment)
        self.timer = timer or default_timer(self.device, self.config.bench)
        self.lease = lease or claims.DEFAULT_LEASE
        self.poll_s = poll_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.env = environment(self.device)
        self._stop = False
        self._signals = 0

    # ---- stopping -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the unit in hand, then return from run()."""
        self._stop = True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            raise KeyboardInterrupt(f"second signal {signum}: stopping now")
        log.info("worker %s: signal %d, finishing the current unit then exiting", self.owner, signum)
        self._stop = True

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, *, once: bool = False, until_idle: bool = False) -> WorkerSummary:
        """Work until stopped. `once`: one pass over the pending units, then return. `until_idle`:
        return once no unit is pending for this environment (waiting, while other workers hold
        the last ones, for them to finish or their leases to run out). Neither: run for ever,
        looking for new profiles every `poll_s` seconds."""
        summary = WorkerSummary(self.owner, self.env.short())
        started = time.perf_counter()
        handlers = self._install_signals()
        backoff = 0.0
        try:
            while not self._stop:
                try:
                    units = pending_units(self.store, self.env.hash, self.device, self.candidates,
                                          self.config.deployment)
                    took = 0
                    for unit in units:
                        if self._stop:
                            break
                        if self._work_on(unit, summary):
                            took += 1
                    backoff = 0.0
                except Exception as exc:  # noqa: BLE001 - a cache outage: wait and retry
                    if not _is_outage(exc):
                        raise
                    backoff = min(_MAX_BACKOFF_S, max(1.0, backoff * 2))
                    if summary.outages == 0 or backoff == 1.0:
                        log.warning("worker %s: cache %s unreachable (%s: %s); retrying in %.0fs", self.owner,
                                    self.store.describe(), type(exc).__name__, str(exc).splitlines()[0][:200],
                                    backoff)
                    summary.outages += 1
                    self._sleep(backoff)
                    continue
                if once or (until_idle and not units):
                    break
                if took == 0:  # nothing free: others hold the rest, or nothing is stored yet
                    self._sleep(self.poll_s)
        finally:
            self._restore_signals(handlers)
            summary.stopped_by_signal = self._signals > 0
            summary.seconds = time.perf_counter() - started
            log.info("%s", summary.line())
        return summary

    def _work_on(self, unit: Unit, summary: WorkerSummary) -> bool:
        """Claim, time and complete one unit; False if another worker holds it."""
        from .cache_db import claims  # noqa: PLC0415
        from .tune import tune_ops  # noqa: PLC0415

        c0 = time.perf_counter()
        took = claims.try_claim(self.store, self.env.hash, unit.key, self.owner, self.lease)
        summary.claim_seconds += time.perf_counter() - c0
        if took is None:
            return False
        before = took == "taken_over"
        t0 = time.perf_counter()
        try:
            with _LeaseKeeper(self.store, self.env.hash, unit.key, self.owner, self.lease):
                trials = tune_ops({unit.op: list(unit.candidates)}, self.device, self.store, self.timer,
                                  self.config, progress=False, env=self.env)[unit.op]
        except BaseException:
            # Not done: give the unit back (if the cache still answers) so another worker takes it
            # now rather than after the lease.
            try:
                claims.release(self.store, self.env.hash, unit.key, self.owner)
            except Exception:  # noqa: BLE001 - the lease will free it
                pass
            raise
        c1 = time.perf_counter()
        claims.complete(self.store, self.env.hash, unit.key, self.owner)
        summary.claim_seconds += time.perf_counter() - c1
        timed = sum(1 for t in trials.values() if t.ok and not t.cached)
        cached = sum(1 for t in trials.values() if t.ok and t.cached)
        summary.units_done += 1
        summary.taken_over += 1 if before else 0
        summary.timed += timed
        summary.cached += cached
        log.info("worker %s: %s (%s) done in %.2fs: %d candidates timed, %d cached, %d not runnable%s",
                 self.owner, unit.op.label(), ",".join(unit.profiles), time.perf_counter() - t0, timed,
                 cached, len(trials) - timed - cached, " (taken over)" if before else "")
        return True

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stop and time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def _install_signals(self) -> dict[int, Any]:
        import threading  # noqa: PLC0415

        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    @staticmethod
    def _restore_signals(old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _LeaseKeeper:
    """Renews a claim from a background thread while its unit is timed, every third of the lease,
    so a unit that takes longer than the lease (a large op on a slow device) is not taken over by
    another worker while this one still works on it. The lease then only covers the time between
    renewals, and a dead worker's unit still returns to the pool one lease after its last renewal.
    A renewal that fails (cache unreachable) is retried at the next tick; one that finds the claim
    gone (taken over after a stall longer than the lease) is said in the log."""

    def __init__(self, store: Any, env_hash: str, unit: str, owner: str, lease: timedelta) -> None:
        import threading  # noqa: PLC0415

        self._args = (store, env_hash, unit, owner, lease)
        self._every = max(0.05, lease.total_seconds() / 3)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease {unit[:40]}", daemon=True)
        self.renewals = 0

    def __enter__(self) -> "_LeaseKeeper":
        # An in-memory cache is this process's alone (nobody can take the unit over) and its one
        # connection must not be shared by two threads' transactions.
        if not getattr(self._args[0], "in_memory", False):
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        from .cache_db import claims  # noqa: PLC0415

        store, env_hash, unit, owner, lease = self._args
        while not self._done.wait(self._every):
            try:
                held = claims.renew(store, env_hash, unit, owner, lease)
            except Exception as exc:  # noqa: BLE001 - an outage: the next tick tries again
                log.warning("worker %s: could not renew the claim on %s (%s); retrying", owner, unit,
                            type(exc).__name__)
                continue
            if not held:
                log.warning("worker %s: the claim on %s was taken over (this worker stalled longer "
                            "than its lease); finishing it anyway, the store keeps one row per key",
                            owner, unit)
                return
            self.renewals += 1


def _is_outage(exc: BaseException) -> bool:
    """A cache that cannot be reached right now (server down, network, locked for long)."""
    from sqlalchemy.exc import DBAPIError, OperationalError  # noqa: PLC0415

    from .cache_db import CacheUnavailableError  # noqa: PLC0415

    if isinstance(exc, (CacheUnavailableError, OperationalError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="autoquant worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="the team cache: a PostgreSQL URL or a SQLite path")
    p.add_argument("--device", default=None, help="cuda:0, cpu, ... (default: cuda if present)")
    p.add_argument("--candidates", default=None, help="comma-separated family names (default: all)")
    p.add_argument("--deployment", default="eager", choices=DEPLOYMENTS,
                   help="how tuned models will run on a GPU: 'eager' (default) or 'graphs' (CUDA graphs / "
                        "torch.compile mode='reduce-overhead'); no effect on a CPU")
    p.add_argument("--lease", type=float, default=600.0, help="seconds a claim holds (default 600)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks for new work")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for this worker (default: torch's). The thread count is part of a "
                        "CPU's environment fingerprint: a CPU worker fills the cache for deployments "
                        "running that many threads. Several workers on one host: give each its share "
                        "of the cores, or their threads fight for them")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--once", action="store_true", help="one pass over the pending units, then exit")
    group.add_argument("--until-idle", action="store_true",
                       help="exit 0 once nothing is left for this machine's environment")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from .cache_db import SQLStore  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)  # what the worker did, whatever the root logger's level
    cands = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"autoquant worker: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    with SQLStore(args.cache) as store:
        worker = Worker(store, device=args.device, candidates=cands,
                        lease=timedelta(seconds=args.lease), poll_s=args.poll, deployment=args.deployment)
        summary = worker.run(once=args.once, until_idle=args.until_idle)
    print(summary.line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
