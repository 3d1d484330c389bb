"""Pre-tuning workers (autoquant/worker.py) as real processes on one SQLite file and on one
PostgreSQL database: N workers split the stored profiles and time every key exactly once; a
SIGKILLed worker's unit is re-done by another after the lease; SIGTERM finishes the unit in hand.
The timer is a fake that sleeps and logs (tests/cache_store/workers.py): timing is not the point."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from autoquant.cache_db import SQLStore, claims

from autoquant.hardware import environment
from autoquant.keys import OpShape
from autoquant.worker import pending_units

import torch

SCRIPT = Path(__file__).with_name("workers.py")
ROOT = Path(__file__).resolve().parents[2]
CANDS = ["int8_dynamic", "int8_weight_only"]
PROFILES = {
    "bert": {OpShape(8, 64, 64, True, "float32"): 12, OpShape(8, 64, 256, True, "float32"): 6},
    "llama": {OpShape(1, 64, 64, False, "float32"): 7, OpShape(1, 64, 192, False, "float32"): 3,
              OpShape(4, 192, 64, False, "float32"): 3},
    "vit": {OpShape(8, 64, 64, True, "float32"): 4, OpShape(16, 128, 64, True, "float32"): 2},  # one op shared with bert
}


def _fill(url: str) -> None:
    with SQLStore(url) as store:
        for name, ops in PROFILES.items():
            store.save_profile(name, f"sha256:{name}", ops)


def _start(url: str, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), url, str(log), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _timings(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines() if line.strip()]


def _pending(url: str) -> list:
    with SQLStore(url) as store:
        return pending_units(store, environment(torch.device("cpu")).hash, torch.device("cpu"), CANDS)


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_workers_time_every_key_exactly_once(store_url: str, tmp_path: Path) -> None:
    _fill(store_url)
    units = _pending(store_url)
    assert len(units) == 6  # 7 ops in the profiles, one shared
    log = tmp_path / "timings.log"
    procs = [_start(store_url, log, "--until-idle", "--delay", "0.02") for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "SUMMARY" in out
    timings = _timings(log)
    # The tuner may time a key twice in one process (it re-times the two best when they are
    # close): what must never happen is two workers timing the same key.
    per_key = collections.defaultdict(set)
    for pid, key in timings:
        per_key[key].add(pid)
    assert per_key and all(len(p) == 1 for p in per_key.values()), \
        [k for k, p in per_key.items() if len(p) > 1][:3]
    assert len({pid for pid, _ in timings}) >= 2, "the work was not split between workers"
    with SQLStore(store_url) as store:
        env = environment(torch.device("cpu")).hash
        stored = [m for m in store.measurements(env)]
        assert len(stored) == len(per_key)  # every timing is stored, none stored twice
        assert claims.done_units(store, env) == {u.key for u in units}
    assert _pending(store_url) == []
    # A second round finds nothing to do and times nothing.
    again = _start(store_url, log, "--until-idle")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "done=0" in out, err[-2000:]
    assert len(_timings(log)) == len(timings)


def test_a_killed_workers_unit_is_redone_after_its_lease(store_url: str, tmp_path: Path) -> None:
    _fill(store_url)
    log = tmp_path / "timings.log"
    slow = _start(store_url, log, "--once", "--delay", "0.5", "--lease", "3")
    _wait_for(lambda: _timings(log), 60, "the first worker to start timing")
    slow.send_signal(signal.SIGKILL)
    slow.communicate(timeout=30)
    killed_pid = _timings(log)[0][0]
    with SQLStore(store_url) as store:
        held = [c for c in claims.claims(store) if c.state == "claimed"]
    assert len(held) == 1, held
    t_kill = time.monotonic()
    rescuer = _start(store_url, log, "--until-idle", "--lease", "3")
    out, err = rescuer.communicate(timeout=300)
    assert rescuer.returncode == 0, err[-3000:]
    assert time.monotonic() - t_kill >= 1.0  # it had to wait for the lease
    assert "taken_over=1" in out, out
    with SQLStore(store_url) as store:
        (c,) = [c for c in claims.claims(store) if c.unit == held[0].unit]
        assert c.state == "done" and c.attempts == 2 and c.owner != held[0].owner
    assert _pending(store_url) == []
    # Nothing doubled: one live worker timed each key (the killed one's unit was never written by
    # it: killed before its unit's write).
    rescuers = collections.defaultdict(set)
    for pid, k in _timings(log):
        rescuers[k].add(pid)
    assert all(len(p - {killed_pid}) == 1 for p in rescuers.values())


def test_a_unit_longer_than_the_lease_is_renewed_not_taken_over(store_url: str, tmp_path: Path) -> None:
    """A live worker renews its claim while it times: a second worker started while the first
    is well past its 1 s lease on one unit never takes that unit over nor times its keys."""
    _fill(store_url)
    log = tmp_path / "timings.log"
    delay, lease = 0.4, 1.0
    slow = _start(store_url, log, "--once", "--delay", str(delay), "--lease", str(lease))
    _wait_for(lambda: _timings(log), 60, "the first worker to start timing")
    time.sleep(2 * lease)  # the first unit's lease would have run out twice by now
    other = _start(store_url, log, "--until-idle", "--delay", "0.02", "--lease", str(lease))
    outs = [p.communicate(timeout=300) for p in (slow, other)]
    for p, (out, err) in zip((slow, other), outs):
        assert p.returncode == 0, err[-3000:]
        assert "taken_over=0" in out, out
    timings = _timings(log)
    slow_pid = timings[0][0]
    first_unit = [k for pid, k in timings if pid == slow_pid and _op_of(k) == _op_of(timings[0][1])]
    assert len(first_unit) * delay > 2 * lease, "the first unit was too short to outlive its lease"
    per_key = collections.defaultdict(set)
    for pid, key in timings:
        per_key[key].add(pid)
    assert all(len(p) == 1 for p in per_key.values()), [k for k, p in per_key.items() if len(p) > 1][:3]
    with SQLStore(store_url) as store:
        assert all(c.state == "done" and c.attempts == 1 for c in claims.claims(store))
    assert _pending(store_url) == []


def _op_of(key: str) -> str:
    """The op part of a logged BenchKey text (everything from its OpShape on)."""
    return key[key.index("OpShape"):].split(")", 1)[0]


def test_sigterm_finishes_the_unit_in_hand_then_exits(store_url: str, tmp_path: Path) -> None:
    _fill(store_url)
    log = tmp_path / "timings.log"
    worker = _start(store_url, log, "--delay", "0.3")  # neither --once nor --until-idle: runs for ever
    _wait_for(lambda: _timings(log), 60, "the worker to start timing")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-3000:]
    assert "signal=True" in out and "done=1" in out, out
    with SQLStore(store_url) as store:
        states = collections.Counter(c.state for c in claims.claims(store))
    assert states == {"done": 1}  # nothing left claimed: the other units stay free for others
    assert len(_pending(store_url)) == 5


def test_coverage_follows_the_workers(store_url: str, tmp_path: Path) -> None:
    from autoquant.cli import main as cli_main
    from autoquant.worker import coverage

    _fill(store_url)
    log = tmp_path / "timings.log"
    worker = _start(store_url, log, "--once")
    _out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-2000:]
    with SQLStore(store_url) as store:
        rows = {r.profile: r for r in coverage(store, candidates=CANDS)}
    assert set(rows) == set(PROFILES)
    for name, r in rows.items():
        assert (r.units_done, r.units_total) == (len(PROFILES[name]), len(PROFILES[name])), r
        assert 0 < r.pairs_measured <= r.pairs_total and not r.claimed
    # The CLI prints the same table.
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["cache", "coverage", "--cache", store_url, "--candidates", ",".join(CANDS)]) == 0
    text = buf.getvalue()
    assert "bert" in text and "2/2 100%" in text and "3/3 100%" in text


@pytest.mark.postgres
def test_a_postgres_outage_is_waited_out(tmp_path: Path) -> None:
    """The server stops mid-run and comes back: the worker says so, retries with backoff, and
    finishes every unit; no crash, no unit left claimed."""
    from .conftest import _no_server
    from .pgserver import PostgresStartError, find_pg_bin, start_postgres

    if find_pg_bin() is None:
        _no_server("no PostgreSQL server binaries")
    try:
        server = start_postgres(fsync=False)
    except PostgresStartError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        server.create_database("outage")
        url = server.url("outage")
        _fill(url)
        log = tmp_path / "timings.log"
        worker = _start(url, log, "--until-idle", "--delay", "0.2", "--lease", "60")
        _wait_for(lambda: _timings(log), 120, "the worker to start timing")
        server.pause()
        time.sleep(3)
        server.resume()
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        assert "unreachable" in err and "retrying" in err, err[-3000:]
        assert err.count("unreachable") <= 4  # said per outage, not per retry
        assert _pending(url) == []
        with SQLStore(url) as store:
            assert {c.state for c in claims.claims(store)} == {"done"}
    finally:
        server.stop()
