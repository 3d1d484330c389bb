"""Export, import and merge: moving measurements between caches as validated JSON lines.

Conflict rule (import and merge alike): when a key is stored on both sides with different figures,
the measurement with more samples is kept, the stored one on a tie; the write itself is a
conditional upsert, so the rule holds even against a concurrent writer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import Connection, select

from ..hardware import Environment
from ..keys import OpShape
from .errors import CacheImportError
from .jsonl import (
    environment_line,
    header_line,
    measurement_line,
    parse_lines,
    profile_line,
    profile_ops_json,
)
from .lookup import fetch_values
from .models import ENVIRONMENT_FIELD_COLUMNS, EnvironmentRow, ShapeProfileRow
from .records import ExportReport, ImportReport, MeasurementRecord, ShapeProfile, as_utc

if TYPE_CHECKING:
    from .sql_store import SQLStore

__all__ = ["export_jsonl", "import_jsonl", "merge", "profile_from_row", "profile_ops_json"]

E = EnvironmentRow.__table__
P = ShapeProfileRow.__table__
_MAX_EXAMPLES = 5


def profile_from_row(row: Any) -> ShapeProfile:
    ops = tuple((OpShape(o["m"], o["k"], o["n"], o["bias"], o["dtype"]), int(o["count"]))
                for o in json.loads(row.ops))
    return ShapeProfile(row.name, row.model_fingerprint, ops, as_utc(row.created_at))


def export_jsonl(store: SQLStore, fh: IO[str], sku: str | None) -> ExportReport:
    needle = sku.lower() if sku is not None else None

    def work(conn: Connection) -> ExportReport:
        envs = [(r.id, Environment(**{n: r._mapping[n] for n in ENVIRONMENT_FIELD_COLUMNS}))
                for r in conn.execute(select(E).order_by(E.c.id))]
        envs = [(i, e) for i, e in envs if needle is None or needle in e.sku.lower()]
        fh.write(header_line())
        for _, env in envs:
            fh.write(environment_line(env))
        profiles = []
        if needle is None:
            profiles = [profile_from_row(r) for r in conn.execute(select(P).order_by(P.c.name))]
            for p in profiles:
                fh.write(profile_line(p))
        count = 0
        if envs:
            for row in store.iter_measurement_rows(conn, env_ids=[i for i, _ in envs]):
                fh.write(measurement_line(store.stored_from_row(row)))
                count += 1
        return ExportReport(len(envs), count, len(profiles))

    return store._read(work)


def import_jsonl(store: SQLStore, fh: Iterable[str]) -> ImportReport:
    parsed = parse_lines(fh)
    return apply_records(store, parsed.records, parsed.environments, parsed.measurements,
                         parsed.profiles)


def merge(store: SQLStore, other: SQLStore) -> ImportReport:
    envs = {e.hash: e for e in other.environments()}
    # Rows straight from the other store's cursor: (hash, key columns, figures, created_at, host).
    measurements = other._read(lambda conn: [
        (0, MeasurementRecord(r[0], tuple(r[1:10]), tuple(r[10:15]), as_utc(r[15]), r[16]))
        for r in other.iter_measurement_rows(conn)])
    profiles = [(0, p) for p in other.list_profiles()]
    records = len(envs) + len(measurements) + len(profiles)
    return apply_records(store, records, envs, measurements, profiles)


class _Tally:
    """Counters for one attempt of the import transaction (a retry starts a fresh one)."""

    def __init__(self) -> None:
        self.inserted = self.replaced = self.kept = self.identical = 0
        self.examples: list[str] = []

    def conflict(self, env: str, key: tuple, old: tuple, new: tuple, where: str) -> bool:
        """Count a conflict between figures `old` and `new`; True if `new` wins."""
        wins = new[3] > old[3]  # more samples
        if wins:
            self.replaced += 1
        else:
            self.kept += 1
        if len(self.examples) < _MAX_EXAMPLES:
            candidate, m, k, n, dtype, bias, timed, params, version = key
            self.examples.append(
                f"{candidate} {params} v{version} {m}x{k}x{n}{'+b' if bias else ''} {dtype} "
                f"{timed} env {env}: {where} {old[3]} samples vs incoming {new[3]} -> kept "
                f"{'incoming' if wins else where}")
        return wins


def _dedupe(measurements: Sequence[tuple[int, MeasurementRecord]], tally: _Tally
            ) -> dict[tuple[str, tuple], MeasurementRecord]:
    chosen: dict[tuple[str, tuple], MeasurementRecord] = {}
    for _, rec in measurements:
        ident = (rec.env, rec.key)
        prev = chosen.get(ident)
        if prev is None:
            chosen[ident] = rec
        elif prev.figures[:4] == rec.figures[:4]:
            tally.identical += 1
        elif tally.conflict(rec.env, rec.key, prev.figures, rec.figures, "earlier line"):
            chosen[ident] = rec
    return chosen


def _import_profiles(store: SQLStore, conn: Connection,
                     profiles: Sequence[tuple[int, ShapeProfile]]) -> tuple[int, int]:
    added = kept = 0
    for _, prof in profiles:
        row = conn.execute(select(P).where(P.c.name == prof.name)).first()
        if row is None:
            values = {"name": prof.name, "model_fingerprint": prof.model_fingerprint,
                      "ops": profile_ops_json(prof.ops)}
            if prof.created_at is not None:
                values["created_at"] = store.bind_time(prof.created_at)
            conn.execute(P.insert().values(**values))
            added += 1
        else:
            old = profile_from_row(row)
            if (old.model_fingerprint, old.counts()) != (prof.model_fingerprint, prof.counts()):
                kept += 1
    return added, kept


def _stored_figures(conn: Connection, chosen: dict[tuple[str, tuple], MeasurementRecord],
                    known_envs: set[str]) -> dict[tuple[str, tuple], tuple]:
    """Figures already stored for the chosen keys, one bulk lookup per environment; an
    environment that was not stored before this import has none to look up."""
    by_env: dict[str, list[tuple]] = {}
    for env, key in chosen:
        if env in known_envs:
            by_env.setdefault(env, []).append(key)
    found: dict[tuple[str, tuple], tuple] = {}
    for env, keys in by_env.items():
        for i, *figures in fetch_values(conn, env, keys):
            found[(env, keys[i])] = tuple(figures)
    return found


def apply_records(store: SQLStore, records: int, envs: dict[str, Environment],
                  measurements: Sequence[tuple[int, MeasurementRecord]],
                  profiles: Sequence[tuple[int, ShapeProfile]]) -> ImportReport:
    """Write validated records in one transaction; see the module docstring for conflicts."""
    first_use: dict[str, int] = {}
    for line, rec in measurements:
        first_use.setdefault(rec.env, line)
    now = store.driver_time(datetime.now(timezone.utc))  # for records that carry no time

    def work(conn: Connection) -> ImportReport:
        tally = _Tally()
        chosen = _dedupe(measurements, tally)
        wanted = set(first_use) | set(envs)
        before = set(conn.scalars(select(E.c.hash).where(E.c.hash.in_(sorted(wanted)))))
        ids = store.ensure_environments(conn, [envs[h] for h in sorted(envs)], wanted)
        for env_hash, line in sorted(first_use.items(), key=lambda kv: kv[1]):
            if env_hash not in ids:
                raise CacheImportError(line, f"measurement names environment {env_hash!r}, which "
                                       f"is neither in the file nor in {store.describe()}")
        stored = _stored_figures(conn, chosen, before)
        rows = []
        for ident, rec in chosen.items():
            old = stored.get(ident)
            if old is None:
                tally.inserted += 1
            elif old[:4] == rec.figures[:4]:
                tally.identical += 1
                continue
            elif not tally.conflict(rec.env, rec.key, old, rec.figures, "stored"):
                continue
            candidate, m, k, n, dtype, bias, timed, params, version = rec.key
            created = now if rec.created_at is None else store.driver_time(rec.created_at)
            rows.append((ids[rec.env], candidate, params, version, m, k, n, bias, dtype, timed,
                         *rec.figures, rec.host, created))
        store.upsert_measurements(conn, rows, better_sampled_only=True)
        p_added, p_kept = _import_profiles(store, conn, profiles)
        return ImportReport(records, len(set(envs) - before), tally.inserted, tally.replaced,
                            tally.kept, tally.identical, p_added, p_kept, tuple(tally.examples))

    return store._write(work)
