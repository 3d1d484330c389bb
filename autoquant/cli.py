"""The `autoquant` command. `autoquant --help` and `autoquant COMMAND --help` describe each verb.

    autoquant demo                                   # built-in model, report and speedup
    autoquant profile --model pkg.mod:factory --input 'float32[16,1024]' --out prof.json
    autoquant pretune prof.json --cache postgresql+psycopg://... --device cuda:0
    autoquant report --model pkg.mod:factory --input 'int64[1,128]<32000' --plot r.png
    autoquant plan show plan.json
    autoquant worker --cache postgresql+psycopg://... --until-idle
    autoquant cache path | ls | stats | export | import | merge | prune | coverage
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
from typing import Any, Sequence

__all__ = ["main", "build_parser", "parse_input_spec", "load_factory"]

_SPEC = re.compile(r"^\s*(?P<dtype>[a-z0-9_]+)\[(?P<dims>[0-9,\s]+)\](?:<(?P<high>\d+))?\s*$")


def parse_input_spec(spec: str, device: str = "cpu") -> Any:
    """'float32[16,1024]' -> a random normal tensor; 'int64[1,128]<32000' -> random ints below 32000."""
    import torch  # noqa: PLC0415 - heavy import only where a verb needs it

    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"input spec {spec!r} is not DTYPE[d0,d1,...] (ints may add <HIGH), "
                         "e.g. 'float32[16,1024]' or 'int64[1,128]<32000'")
    dtype = getattr(torch, m["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"input spec {spec!r}: unknown dtype {m['dtype']!r}")
    dims = [int(d) for d in m["dims"].split(",") if d.strip()]
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(*dims, generator=gen).to(device=device, dtype=dtype)
    high = int(m["high"] or 1000)
    return torch.randint(0, high, dims, generator=gen, dtype=dtype).to(device)


def load_factory(spec: str) -> Any:
    """'package.module:factory' -> factory() (an nn.Module), with clear errors."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model {spec!r} must be 'module:factory', e.g. 'autoquant.demo:DemoMLP'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    model = factory()
    import torch  # noqa: PLC0415

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _model_and_inputs(args: argparse.Namespace) -> tuple[Any, tuple]:
    model = load_factory(args.model)
    device = args.device or "cpu"
    model = model.to(device)
    if args.dtype:
        import torch  # noqa: PLC0415

        model = model.to(getattr(torch, args.dtype))
    return model, tuple(parse_input_spec(s, device) for s in (args.input or []))


def _open_sql(url: str | None) -> Any:
    from .cache_db import SQLStore, default_cache_url  # noqa: PLC0415

    return SQLStore(url or default_cache_url())


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from .demo import run_demo  # noqa: PLC0415

    device = torch.device(args.device) if args.device else None
    run_demo(device=device, batch=args.batch, hidden=args.hidden, blocks=args.blocks, cache=args.cache)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .profile import record_shapes  # noqa: PLC0415

    model, inputs = _model_and_inputs(args)
    prof = record_shapes(model, *inputs, name=args.name)
    if args.m:
        from .profile import parse_m_buckets  # noqa: PLC0415

        prof = prof.with_m(parse_m_buckets(args.m))
    if args.out:
        prof.save(args.out)
        print(f"wrote profile {prof.name!r} ({len(prof.ops)} ops) to {args.out}")
    if args.cache:
        with _open_sql(args.cache) as store:
            store.save_profile(prof.name, prof.model_fingerprint, prof.counts())
            print(f"stored profile {prof.name!r} in {store.describe()}")
    if not args.out and not args.cache:
        print(prof.to_json())
    for op, n in prof.ops:
        print(f"  {op.label():40s} x{n}", file=sys.stderr)
    return 0


def _load_profile_arg(text: str, cache: str | None) -> Any:
    import os  # noqa: PLC0415

    from .profile import load_profile  # noqa: PLC0415

    if os.path.exists(text):
        return load_profile(text)
    with _open_sql(cache) as store:
        stored = store.load_profile(text)  # KeyError names the stored profiles
    return stored


