"""`make demo` / `autoquant demo`: autoquant a built-in model on the best device here, print the
per-layer table and the end-to-end speedup measured side by side in the same run."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

__all__ = ["DemoMLP", "run_demo"]


class DemoMLP(nn.Module):
    """A transformer-MLP-shaped stack: `blocks` x (Linear(h, 4h), GELU, Linear(4h, h)) + residual,
    then a head. Repeated blocks share op shapes, so tuning cost does not grow with depth."""

    def __init__(self, hidden: int = 1024, blocks: int = 4, out: int = 256) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(self.norm(x))
        return self.head(x)


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_demo(*, device: torch.device | None = None, batch: int = 16, hidden: int = 1024,
             blocks: int = 4, cache: object = None, dtype: torch.dtype | None = None) -> dict:
    """Returns {"report": DataFrame, "speedup": float, "tune_s": float, ...} and prints them."""
    from . import autoquant, report  # noqa: PLC0415 - keep the demo import light
    from .bench import BenchConfig, time_callables  # noqa: PLC0415

    device = device or best_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    model = DemoMLP(hidden, blocks).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, hidden, device=device, dtype=dtype)
    baseline = copy.deepcopy(model)
    started = time.perf_counter()
    with torch.no_grad():
        autoquant(model, x, cache=cache, progress=True)
    tune_s = time.perf_counter() - started
    frame = report(model)
    with torch.no_grad():
        ref, out = baseline(x), model(x)
        cos = torch.nn.functional.cosine_similarity(ref.float().flatten(), out.float().flatten(), dim=0).item()
        timed = time_callables({"float": lambda: baseline(x), "autoquant": lambda: model(x)}, device,
                               BenchConfig(rounds=15, min_block_s=20e-3))
    speedup = timed["float"].median_s / timed["autoquant"].median_s
    cols = ["layer", "shapes", "winner", "kernel", "cost_us", "baseline_us", "speedup", "sqnr_db"]
    import pandas as pd  # noqa: PLC0415

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 48):
        print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\ndevice {device}, dtype {str(dtype).removeprefix('torch.')}, batch {batch}: "
          f"tuning took {tune_s:.1f}s")
    print(f"end to end: float {timed['float'].median_s * 1e3:.3f} ms, autoquant "
          f"{timed['autoquant'].median_s * 1e3:.3f} ms -> speedup {speedup:.2f}x "
          f"(median of {timed['float'].samples} interleaved samples), output cosine {cos:.5f}")
    return {"report": frame, "speedup": speedup, "tune_s": tune_s, "cosine": cos}


def tiny_demo() -> DemoMLP:
    """A small DemoMLP (hidden 128, 2 blocks) for quick command-line tries and tests:
    ``autoquant report --model autoquant.demo:tiny_demo --input 'float32[4,128]'``."""
    return DemoMLP(hidden=128, blocks=2, out=64)
