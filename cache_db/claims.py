"""Claims on units of pre-tuning work, so that N workers of one GPU SKU split a cache's backlog
without timing anything twice (issue 17).

A unit is an op and a candidate set, named by a string the worker makes (``autoquant.worker``);
a claim row (``work_claims``, unique per environment and unit) says who holds it until when. A
worker takes a unit by inserting its row, or by taking over a row whose lease ran out (its worker
died); on PostgreSQL the take-over reads the row ``FOR UPDATE SKIP LOCKED``, so two workers never
wait on, or both take, the same expired row; on SQLite every write transaction holds the file's
write lock (BEGIN IMMEDIATE), which serializes claims. A finished unit stays 'done', so workers
skip it even where some of its candidates could not run (they leave no measurement).

Leases are compared with the claiming worker's UTC clock: keep the workers' clocks in sync (NTP).
A worker renews its claim every third of the lease while it times the unit, so a unit may take
longer than the lease; the lease bounds how long a dead worker's unit waits to be taken over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlalchemy import delete, or_, select, update

from .models import WorkClaimRow
from .records import as_utc

if TYPE_CHECKING:
    from .sql_store import SQLStore

__all__ = ["Claim", "DEFAULT_LEASE", "claims", "complete", "done_units", "release", "renew", "try_claim"]

C = WorkClaimRow.__table__
DEFAULT_LEASE = timedelta(minutes=10)


@dataclass(frozen=True)
class Claim:
    env_hash: str
    unit: str
    state: str  # "claimed" | "done"
    owner: str
    claimed_at: datetime
    lease_until: datetime
    finished_at: datetime | None
    attempts: int


def _now() -> datetime:
    return datetime.now(timezone.utc)


def try_claim(store: SQLStore, env_hash: str, unit: str, owner: str,
              lease: timedelta = DEFAULT_LEASE, now: datetime | None = None) -> str | None:
    """Take `unit` for `owner` until now + `lease`: "new" if it was free, "taken_over" if its lease
    had run out (a 'claimed' row whose worker stopped renewing it), None if another holds it or it
    is done. One write transaction."""
    t = now or _now()
    start, until = store.bind_time(t), store.bind_time(t + lease)

    def work(conn) -> bool:
        ins = store._insert(C).values(env_hash=env_hash, unit=unit, state="claimed", owner=owner,
                                      claimed_at=start, lease_until=until, attempts=1)
        # RETURNING, not rowcount: SQLAlchemy's implicit RETURNING on PostgreSQL leaves rowcount -1.
        inserted = conn.execute(ins.on_conflict_do_nothing(index_elements=["env_hash", "unit"])
                                .returning(C.c.id)).first()
        if inserted is not None:
            return "new"
        # A lapsed claim, or one `owner` itself still holds (it lost the cache mid-unit and could
        # not release it): take it.
        takeable = or_(C.c.lease_until < start, C.c.owner == owner)
        expired = (select(C.c.id, C.c.owner).where(C.c.env_hash == env_hash, C.c.unit == unit,
                                                   C.c.state == "claimed", takeable))
        if store.backend == "postgresql":
            expired = expired.with_for_update(skip_locked=True)
        row = conn.execute(expired).first()
        if row is None:
            return None
        taken = conn.execute(update(C).where(C.c.id == row.id, C.c.state == "claimed", takeable)
                             .values(owner=owner, claimed_at=start, lease_until=until,
                                     attempts=C.c.attempts + 1))
        if taken.rowcount != 1:
            return None
        return "new" if row.owner == owner else "taken_over"

    return store._write(work)


def renew(store: SQLStore, env_hash: str, unit: str, owner: str,
          lease: timedelta = DEFAULT_LEASE, now: datetime | None = None) -> bool:
    """Extend `owner`'s claim on `unit`; False if it is no longer theirs (taken over, or done)."""
    until = store.bind_time((now or _now()) + lease)
    return bool(store._write(lambda conn: conn.execute(
        update(C).where(C.c.env_hash == env_hash, C.c.unit == unit, C.c.owner == owner,
                        C.c.state == "claimed").values(lease_until=until)).rowcount == 1))


def complete(store: SQLStore, env_hash: str, unit: str, owner: str, now: datetime | None = None) -> bool:
    """Mark `unit` done. False if `owner` no longer held it (another worker took it over after the
    lease ran out: it will time what is missing, which is nothing once these measurements are
    written); the unit is marked done all the same."""
    t = store.bind_time(now or _now())

    def work(conn) -> bool:
        held = conn.execute(update(C).where(C.c.env_hash == env_hash, C.c.unit == unit,
                                            C.c.owner == owner, C.c.state == "claimed")
                            .values(state="done", finished_at=t)).rowcount == 1
        if not held:
            conn.execute(update(C).where(C.c.env_hash == env_hash, C.c.unit == unit)
                         .values(state="done", finished_at=t, owner=owner))
        return held

    return bool(store._write(work))


def release(store: SQLStore, env_hash: str, unit: str, owner: str) -> bool:
    """Give `unit` back unfinished (a clean shutdown before it was timed): another worker may take
    it at once. False if `owner` did not hold it."""
    return bool(store._write(lambda conn: conn.execute(
        delete(C).where(C.c.env_hash == env_hash, C.c.unit == unit, C.c.owner == owner,
                        C.c.state == "claimed")).rowcount == 1))


def done_units(store: SQLStore, env_hash: str) -> set[str]:
    """The units finished for `env_hash`."""
    rows = store._read(lambda conn: conn.execute(
        select(C.c.unit).where(C.c.env_hash == env_hash, C.c.state == "done")).all())
    return {r.unit for r in rows}


def claims(store: SQLStore, env_hash: str | None = None) -> list[Claim]:
    """Every claim row (of `env_hash` where given), oldest first."""
    q = select(C).order_by(C.c.claimed_at, C.c.id)
    if env_hash is not None:
        q = q.where(C.c.env_hash == env_hash)
    rows = store._read(lambda conn: conn.execute(q).all())
    return [Claim(r.env_hash, r.unit, r.state, r.owner, as_utc(r.claimed_at), as_utc(r.lease_until),
                  None if r.finished_at is None else as_utc(r.finished_at), int(r.attempts)) for r in rows]