def _cmd_pretune(args: argparse.Namespace) -> int:
    from .pretune import pretune  # noqa: PLC0415

    prof = _load_profile_arg(args.profile, args.cache)
    cands = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    with _open_sql(args.cache) as store:
        summary = pretune(prof, store, candidates=cands, device=args.device, mode=args.mode,
                          progress=not args.no_progress, deployment=args.deployment)
    print("\n".join(summary.lines()))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from . import autoquant, get_report  # noqa: PLC0415
    from .plan import save_plan  # noqa: PLC0415

    model, inputs = _model_and_inputs(args)
    cands = [c.strip() for c in args.candidates.split(",")] if args.candidates else None
    if args.budget_output and args.min_cosine is None:
        raise ValueError("--budget-output names the outputs --min-cosine applies to: pass --min-cosine as well")
    autoquant(model, inputs, cache=args.cache if args.cache != "none" else None, mode=args.mode,
              candidates=cands, min_sqnr=args.min_sqnr, progress=not args.no_progress,
              on_miss=args.on_miss, min_cosine=args.min_cosine, budget_outputs=args.budget_output,
              deployment=args.deployment)
    rep = get_report(model)
    frame = rep.summary_frame()
    if args.format == "markdown":
        print(frame.to_markdown(index=False))
    elif args.format == "html":
        print(frame.to_html(index=False))
    else:
        print(frame.to_string(index=False))
        if rep.accuracy is not None:
            print(rep.accuracy.summary())
    print(rep.summary(), file=sys.stderr)
    if args.plot:
        rep.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.save_plan:
        save_plan(model, args.save_plan)
        print(f"wrote plan to {args.save_plan}", file=sys.stderr)
    return 0


def _cmd_plan_show(args: argparse.Namespace) -> int:
    from .plan import load_plan  # noqa: PLC0415

    plan = load_plan(args.plan)
    env = plan.get("environment") or {}
    print(f"plan tuned on {env.get('device_kind', '?')}:{env.get('sku', '?')} "
          f"(torch {env.get('torch', '?')}, autoquant {env.get('autoquant', '?')})")
    for name, entry in plan["layers"].items():
        if entry["kind"] == "float":
            what = "float (kept)"
        elif entry["kind"] == "candidate":
            what = f"{entry['family']} {json.dumps(entry['params'], sort_keys=True)}"
        else:
            what = (f"M<{entry['threshold']}: {entry['small']['family']} {json.dumps(entry['small']['params'])}, "
                    f"else {entry['large']['family']} {json.dumps(entry['large']['params'])}")
        print(f"  {name:40s} {what}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'module:factory' returning an nn.Module")
    p.add_argument("--input", action="append", required=True,
                   help="an input spec DTYPE[dims] (ints may add <HIGH); repeat for several positional inputs")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default=None, help="cast the model to this dtype first, e.g. bfloat16")


