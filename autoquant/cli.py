"""The `autoquant` command. `autoquant --help` and `autoquant SUBCOMMAND --help` describe each verb."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 - heavy import only for the verbs that need it

    from .demo import run_demo  # noqa: PLC0415

    device = torch.device(args.device) if args.device else None
    run_demo(device=device, batch=args.batch, hidden=args.hidden, blocks=args.blocks,
             cache=args.cache)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoquant",
        description="Pick the fastest quantized kernel per layer and shape; manage the tuning cache.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="autoquant a built-in MLP here and print the report and speedup",
                          description="Autoquant a built-in transformer-MLP-shaped model on the best "
                                      "device present; print the per-layer table and the end-to-end "
                                      "speedup measured side by side in the same run.")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--batch", type=int, default=16, help="rows per call, M (default 16)")
    demo.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    demo.add_argument("--blocks", type=int, default=4, help="MLP blocks (default 4)")
    demo.add_argument("--cache", default=None,
                      help="tuning cache path or URL (default: none, so tuning is timed cold)")
    demo.set_defaults(func=_cmd_demo)

    _add_cache_commands(sub)
    return parser


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    try:
        from .cache_db.cli import add_cache_parser  # noqa: PLC0415 - optional until cache_db lands
    except ImportError:
        return
    add_cache_parser(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
