"""Tuning time that scales with the work (issue 19): cold tuning of a Segment Anything ViT-H
image-encoder block, the model of the torchao tutorial autoquant replaces, plus the demo MLP and a
tiny Llama, in one process at a fixed thread count.

The block is ``segment_anything.modeling.image_encoder.Block(dim=1280, num_heads=16,
window_size=14, use_rel_pos=True)`` from PyPI ``segment-anything`` 1.0 with random weights, on an
input of (B, 64, 64, 1280): its four Linear layers see M = B x 4096 rows. The package's
``__init__`` imports torchvision, whose wheel need not load against this torch, so
``image_encoder.py`` and ``common.py`` are loaded on their own, by file path
(``pip install --no-deps segment-anything==1.0``).

Prints, for the block: cold tuning time (target <= 60 s on the 2-core reference CPU, was 639 s),
one row per (op, candidate) with its predicted cost (from probes at fewer rows), first full-size
call, measured cost and what tuning did with it, the plan, and its end-to-end speed vs fp32 and vs
uniform int8 dynamic plans, timed interleaved. Then the cold tuning times of the demo MLP and a
tiny Llama. Optional, because they cost minutes:

- ``--exhaustive``: every candidate of every op timed in full (``hopeless_factor=0``, no budget;
  ~10 minutes for the block here): winners compared per op, with the regret of ours under the
  exhaustive figures.
- ``--today``: the same models tuned by the code of git HEAD (``git archive``, run in a
  subprocess): its tuning time, its plan, and its plan's speed vs ours, timed side by side.

    python benchmarks/bench_tuning.py                   # block at B=1, demo MLP, tiny Llama
    python benchmarks/bench_tuning.py --exhaustive --today
    python benchmarks/bench_tuning.py --quick           # smoke test: a quarter-width block, small models
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

import autoquant as aq
from autoquant import BenchConfig, FakeTimer, autoquant
from autoquant.bench import time_callables

ROOT = Path(__file__).resolve().parent.parent
SAM_HINT = "pip install --no-deps 'segment-anything==1.0'"


# ---- the models ----------------------------------------------------------------------------------
def _sam_modeling_dir() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution("segment-anything")
    except metadata.PackageNotFoundError:
        raise SystemExit(f"bench_tuning needs segment-anything 1.0 for the ViT-H block: {SAM_HINT}") from None
    path = Path(str(dist.locate_file("segment_anything/modeling/image_encoder.py")))
    if not path.is_file():
        raise SystemExit(f"segment-anything is installed but {path} is missing: reinstall it ({SAM_HINT})")
    return path.parent


def sam_block_class() -> type:
    """``Block`` from segment-anything's image_encoder.py, loaded by file path with its one sibling
    import (common.py) under a private package name: the package ``__init__`` (torchvision) and
    ``modeling/__init__`` are never run."""
    pkg_name = "_bench_sam_modeling"
    if pkg_name + ".image_encoder" in sys.modules:
        return sys.modules[pkg_name + ".image_encoder"].Block
    folder = _sam_modeling_dir()
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(folder)]  # type: ignore[attr-defined]
    sys.modules[pkg_name] = pkg
    for name in ("common", "image_encoder"):
        spec = importlib.util.spec_from_file_location(f"{pkg_name}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[pkg_name + ".image_encoder"].Block


def vit_block(quick: bool) -> tuple[nn.Module, torch.Tensor, str]:
    dim, heads, side = (320, 4, 32) if quick else (1280, 16, 64)
    torch.manual_seed(0)
    block = sam_block_class()(dim=dim, num_heads=heads, window_size=14, use_rel_pos=True,
                              input_size=(14, 14)).eval()
    x = torch.randn(1, side, side, dim)
    return block, x, f"SAM ViT-H Block(dim={dim}, heads={heads}, window 14, rel pos), input {tuple(x.shape)}"


def demo_mlp(quick: bool, m: int) -> tuple[nn.Module, torch.Tensor, str]:
    from autoquant.demo import DemoMLP

    hidden = 256 if quick else 1024
    torch.manual_seed(0)
    return DemoMLP(hidden=hidden, blocks=4).eval(), torch.randn(m, hidden), f"demo MLP h={hidden}, M={m}"


def tiny_llama(quick: bool, m: int) -> tuple[nn.Module, torch.Tensor, str]:
    import transformers

    hidden = 128 if quick else 512
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                   num_hidden_layers=1, num_attention_heads=hidden // 64,
                                   num_key_value_heads=hidden // 128, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, torch.randint(0, 4096, (1, m)), f"tiny Llama h={hidden}, M={m}"


def models(quick: bool) -> dict[str, tuple[nn.Module, torch.Tensor, str]]:
    out = {"vit": vit_block(quick)}
    for m in (16, 128):
        out[f"demo{m}"] = demo_mlp(quick, m)
    for m in (1, 128):
        out[f"llama{m}"] = tiny_llama(quick, m)
    return out


# ---- tuning --------------------------------------------------------------------------------------
def call(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def tune(model: nn.Module, x: torch.Tensor, timer=None) -> float:
    """Cold tuning through the public verb (warm run, timing, selection, finalize), seconds."""
    t0 = time.perf_counter()
    autoquant(model, x, cache=None, progress=False, timer=timer)
    return time.perf_counter() - t0


def plan(model: nn.Module) -> dict[str, list[str]]:
    """layer -> (family, params JSON) of its winner ("float", "" where kept float)."""
    df = aq.report(model)
    return {r.layer: [r.winner, r.params] for r in df.itertuples()}  # lists: what JSON gives back


def worker(quick: bool, names: list[str]) -> None:
    """Run by ``--today`` in a subprocess over git HEAD's code: tune each model, print JSON."""
    out = {}
    for name, (model, x, _) in models(quick).items():
        if name in names:
            seconds = tune(model, x)
            out[name] = {"tune_s": seconds, "plan": plan(model)}
    print(json.dumps(out))