def _add_deployment_arg(p: argparse.ArgumentParser) -> None:
    from .config import DEPLOYMENTS  # noqa: PLC0415

    p.add_argument("--deployment", default="eager", choices=DEPLOYMENTS,
                   help="how the model will run on a GPU: 'eager' (default; candidates timed as eager calls) or "
                        "'graphs' (CUDA graphs / torch.compile mode='reduce-overhead'; timed as graph replays); "
                        "no effect on a CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoquant", description="Pick the fastest quantized kernel per layer and shape; manage the tuning cache.",
        epilog="Run 'autoquant COMMAND --help' for each command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="autoquant a built-in MLP here; print the report and the speedup",
                          description="Autoquant a built-in transformer-MLP-shaped model on the best device "
                                      "present; print the per-layer table and the end-to-end speedup measured "
                                      "side by side in the same run.")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--batch", type=int, default=16, help="rows per call, M (default 16)")
    demo.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    demo.add_argument("--blocks", type=int, default=4, help="MLP blocks (default 4)")
    demo.add_argument("--cache", default=None, help="tuning cache path or URL (default: none, so tuning is timed cold)")
    demo.set_defaults(func=_cmd_demo)

    prof = sub.add_parser("profile", help="record a model's linear-op shape profile (no weights)",
                          description="Run the model once on the given inputs and record each linear op "
                                      "(M, K, N, bias, dtype) with its call count.")
    _add_model_args(prof)
    prof.add_argument("--name", default="profile", help="profile name (default 'profile')")
    prof.add_argument("--out", default=None, help="write the profile JSON here")
    prof.add_argument("--cache", default=None, help="also store it in this tuning cache under --name")
    prof.add_argument("--m", default=None,
                      help="also every layer at these M (batch sizes / prompt lengths a deployment will see): "
                           "'1,2,4,8' or a range '1-128' (its powers of two)")
    prof.set_defaults(func=_cmd_profile)

    pre = sub.add_parser("pretune", help="time every candidate for a profile's ops into a cache",
                         description="Time every candidate kernel for every op of PROFILE on this device with "
                                     "synthetic weights and write the measurements to the cache. Resumable: "
                                     "what is already cached is not timed again.")
    pre.add_argument("profile", help="a profile JSON file, or the name of a profile stored in the cache")
    pre.add_argument("--cache", default=None, help="tuning cache path or URL (default: $AUTOQUANT_CACHE_URL or the user cache)")
    pre.add_argument("--candidates", default=None, help="comma-separated family names (default: all)")
    pre.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    pre.add_argument("--mode", default="interpolate", choices=["interpolate", "relu"], help="cost model to time for")
    _add_deployment_arg(pre)
    pre.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    pre.set_defaults(func=_cmd_pretune)

    rep = sub.add_parser("report", help="autoquant a model and print what was chosen and why",
                         description="Autoquant --model on --input and print the per-layer report.")
    _add_model_args(rep)
    rep.add_argument("--cache", default=None, help="tuning cache path or URL ('none': memory only)")
    rep.add_argument("--candidates", default=None, help="comma-separated family names (default: all)")
    rep.add_argument("--mode", default="interpolate", choices=["interpolate", "relu"])
    _add_deployment_arg(rep)
    rep.add_argument("--min-sqnr", type=float, default=None, help="per-layer accuracy floor in dB")
    rep.add_argument("--min-cosine", type=float, default=None,
                     help="model-level accuracy budget in (0, 1]: every floating output's mean per-sample cosine to "
                          "the float model's, on the inputs, stays at or above it (verified; the report shows it)")
    rep.add_argument("--budget-output", action="append", default=None,
                     help="an output tensor --min-cosine applies to (e.g. logits); repeat for several; default all")
    rep.add_argument("--on-miss", default="bench", choices=["bench", "error", "baseline", "nearest"])
    rep.add_argument("--format", default="table", choices=["table", "markdown", "html"])
    rep.add_argument("--plot", default=None, help="write a PNG of per-layer speedups and candidate times")
    rep.add_argument("--save-plan", default=None, help="write the resulting plan JSON here")
    rep.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    rep.set_defaults(func=_cmd_report)

    plan = sub.add_parser("plan", help="inspect plan files", description="Inspect plan files.")
    plan_sub = plan.add_subparsers(dest="plan_command", metavar="ACTION")
    plan_sub.required = True
    show = plan_sub.add_parser("show", help="print a plan's layers and environment",
                               description="Print which scheme and kernel each layer of a plan runs.")
    show.add_argument("plan", help="plan JSON written by autoquant.save_plan or 'autoquant report --save-plan'")
    show.set_defaults(func=_cmd_plan_show)

    from .worker import build_parser as worker_parser  # noqa: PLC0415
    from .worker import run_from_args as run_worker  # noqa: PLC0415

    work = sub.add_parser("worker", help="pre-tune every profile stored in a team cache for this machine",
                          description="Claim, time and store the units of work (op x candidates) of every shape "
                                      "profile in the cache that this machine's environment lacks; N workers of "
                                      "one SKU split the work and time nothing twice (see autoquant/worker.py).")
    worker_parser(work)
    work.set_defaults(func=run_worker)

    from .cache_db.cli import add_cache_parser  # noqa: PLC0415 - the cache verbs live with the cache

    add_cache_parser(sub)
    return parser


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
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
