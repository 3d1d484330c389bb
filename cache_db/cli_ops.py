"""What each `autoquant cache ...` command does, as functions returning the lines to print.

Kept apart from argument parsing (:mod:`.cli`) so tests call them directly.

>>> from autoquant.cache_db import SQLStore
>>> cmd_stats(SQLStore("sqlite://"))[0]
'cache: sqlite memory (sqlite, schema v2)'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import IO

from ..hardware import Environment
from .engine import ENV_VAR, mask_url, parse_spec, sqlite_file
from .opening import default_cache_url
from .records import ImportReport
from .sql_store import SQLStore

__all__ = [
    "cmd_export",
    "cmd_import",
    "cmd_ls",
    "cmd_merge",
    "cmd_path",
    "cmd_prune",
    "cmd_stats",
    "parse_age",
]

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """'90d', '12h', '30m', '2w', '45s' -> timedelta; ValueError naming the bad text."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"age {text!r}: expected a number and a unit s/m/h/d/w, e.g. 30d")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def _size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cmd_path() -> list[str]:
    """Where the default cache lives and why."""
    spec = default_cache_url()
    source = f"from ${ENV_VAR}" if os.environ.get(ENV_VAR, "").strip() else "platform default"
    lines = [f"{mask_url(spec) if '://' in spec else spec}  ({source})"]
    path = sqlite_file(parse_spec(spec))
    if path is not None:
        state = f"exists, {_size(path.stat().st_size)}" if path.is_file() else "not created yet"
        lines.append(f"sqlite file: {path} ({state})")
    return lines


def cmd_ls(store: SQLStore) -> list[str]:
    stats = store.stats()
    lines = [f"{len(stats.per_environment)} environment(s) in {store.describe()}:"]
    for e in stats.per_environment:
        lines.append(f"  {e.hash}  {e.measurements:>9} measurements  {e.environment.short()}  "
                     f"torch {e.environment.torch}")
    profiles = store.list_profiles()
    lines.append(f"{len(profiles)} shape profile(s)" + (":" if profiles else ""))
    for p in profiles:
        calls = sum(c for _, c in p.ops)
        lines.append(f"  {p.name}  {len(p.ops)} ops, {calls} calls  model {p.model_fingerprint}")
    return lines


def cmd_stats(store: SQLStore) -> list[str]:
    s = store.stats()
    span = (f"{s.oldest:%Y-%m-%d %H:%M} .. {s.newest:%Y-%m-%d %H:%M} UTC"
            if s.oldest and s.newest else "none")
    return [f"cache: {s.location} ({s.backend}, schema v{s.schema_version})",
            f"environments: {s.environments}",
            f"measurements: {s.measurements}",
            f"shape profiles: {s.profiles}",
            f"measured: {span}",
            f"size: {_size(s.size_bytes)}"]


def cmd_export(store: SQLStore, fh: IO[str], sku: str | None = None) -> list[str]:
    r = store.export_jsonl(fh, sku)
    which = f" matching SKU {sku!r}" if sku else ""
    name = getattr(fh, "name", None)
    return [f"exported {r.measurements} measurements from {r.environments} environment(s)"
            f"{which} and {r.profiles} profile(s)"
            + (f" to {name}" if isinstance(name, str) else "")]


def _report_lines(verb: str, r: ImportReport) -> list[str]:
    lines = [(f"{verb} {r.records} records: {r.inserted} new, {r.identical} already present, "
              f"{r.conflicts} conflicts ({r.replaced} replaced by better-sampled incoming, "
              f"{r.kept_existing} kept as stored)"),
             (f"environments added: {r.environments_added}; shape profiles added: "
              f"{r.profiles_added}, kept existing: {r.profiles_kept}")]
    lines += [f"  conflict: {c}" for c in r.conflict_examples]
    return lines


def cmd_import(store: SQLStore, fh: Iterable[str]) -> list[str]:
    return _report_lines("imported", store.import_jsonl(fh))


def cmd_merge(store: SQLStore, other: SQLStore | str | os.PathLike[str]) -> list[str]:
    source = other if isinstance(other, SQLStore) else SQLStore(other)
    try:
        lines = _report_lines(f"merged from {source.describe()}:", store.merge(source))
    finally:
        if source is not other:
            source.close()
    return lines


def cmd_prune(store: SQLStore, older_than: timedelta | None,
              foreign: Environment | None) -> list[str]:
    if older_than is None and foreign is None:
        return ["nothing to prune: give --older-than and/or --foreign"]
    r = store.prune(older_than=older_than, foreign_to=foreign)
    why = []
    if older_than is not None:
        why.append(f"older than {older_than}")
    if foreign is not None:
        why.append(f"not from {foreign.short()} ({foreign.hash})")
    return [(f"deleted {r.measurements} measurements ({' or '.join(why)}) and "
             f"{r.environments} environment(s) left empty")]
