"""Hugging Face generation, one process: greedy tokens/s of a Llama-architecture model from a config.

The model (default: hidden 1024, intermediate 2816, 6 layers, GQA 16/4 heads, vocab 32000,
random seeded weights) is saved as an fp32 and a bf16 checkpoint in a temporary folder, then, per
checkpoint, these run side by side, in interleaved rounds (each round times one greedy generate of
every variant, so drift hits all alike; medians reported):

- ``as loaded``: ``from_pretrained`` in the checkpoint's dtype.
- ``quantize_dynamic``: torch's ``quantize_dynamic`` int8 on every nn.Linear (fp32 checkpoint only).
- ``from_pretrained``: ``from_pretrained(..., quantization_config=AutoQuantConfig(cache=...))``;
  its first ``generate()`` is recorded and tuned (timed as the tuning time).
- ``one-liner``: a float model given ``autoquant.hf.tune(model)`` (generate-aware), same cache:
  its first generate finds every measurement cached.
- ``reloaded``: ``save_pretrained`` of the from_pretrained model, then ``from_pretrained`` of that
  folder (timed as the reload time; it benchmarks nothing), bit-exact logits checked.

Targets (issue 15): autoquant >= 0.97x quantize_dynamic (fp32) and >= 1.9x as loaded (bf16);
reload < 20% of the tuning time.

    python benchmarks/bench_hf.py                 # full sizes, fp32 and bf16
    python benchmarks/bench_hf.py --quick         # small sizes, a minute or so
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import autoquant as aq
import autoquant.hf as aqhf
import transformers

FULL = dict(hidden=1024, intermediate=2816, layers=6, heads=16, kv_heads=4, vocab=32000, prompt=48, new=24)
QUICK = dict(hidden=256, intermediate=704, layers=2, heads=8, kv_heads=2, vocab=4096, prompt=16, new=8)


def build(folder: Path, sizes: dict, dtype: torch.dtype) -> str:
    cfg = transformers.LlamaConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
        num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"], max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    out = folder / f"llama-{str(dtype)[6:]}"
    model.save_pretrained(out)
    return str(out)


def load(path: str, qc=None) -> nn.Module:
    kw = {} if qc is None else {"quantization_config": qc}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def generate(model: nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def kernels(model: nn.Module) -> str:
    df = aq.report(model)
    return ", ".join(f"{n}x {k}" for k, n in df["kernel"].value_counts().items())


def run_dtype(folder: Path, sizes: dict, dtype: torch.dtype, rounds: int, cache: str) -> dict:
    path = build(folder, sizes, dtype)
    ids = torch.randint(0, sizes["vocab"], (1, sizes["prompt"]), generator=torch.Generator().manual_seed(1))
    new = sizes["new"]
    variants: dict[str, nn.Module] = {"as loaded": load(path)}
    if dtype == torch.float32:
        with warnings.catch_warnings():  # its deprecation notices, not ours
            warnings.simplefilter("ignore")
            variants["quantize_dynamic"] = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(variants["as loaded"]), {nn.Linear}, dtype=torch.qint8)
    aq_model = load(path, aqhf.AutoQuantConfig(cache=cache, progress=False))
    _, tune_s = timed(lambda: generate(aq_model, ids, new))
    variants["from_pretrained"] = aq_model
    one = aqhf.tune(load(path), config=aqhf.AutoQuantConfig(cache=cache, progress=False))
    _, one_tune_s = timed(lambda: generate(one, ids, new))
    variants["one-liner"] = one
    saved = folder / f"saved-{str(dtype)[6:]}"
    aq_model.save_pretrained(saved)
    reloaded, reload_s = timed(lambda: load(str(saved)))
    variants["reloaded"] = reloaded
    with torch.no_grad():
        exact = torch.equal(reloaded(ids).logits, aq_model(ids).logits)
    for model in variants.values():  # warm-up
        generate(model, ids, new)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            _, s = timed(lambda: generate(variants[name], ids, new))
            samples[name].append(new / s)
    tps = {k: statistics.median(v) for k, v in samples.items()}
    return {"dtype": str(dtype)[6:], "tokens_per_s": tps, "tune_s": tune_s, "one_liner_tune_s": one_tune_s,
            "reload_s": reload_s, "reload_bit_exact": exact, "kernels": kernels(aq_model),
            "spread": {k: (min(v), max(v)) for k, v in samples.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (hidden 256, 2 layers, vocab 4096)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="tuning cache URL (default: a fresh SQLite file, so tuning is real)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    print(f"Llama {sizes}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"autoquant {aq.__version__}, {args.threads} threads")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = args.cache or f"sqlite:///{folder / 'cache.sqlite'}"
        for name in args.dtypes.split(","):
            res = run_dtype(folder, sizes, getattr(torch, name), args.rounds, cache)
            results.append(res)
            tps = res["tokens_per_s"]
            base = "quantize_dynamic" if "quantize_dynamic" in tps else "as loaded"
            print(f"\n{res['dtype']} checkpoint: greedy tokens/s (median of {args.rounds}), x vs {base}")
            for k, v in tps.items():
                lo, hi = res["spread"][k]
                print(f"  {k:17s} {v:7.1f} tok/s  [{lo:.1f} .. {hi:.1f}]  {v / tps[base]:.2f}x")
            print(f"  tuning (first generate, recorded + tuned): {res['tune_s']:.1f}s; one-liner from the warm cache: "
                  f"{res['one_liner_tune_s']:.1f}s")
            print(f"  reload of the saved model: {res['reload_s']:.2f}s = {res['reload_s'] / res['tune_s']:.1%} of "
                  f"tuning; logits bit-exact: {res['reload_bit_exact']}")
            print(f"  kernels: {res['kernels']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
