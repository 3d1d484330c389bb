"""Claims on units of pre-tuning work (cache_db/claims.py), on SQLite and PostgreSQL: one holder
per unit, take-over only after the lease, done units stay done, release frees at once."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from autoquant.cache_db import claims

from .conftest import CPU_ENV, GPU_ENV

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
LEASE = timedelta(seconds=30)


def test_one_holder_per_unit_and_environment(store) -> None:
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "a:1", LEASE, T0)
    assert not claims.try_claim(store, CPU_ENV.hash, "u1", "b:2", LEASE, T0 + timedelta(seconds=29))
    assert claims.try_claim(store, GPU_ENV.hash, "u1", "b:2", LEASE, T0)  # another SKU: its own unit
    (c,) = claims.claims(store, CPU_ENV.hash)
    assert (c.unit, c.state, c.owner, c.attempts) == ("u1", "claimed", "a:1", 1)
    assert c.lease_until - c.claimed_at == LEASE and c.claimed_at == T0


def test_an_expired_claim_is_taken_over_once(store) -> None:
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "a:1", LEASE, T0)
    later = T0 + LEASE + timedelta(seconds=1)
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "b:2", LEASE, later)
    assert not claims.try_claim(store, CPU_ENV.hash, "u1", "c:3", LEASE, later)
    (c,) = claims.claims(store)
    assert (c.owner, c.attempts, c.claimed_at) == ("b:2", 2, later)
    # The first worker comes back: its claim is gone, renewing says so, completing still marks done.
    assert not claims.renew(store, CPU_ENV.hash, "u1", "a:1", LEASE, later)
    assert claims.renew(store, CPU_ENV.hash, "u1", "b:2", LEASE, later)
    assert not claims.complete(store, CPU_ENV.hash, "u1", "a:1", later)
    assert claims.done_units(store, CPU_ENV.hash) == {"u1"}


def test_done_units_are_never_claimed_again(store) -> None:
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "a:1", LEASE, T0)
    assert claims.complete(store, CPU_ENV.hash, "u1", "a:1", T0 + timedelta(seconds=5))
    far = T0 + timedelta(days=3)
    assert not claims.try_claim(store, CPU_ENV.hash, "u1", "b:2", LEASE, far)
    (c,) = claims.claims(store)
    assert c.state == "done" and c.finished_at == T0 + timedelta(seconds=5)


def test_release_frees_the_unit_at_once(store) -> None:
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "a:1", LEASE, T0)
    assert not claims.release(store, CPU_ENV.hash, "u1", "b:2")  # not theirs
    assert claims.release(store, CPU_ENV.hash, "u1", "a:1")
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "b:2", LEASE, T0)


def test_concurrent_claims_of_one_expired_unit_give_one_winner(store_url) -> None:
    """Eight threads, each with its own store (connection), race for the same free unit and then
    for the same expired one: exactly one wins each time."""
    from autoquant.cache_db import SQLStore

    stores = [SQLStore(store_url) for _ in range(8)]
    try:
        for when, unit_state in ((T0, "free"), (T0 + timedelta(minutes=5), "expired")):
            wins: list[str] = []
            barrier = threading.Barrier(len(stores))

            def race(i: int, when: datetime = when, wins: list[str] = wins) -> None:
                barrier.wait()
                if claims.try_claim(stores[i], CPU_ENV.hash, "hot", f"w:{i}", LEASE, when):
                    wins.append(f"w:{i}")

            threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(wins) == 1, (unit_state, wins)
            (c,) = claims.claims(stores[0])
            assert c.owner == wins[0]
    finally:
        for s in stores:
            s.close()


def test_the_holder_takes_its_own_claim_back(store) -> None:
    """A worker that lost the cache mid-unit (its release failed) claims the unit again at once."""
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "a:1", LEASE, T0) == "new"
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "a:1", LEASE, T0 + timedelta(seconds=1)) == "new"
    assert claims.try_claim(store, CPU_ENV.hash, "u1", "b:2", LEASE, T0 + LEASE * 3) == "taken_over"