def today(quick: bool, names: list[str], threads: int) -> dict:
    """Tune `names` with the code of git HEAD in a subprocess; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "autoquant", "kernels", "cache_db"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        pkg = Path(tmp) / "autoquant"
        (Path(tmp) / "kernels").rename(pkg / "kernels")
        (Path(tmp) / "cache_db").rename(pkg / "cache_db")
        env = dict(os.environ, PYTHONPATH=tmp, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--worker", ",".join(names), "--threads", str(threads)]
        if quick:
            cmd.append("--quick")
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tmp)
        return json.loads(done.stdout.strip().splitlines()[-1])


def rebuild(model: nn.Module, x: torch.Tensor, layers: dict[str, list[str]]) -> nn.Module:
    """`model` finalized to exactly the plan `layers` (from another run): a timer that makes each
    layer's planned candidate the only cheap one on that layer's ops."""
    model = copy.deepcopy(model)
    wanted: dict[tuple[int, int], set[tuple[str, str]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name in layers:
            wanted.setdefault((mod.in_features, mod.out_features), set()).add(tuple(layers[name]))

    def cost(key) -> float:
        chosen = wanted.get((key.op.k, key.op.n), set())
        return 1e-6 if (key.candidate, key.params) in chosen else 1e-3

    autoquant(model, x, cache=None, progress=False, timer=FakeTimer(cost, run=False))
    return model


def uniform(model: nn.Module, x: torch.Tensor, family: str, kernel: str) -> nn.Module:
    model = copy.deepcopy(model)

    def cost(key) -> float:
        return 1e-6 if key.candidate == family and json.loads(key.params).get("kernel") == kernel else 1e-3

    autoquant(model, x, cache=None, progress=False, timer=FakeTimer(cost, run=False))
    return model


# ---- the block -----------------------------------------------------------------------------------
def run_block(args, fp32: nn.Module, x: torch.Tensor, label: str, head: dict | None) -> None:
    import pandas as pd

    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 120)
    tuned = copy.deepcopy(fp32)
    seconds = tune(tuned, x)
    rep = aq.get_report(tuned)
    print(f"\n== {label}: cold tuning {seconds:.1f}s (target <= 60 s; the tuner itself {rep.seconds:.1f}s)")
    ops = rep.to_ops_frame()
    cols = ["op", "candidate", "predicted_us", "predicted_low_us", "first_call_us", "cost_us", "samples", "status"]
    shown = ops[cols].copy()
    shown["status"] = shown["status"].str.slice(0, 70)
    print(shown.to_string(index=False, float_format=lambda v: f"{v:,.0f}"))
    ours = plan(tuned)
    print("plan:", {k: f"{f} {p}" for k, (f, p) in ours.items()})
    variants = {"fp32": fp32, "autoquant": tuned,
                "uniform int8_dynamic/onednn": uniform(fp32, x, "int8_dynamic", "onednn"),
                "uniform int8_dynamic/fbgemm": uniform(fp32, x, "int8_dynamic", "fbgemm")}
    if head is not None:
        print(f"git HEAD's tuner: {head['tune_s']:.1f}s cold; plan:",
              {k: f"{f} {p}" for k, (f, p) in head["plan"].items()},
              "(same as ours)" if head["plan"] == ours else "(differs from ours)")
        variants["git HEAD's plan"] = rebuild(fp32, x, head["plan"])
    if args.exhaustive:
        exhaustive(fp32, x)
    bench = BenchConfig(rounds=args.rounds, min_block_s=0.05)
    timed = time_callables({k: (lambda m=m: call(m, x)) for k, m in variants.items()}, torch.device("cpu"), bench)
    base = timed["fp32"].median_s
    print(f"{'variant':40s} {'ms':>10s} {'vs fp32':>8s} {'spread':>7s}")
    for name, m in sorted(timed.items(), key=lambda kv: kv[1].median_s):
        print(f"{name:40s} {m.median_s * 1e3:10.1f} {base / m.median_s:7.2f}x {m.spread:6.1%}")


def exhaustive(fp32: nn.Module, x: torch.Tensor) -> None:
    """Every candidate of every op of the block timed in full; winners per op vs ours, and the
    regret of ours under the exhaustive figures."""
    from autoquant.bench import default_timer
    from autoquant.candidates import default_candidates
    from autoquant.config import TuneConfig
    from autoquant.profile import record_shapes
    from autoquant.store import MemoryStore
    from autoquant.tune import tune_ops

    ops = {op: default_candidates(torch.device("cpu"), op.torch_dtype) for op in record_shapes(fp32, x).counts()}
    cpu = torch.device("cpu")
    results = {}
    for name, config in (("ours", TuneConfig()), ("exhaustive", TuneConfig(hopeless_factor=0, op_budget_s=None))):
        t0 = time.perf_counter()
        results[name] = tune_ops(ops, cpu, MemoryStore(), default_timer(cpu, config.bench), config, progress=False)
        print(f"tune_ops, {name}: {time.perf_counter() - t0:.1f}s")
    for op in ops:
        best = {}
        for name, res in results.items():
            ok = {c: t.cost.value for c, t in res[op].items() if t.ok}
            best[name] = min(ok, key=lambda c, ok=ok: (ok[c], c.order, c.params_json()))
        full = {c: t.cost.value for c, t in results["exhaustive"][op].items() if t.ok}
        regret = full[best["ours"]] / full[best["exhaustive"]]
        print(f"{op.label():28s} ours {best['ours'].name:45s} exhaustive {best['exhaustive'].name:45s} "
              f"regret {regret:.2f}x ({'same' if best['ours'] == best['exhaustive'] else 'differs'})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: quarter-width block, small models")
    ap.add_argument("--exhaustive", action="store_true", help="also time every candidate of the block in full")
    ap.add_argument("--today", action="store_true", help="also tune with git HEAD's code (a subprocess)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7, help="end-to-end timing rounds")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.quick, args.worker.split(","))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    cases = models(args.quick)
    heads = today(args.quick, list(cases), args.threads) if args.today else {}
    model, x, label = cases.pop("vit")
    run_block(args, model, x, label, heads.get("vit"))
    print("\n== cold tuning time of small models (no slower than before)")
    for name, (model, x, label) in cases.items():
        seconds = tune(copy.deepcopy(model), x)
        was = f"; git HEAD's tuner {heads[name]['tune_s']:.1f}s" if name in heads else ""
        print(f"{label:28s} {seconds:6.1f}s{was}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
