"""The hot path: figures for a batch of keys in one statement per environment and chunk.

Written as driver-level SQL on purpose: SQLAlchemy's expanding tuple-IN costs about 25 us of
Python per key (5 ms for 200 keys) before the database sees the query, and PostgreSQL re-plans a
200-row IN list every time. Here the keys travel as parameters only, never as SQL text:
  SQLite      a VALUES list joined to the unique index (CROSS JOIN pins the VALUES side as the
              outer loop, so every key is one index probe); the SQL text is cached per chunk size.
  PostgreSQL  ten arrays (sent in binary) unnested into rows, each probing the unique index
              through a LATERAL subquery; the statement text never changes, so psycopg prepares
              it once per connection and the server plans it once.
Both return the caller's position of each key (`i`), so rows map back without re-keying.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from sqlalchemy import Connection

from ..keys import BenchKey, Measurement
from .records import key_values

__all__ = ["CHUNK", "fetch_figures", "fetch_values"]

# Keys per statement: 10 SQLite variables each stays below SQLite's 32766-variable limit.
CHUNK = 2000
_COLUMNS = ("candidate", "m", "k", "n", "dtype", "bias", "timed", "params", "version")
_MATCH = " AND ".join(f"x.{c} = q.{c}" for c in _COLUMNS)
_SELECT = "q.i, x.median_s, x.p25_s, x.p75_s, x.samples, x.load_avg"
_ENV = "(SELECT id FROM environments WHERE hash = {})"

# %b: psycopg sends the arrays in binary, about 7 times cheaper to build than the text form.
# The LATERAL subquery with LIMIT 1 is not flattened into a join, so every key is one probe of
# the unique index whatever the statistics say: a plain join planned (and prepared) while the
# table was small hash-joins or nested-loops over a whole environment once it is large.
_PG_SQL = (
    "SELECT q.i, x.median_s, x.p25_s, x.p75_s, x.samples, x.load_avg "
    "FROM unnest(%b::int[], %b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::text[], "
    f"%b::bool[], %b::text[], %b::text[], %b::int[]) AS q(i, {', '.join(_COLUMNS)}) "
    "CROSS JOIN LATERAL (SELECT x.median_s, x.p25_s, x.p75_s, x.samples, x.load_avg "
    f"FROM measurements AS x WHERE x.env_id = {_ENV.format('%b')} AND {_MATCH} LIMIT 1) AS x"
)


@functools.lru_cache(maxsize=64)
def _sqlite_sql(n: int) -> str:
    row = "(" + ",".join("?" * (len(_COLUMNS) + 1)) + ")"
    return (f"WITH q(i, {', '.join(_COLUMNS)}) AS (VALUES {','.join([row] * n)}) "
            f"SELECT {_SELECT} FROM q CROSS JOIN measurements AS x "
            f"WHERE x.env_id = {_ENV.format('?')} AND {_MATCH}")


def _fetch_chunk(conn: Connection, env_hash: str, keys: Sequence[tuple], offset: int
                 ) -> list[tuple]:
    if conn.dialect.name == "postgresql":
        params = (list(range(offset, offset + len(keys))), *(list(c) for c in zip(*keys)),
                  env_hash)
        return conn.exec_driver_sql(_PG_SQL, params).all()
    flat: list = []
    for i, values in enumerate(keys, start=offset):
        flat.append(i)
        flat.extend(values)
    flat.append(env_hash)
    return conn.exec_driver_sql(_sqlite_sql(len(keys)), tuple(flat)).all()


def fetch_values(conn: Connection, env_hash: str, keys: Sequence[tuple]) -> list[tuple]:
    """(position in `keys`, median_s, p25_s, p75_s, samples, load_avg) for each of `keys`
    (:func:`key_values` tuples of one environment, no duplicates) that is stored."""
    found: list[tuple] = []
    for start in range(0, len(keys), CHUNK):
        found.extend(_fetch_chunk(conn, env_hash, keys[start:start + CHUNK], start))
    return found


def fetch_figures(conn: Connection, keys: Sequence[BenchKey]) -> dict[BenchKey, Measurement]:
    """The stored measurements among `keys`: one statement per environment and chunk."""
    by_env: dict[str, list[BenchKey]] = {}
    for key in dict.fromkeys(keys):
        by_env.setdefault(key.env_hash, []).append(key)
    found: dict[BenchKey, Measurement] = {}
    for env_hash, env_keys in by_env.items():
        rows = fetch_values(conn, env_hash, [key_values(k) for k in env_keys])
        for i, median, p25, p75, samples, load in rows:
            found[env_keys[i]] = Measurement(median, p25, p75, samples, load)
    return found
