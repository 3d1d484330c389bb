"""End-to-end: autoquant vs the float baseline and vs every uniform scheme, side by side in one run.

Models (``--models``): the demo MLP, a tiny Llama, and a Llama-3-8B-shaped Llama ("llama3-8b":
the real widths, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, with ``--layers`` decoder
layers and a 32000-token vocabulary), all with random weights from a config, in ``--dtype`` on
``--device``, at M=1 and M=128 rows per call. A "uniform scheme" puts ONE candidate (family +
params + kernel, from ``default_candidates(device, dtype)``) on every layer it supports. All
variants of one model and M are timed interleaved by the same harness, so the ratios come from one
run; on CUDA ``--deployment`` decides both how autoquant tunes and how the variants are timed
("eager", the default: synchronized eager calls; "graphs": CUDA-graph replays, where a forward can
be captured). The headline ratios are then re-timed in paired rounds of synchronized eager calls
(what a deployed eager model costs). Also prints the cold tuning time of the demo model (target: under
60 s on a CPU).

Targets on a CPU for fp32 models (issue 2): autoquant >= 0.95 x the best uniform scheme,
>= 1.5 x fp32 at M >= 16, never slower than the baseline beyond noise. On a GPU (issue 13):
autoquant >= 0.95 x the best uniform scheme, bf16 Llama-3-8B shapes.

    python benchmarks/bench_e2e.py            # full, CPU, fp32
    python benchmarks/bench_e2e.py --quick    # smaller models, fewer samples
    python benchmarks/bench_e2e.py --device cuda --dtype bfloat16 --models llama3-8b --layers 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

from autoquant import BenchConfig, autoquant, report
from autoquant.bench import time_callables
from autoquant.candidates import default_candidates
from autoquant.config import DEPLOYMENTS
from autoquant.demo import DemoMLP
from autoquant.finalize import replace_module
from autoquant.keys import OpShape, dtype_name, parse_dtype

MODELS = ("demo", "tiny-llama", "llama3-8b")
# Llama-3-8B's widths: (hidden, intermediate, attention heads, KV heads).
LLAMA3_8B = (4096, 14336, 32, 8)
LLAMA_VOCAB = 32000  # Llama-3's is 128256; the LM head's width is not what this measures


def llama(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int = 4096):
    """A LlamaForCausalLM with random weights (seeded) from these widths."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_llama(hidden: int, layers: int):
    return llama(hidden, hidden * 8 // 3 // 64 * 64, hidden // 64, hidden // 128, layers)


def synchronized(fn, device: torch.device):
    """`fn` followed by a device synchronize on CUDA: a host timer then measures the whole call,
    not the time to enqueue its kernels."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def linear_ops(model: nn.Module, example, m: int) -> dict[str, OpShape]:
    ops = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            ops[name] = OpShape(m, mod.in_features, mod.out_features, mod.bias is not None,
                                dtype_name(mod.weight.dtype))
    return ops


def uniform(model: nn.Module, cand, ops: dict[str, OpShape], device,
            act_absmax: dict[str, torch.Tensor] | None = None) -> nn.Module | None:
    """A copy of `model` with `cand` on every linear layer, or None if some layer can't take it.
    `act_absmax` (layer name -> per-input-channel absmax of its activations): what calibrated
    candidates (int8_smooth) are built from; without it they are left out (None)."""
    if any(cand.supports(device, op) is not None for op in ops.values()) or (cand.calibrated and act_absmax is None):
        return None
    out = copy.deepcopy(model)
    for name in ops:
        lin = out.get_submodule(name)
        replace_module(out, name, cand.build(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(),
                                             act_absmax=None if act_absmax is None else act_absmax[name]))
    return out


def run_case(label: str, model: nn.Module, call, m: int, device, bench: BenchConfig, rows: list,
             dtype: torch.dtype = torch.float32, deployment: str = "eager") -> None:
    ops = linear_ops(model, None, m)
    base_name = f"{dtype_name(dtype)} baseline"
    base = copy.deepcopy(model)
    tuned = copy.deepcopy(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        autoquant(tuned, None, manual=True, cache=None, progress=False, deployment=deployment)
        call(tuned)
        from autoquant import finalize

        finalize(tuned)
    tune_s = time.perf_counter() - t0
    variants = {base_name: base, "autoquant": tuned}
    for cand in default_candidates(device, dtype):
        u = uniform(model, cand, ops, device)
        if u is not None:
            variants[f"uniform {cand.name}"] = u
    with torch.no_grad():
        for v in variants.values():
            call(v)
        timed = time_callables({k: (lambda v=v: call(v)) for k, v in variants.items()}, device, bench,
                               deployment=deployment)
    base_t = timed[base_name].median_s
    uniforms = {k: t for k, t in timed.items() if k.startswith("uniform")}
    best_uniform = min(uniforms, key=lambda k: uniforms[k].median_s)
    aq_t = timed["autoquant"]
    rep = report(tuned)
    chosen = (rep["winner"] + "/" + rep["kernel"]).value_counts().to_dict()
    # The headline ratios again, paired: each round times both sides back to back (alternating
    # order) and the ratio of the pair is taken, so drift and a neighbour's bursts cancel. Each
    # call is synchronized on CUDA (else the host timer sees only the enqueueing).
    with torch.no_grad():
        vs_best = paired_ratio(synchronized(lambda: call(variants[best_uniform]), device),
                               synchronized(lambda: call(tuned), device), bench)
        vs_fp32 = paired_ratio(synchronized(lambda: call(base), device),
                               synchronized(lambda: call(tuned), device), bench)
    same_plan = all(str(k) == best_uniform.removeprefix("uniform ") for k in _layer_kernels(tuned))
    print(f"\n== {label}, M={m}: autoquant tuned in {tune_s:.1f}s, chose {chosen}")
    short = dtype_name(dtype).replace("bfloat", "bf").replace("float", "fp")
    print(f"{'variant':70s} {'ms':>9s} {'vs ' + short:>8s} {'spread':>7s}")
    for name, t in sorted(timed.items(), key=lambda kv: kv[1].median_s):
        print(f"{name[:70]:70s} {t.median_s * 1e3:9.3f} {base_t / t.median_s:7.2f}x {t.spread * 100:6.1f}%")
    ratio_best = uniforms[best_uniform].median_s / aq_t.median_s
    print(f"autoquant vs {short}: {base_t / aq_t.median_s:.2f}x; vs best uniform ({best_uniform}): {ratio_best:.2f}x")
    print(f"paired rounds: autoquant vs {short} {vs_fp32[1]:.2f}x (IQR {vs_fp32[0]:.2f}-{vs_fp32[2]:.2f}); "
          f"vs best uniform {vs_best[1]:.2f}x (IQR {vs_best[0]:.2f}-{vs_best[2]:.2f})"
          + ("; autoquant's plan IS the best uniform scheme on every layer" if same_plan else ""))
    rows.append({"case": label, "m": m, "device": str(device), "dtype": dtype_name(dtype),
                 "deployment": deployment, "tune_s": round(tune_s, 2), "baseline_ms": base_t * 1e3,
                 "autoquant_ms": aq_t.median_s * 1e3, "speedup_vs_baseline": base_t / aq_t.median_s,
                 "best_uniform": best_uniform, "autoquant_vs_best_uniform": ratio_best,
                 "paired_vs_baseline": vs_fp32[1], "paired_vs_best_uniform": vs_best[1],
                 "paired_vs_best_uniform_iqr": [vs_best[0], vs_best[2]], "same_plan_as_best_uniform": same_plan,
                 "chosen": chosen, "noise": max(aq_t.spread, timed[base_name].spread),
                 "timed_ms": {k: t.median_s * 1e3 for k, t in timed.items()}})


def _layer_kernels(model: nn.Module) -> list[object]:
    """The candidate each linear layer runs (a DispatchLinear gives its dispatch; float: 'float')."""
    from autoquant.candidates import QuantizedLinear  # noqa: PLC0415

    out: list[object] = []
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            out.append(getattr(mod, "dispatch", None) or mod.candidate.name)
        elif isinstance(mod, nn.Linear):
            out.append("float")
    return out


def paired_ratio(slow, fast, bench: BenchConfig, rounds: int = 41) -> tuple[float, float, float]:
    """(p25, median, p75) over rounds of time(slow) / time(fast), each round one block of each,
    back to back, in alternating order (gc paused)."""
    from autoquant.bench import fixed_threads, paired_blocks, quantiles  # noqa: PLC0415

    with fixed_threads(bench.cpu_threads):
        ts, tf = paired_blocks(slow, fast, rounds, bench.min_block_s)
    return quantiles([a / b for a, b in zip(ts, tf)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer samples")
    parser.add_argument("--tiny", action="store_true",
                        help="llama3-8b at 1/16 of its widths (a dry run of the GPU script on a CPU)")
    parser.add_argument("--out", default=None, help="write the summary rows as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16 or float16")
    parser.add_argument("--models", default="demo,tiny-llama",
                        help=f"comma-separated subset of {','.join(MODELS)} (default demo,tiny-llama)")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of llama3-8b (default 1)")
    parser.add_argument("--m", default="1,128", help="rows per call, comma-separated (default 1,128)")
    parser.add_argument("--deployment", default="eager", choices=DEPLOYMENTS,
                        help="on CUDA: tune and time for eager calls (default) or CUDA-graph replays")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    models = [name for name in args.models.split(",") if name]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available in this process")
    ms = [int(v) for v in args.m.split(",") if v]
    quick = args.quick or args.tiny
    bench = BenchConfig(rounds=7 if quick else 31, min_block_s=10e-3 if quick else 30e-3,
                        cuda_samples=20 if quick else 50)
    hidden = 512 if args.quick else 1024
    rows: list[dict] = []

    if "demo" in models:
        # Cold tuning time of the demo model exactly as `make demo` runs it (M=16, memory cache).
        demo = DemoMLP().to(device=device, dtype=dtype).eval()
        t0 = time.perf_counter()
        autoquant(demo, torch.randn(16, 1024, device=device, dtype=dtype), cache=None, progress=False)
        cold = time.perf_counter() - t0
        print(f"cold tuning of the demo model (DemoMLP(1024, 4 blocks), M=16): {cold:.1f}s (target < 60 s)")
        rows.append({"case": "demo cold tuning", "tune_s": round(cold, 2)})
        for m in ms:
            mlp = DemoMLP(hidden=hidden, blocks=4).to(device=device, dtype=dtype).eval()
            x = torch.randn(m, hidden, device=device, dtype=dtype)
            run_case(f"demo MLP h={hidden}", mlp, lambda mod, x=x: mod(x), m, device, bench, rows, dtype,
                     args.deployment)
    llamas = []
    try:
        if "tiny-llama" in models:
            llamas.append(tiny_llama(256 if args.quick else 512, 2 if args.quick else 4))
        if "llama3-8b" in models:
            hidden_, inter, heads, kv = LLAMA3_8B
            if args.tiny:  # the same shape family at 1/16 of the widths (head_dim 128 -> 8)
                hidden_, inter, vocab = hidden_ // 16, inter // 16, 512
            else:
                vocab = LLAMA_VOCAB
            llamas.append(llama(hidden_, inter, heads, kv, args.layers, vocab))
    except ImportError:
        print("transformers not installed: skipping the Llama models", file=sys.stderr)
    try:
        run_llamas(llamas, ms, device, dtype, bench, rows, args.deployment)
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep and write what was measured
        print(f"interrupted: writing the {len(rows)} rows measured so far")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


def run_llamas(llamas: list, ms: list[int], device: torch.device, dtype: torch.dtype, bench: BenchConfig,
               rows: list, deployment: str = "eager") -> None:
    """run_case for each Llama model at each M (logits of one sequence of M tokens)."""
    for model in llamas:
        model = model.to(device=device, dtype=dtype)
        cfg = model.config
        label = (f"Llama h={cfg.hidden_size} i={cfg.intermediate_size} layers={cfg.num_hidden_layers} "
                 f"{dtype_name(dtype)}")
        for m in ms:
            ids = torch.randint(0, cfg.vocab_size, (1, m), device=device)
            run_case(label, model, lambda mod, ids=ids: mod(ids).logits, m, device, bench, rows, dtype,
                     deployment)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
