"""`autoquant cache ...`: argument parsing for the commands in :mod:`.cli_ops`.

autoquant.cli calls :func:`add_cache_parser` with its subparsers; each command prints lines and
returns an exit status (0 ok, 1 bad input, 2 cache unavailable).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .cli_ops import (
    cmd_export,
    cmd_import,
    cmd_ls,
    cmd_merge,
    cmd_path,
    cmd_prune,
    cmd_stats,
    parse_age,
)
from .errors import CacheImportError, CacheUnavailableError
from .opening import default_cache_url
from .sql_store import SQLStore

__all__ = ["add_cache_parser"]


def _emit(lines: list[str]) -> int:
    for line in lines:
        print(line)
    return 0


def _with_store(action: Callable[[SQLStore, argparse.Namespace], list[str]]
                ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            with SQLStore(args.cache or default_cache_url()) as store:
                return _emit(action(store, args))
        except CacheUnavailableError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (CacheImportError, ValueError, KeyError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return run


def _export(store: SQLStore, args: argparse.Namespace) -> list[str]:
    if args.output in (None, "-"):
        lines = cmd_export(store, sys.stdout, args.sku)
        print(*lines, sep="\n", file=sys.stderr)  # stdout carries the data
        return []
    with open(args.output, "w", encoding="utf-8") as fh:
        return cmd_export(store, fh, args.sku)


def _import(store: SQLStore, args: argparse.Namespace) -> list[str]:
    if args.file == "-":
        return cmd_import(store, sys.stdin)
    with open(args.file, encoding="utf-8") as fh:
        return cmd_import(store, fh)


def _prune(store: SQLStore, args: argparse.Namespace) -> list[str]:
    foreign = None
    if args.foreign:
        import torch

        from ..hardware import environment

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        foreign = environment(device)
    age = parse_age(args.older_than) if args.older_than else None
    return cmd_prune(store, age, foreign)


def _coverage(store: SQLStore, args: argparse.Namespace) -> list[str]:
    # Candidate sets live above the cache (autoquant.candidates): the one verb that needs them.
    from ..worker import coverage, coverage_lines  # noqa: PLC0415

    cands = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    return coverage_lines(coverage(store, args.profile, cands))


def add_cache_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    cache = sub.add_parser("cache", help="inspect and maintain the tuning cache",
                           description="Inspect and maintain the tuning cache (default: "
                                       "$AUTOQUANT_CACHE_URL or the platform cache directory).")
    cmds = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    cmds.required = True

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace], int]
            ) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help_text, description=help_text)
        if name != "path":
            p.add_argument("--cache", default=None, help="cache path or URL (default: as above)")
        p.set_defaults(func=func)
        return p

    add("path", "print where the default cache lives", lambda _args: _emit(cmd_path()))
    add("ls", "list environments and shape profiles", _with_store(lambda s, a: cmd_ls(s)))
    add("stats", "counts, time span and size", _with_store(lambda s, a: cmd_stats(s)))
    p = add("export", "write measurements as JSON lines", _with_store(_export))
    p.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    p.add_argument("--sku", default=None, help="only environments whose SKU contains this text")
    p = add("import", "read JSON lines (validated; better-sampled wins)", _with_store(_import))
    p.add_argument("file", help="JSON-lines file, or - for stdin")
    p = add("merge", "copy another cache in (better-sampled wins)",
            _with_store(lambda s, a: cmd_merge(s, a.other)))
    p.add_argument("other", help="path or URL of the cache to merge from")
    p = add("prune", "delete old measurements and/or those of other machines",
            _with_store(_prune))
    p.add_argument("--older-than", default=None, help="age such as 90d, 12h, 2w")
    p.add_argument("--foreign", action="store_true",
                   help="delete measurements of every environment but this machine's")
    p.add_argument("--device", default=None, help="device whose environment to keep (--foreign)")
    p = add("coverage", "per stored profile and environment: units done, pairs measured, claims held now",
            _with_store(_coverage))
    p.add_argument("--profile", default=None, help="only this stored profile")
    p.add_argument("--candidates", default=None, help="comma-separated families, as given to the workers")
    return cache
