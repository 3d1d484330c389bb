"""Memory of a finalized model per scheme, its runtime (prepacked) copies, and peak RSS while tuning.

1. For ``autoquant.demo.DemoMLP`` (hidden 512, 4 blocks; ``--llama`` for a tiny LlamaForCausalLM of
   hidden 512 instead), every nn.Linear is planned onto one scheme (``autoquant.plan.apply_plan``;
   a layer the kernel cannot run stays float) and the table gives parameter + buffer bytes (each
   storage once) against the same model in float32 and in bf16, plus the RUNTIME bytes the
   layers hold outside their buffers (prepacked fbgemm / oneDNN / CPU-int4 weights, per-dtype
   scales): measured as the RSS growth of building one more copy of every layer's runtime state
   (fbgemm's handles are opaque to Python; RSS sees them).
2. Peak RSS while ``autoquant(model, x, cache=None)`` tunes the float32 model with the real CPU
   timer (sampled every 2 ms by a thread), against the model's own size and against what tuning
   one op at a time has to hold: the largest op's candidates (their buffers and prepacked
   handles, built side by side) plus the weight copies the cold CPU timer cycles over (one
   budget per op, at most the last-level cache: ``autoquant.tune.copies_per_candidate``).

RSS here is RssAnon (anonymous memory: heap, tensors), so that code pages of libtorch touched for
the first time do not count as memory the model holds. The start of a tuning run is measured
after one plain forward of the model (oneDNN / MKL / thread-pool state made by the first run of
any model, ~7 MiB here, is not tuning's), and each run is a fresh process (``--runs``, median).

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --llama --skip-tune
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoquant.candidates import (
    Candidate,
    FloatCandidate,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    QuantizedLinear,
)
from autoquant.candidates._cpu_ops import _BUILDERS
from autoquant.keys import OpShape
from autoquant.plan import PLAN_FORMAT, PLAN_VERSION, apply_plan
from autoquant.tune import _return_freed_memory

if TYPE_CHECKING:
    from typing_extensions import Self

MB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
BF16, F32 = torch.bfloat16, torch.float32

SCHEMES: tuple[tuple[str, torch.dtype, Candidate | None], ...] = (
    ("float32 (no plan)", F32, None),
    ("bf16 (no plan)", BF16, None),
    ("float/fbgemm_fp16 (fp32 model)", F32, FloatCandidate("fbgemm_fp16")),
    ("float/onednn (fp32 model)", F32, FloatCandidate("onednn")),
    ("int8_dynamic/fbgemm (fp32 model)", F32, Int8Dynamic("fbgemm")),
    ("int8_dynamic/onednn (fp32 model)", F32, Int8Dynamic("onednn")),
    ("int8_weight_only/int8pack (bf16 model)", BF16, Int8WeightOnly("int8pack")),
    ("int4 tinygemm_cpu G32 (bf16 model)", BF16, Int4WeightOnly("tinygemm_cpu", 32)),
    ("int4 tinygemm_cpu G64 (bf16 model)", BF16, Int4WeightOnly("tinygemm_cpu", 64)),
    ("int4 tinygemm_cpu G128 (bf16 model)", BF16, Int4WeightOnly("tinygemm_cpu", 128)),
    ("fp8_weight_only (bf16 model)", BF16, Fp8WeightOnly("dequant")),
)
# Which prepack-cache builder a kernel uses, and which of its buffers it reads.
PREPACKS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("float", "onednn"): ("onednn", ("weight",)),
    ("float", "fbgemm_fp16"): ("fbgemm_fp16", ("weight",)),
    ("int8_dynamic", "fbgemm"): ("fbgemm_int8", ("w_int8", "w_scale")),
    ("int8_dynamic", "onednn"): ("onednn_int8", ("w_int8", "w_scale")),
    ("int4_weight_only", "tinygemm_cpu"): ("int4pack", ("w_int4",)),
}


# ---- measuring --------------------------------------------------------------------------------------
def rss() -> int:
    """Anonymous resident bytes (RssAnon): heap and tensors, without the file-backed code pages of
    libtorch that the first call of each kernel library faults in (tens of MiB)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/statm", encoding="ascii") as fh:  # no RssAnon (old kernels): all of RSS
        return int(fh.read().split()[1]) * PAGE


def _trim() -> None:
    """Hand freed heap pages back to the OS, so RSS deltas see allocations, not allocator slack."""
    gc.collect()
    _return_freed_memory()  # the tuner's own (glibc malloc_trim)


def state_bytes(model: nn.Module) -> int:
    """Parameter + buffer bytes, each storage once (tied weights count once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _rebuild_runtime(layer: QuantizedLinear) -> Any:
    """One more copy of what `layer` keeps at run time beyond its buffers."""
    cand = layer.candidate
    prepack = PREPACKS.get((cand.family, cand.kernel))
    if prepack is None:
        return cand.prepare(layer.packed())
    kind, names = prepack
    return _BUILDERS[kind][0](*(getattr(layer, n) for n in names))


def runtime_bytes(model: nn.Module) -> int:
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    _trim()
    before = rss()
    held = [_rebuild_runtime(m) for m in layers]
    _trim()  # the builders' temporaries (e.g. int4 unpacked to int32) are gone: count what stays
    after = rss()
    del held
    return after - before


# ---- models -----------------------------------------------------------------------------------------
HIDDEN = 512  # DemoMLP's width (--hidden)


def demo_mlp(dtype: torch.dtype) -> nn.Module:
    from autoquant.demo import DemoMLP

    torch.manual_seed(0)
    return DemoMLP(hidden=HIDDEN, blocks=4).to(dtype).eval()


def tiny_llama(dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def planned(make: Callable[[torch.dtype], nn.Module], dtype: torch.dtype, cand: Candidate | None) -> nn.Module:
    model = make(dtype)
    if cand is None:
        return model
    layers = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        op = OpShape(16, mod.in_features, mod.out_features, mod.bias is not None, str(dtype).removeprefix("torch."))
        reason = cand.supports(torch.device("cpu"), op)
        if reason is None or "not worth timing" in reason:
            layers[name] = {"kind": "candidate", "family": cand.family, "params": cand.params()}
    apply_plan(model, {"format": PLAN_FORMAT, "version": PLAN_VERSION, "environment": None, "layers": layers})
    return model


# ---- peak RSS while tuning -----------------------------------------------------------------------------
class PeakSampler:
    """Samples RSS every `period` seconds on a thread; `peak` is the largest seen."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak = period, rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def largest_op_budget(model: nn.Module, m: int) -> dict[str, float]:
    """Bytes of every supported candidate of the model's largest Linear (float32, M=`m`) built
    side by side, and of the cold weight copies the CPU timer adds for them."""
    from autoquant.bench import BenchConfig
    from autoquant.candidates import default_candidates
    from autoquant.tune import _read_bytes, _state_bytes, copies_per_candidate

    lin = max((mod for mod in model.modules() if isinstance(mod, nn.Linear)),
              key=lambda mod: mod.in_features * mod.out_features)
    op = OpShape(m, lin.in_features, lin.out_features, lin.bias is not None, "float32")
    cpu = torch.device("cpu")
    built = [c.build(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(),
                     act_absmax=torch.ones(lin.in_features))  # int8_smooth's statistics: bytes only here
             for c in default_candidates(cpu, F32) if c.supports(cpu, op) is None]
    sizes = [_state_bytes(b) for b in built]
    reads = [_read_bytes(b) for b in built]  # what a copy holds: what a call reads
    n = copies_per_candidate(reads, BenchConfig().cold_target_bytes())
    return {"op": op.label(), "candidates_mb": sum(sizes) / MB, "copies_mb": (n - 1) * sum(reads) / MB,
            "copies_per_candidate": n}


def tune_peak(make: Callable[[torch.dtype], nn.Module], example: Callable[[], Any]) -> dict[str, float]:
    from autoquant import autoquant

    model = make(F32)
    x = example()
    size = state_bytes(model)
    with torch.no_grad():
        model(x)  # a model that has run once: kernel libraries' one-time state is not tuning's
    _trim()
    base = rss()
    t0 = time.perf_counter()
    with PeakSampler() as sampler, torch.no_grad():
        autoquant(model, x, cache=None, progress=False)
    seconds = time.perf_counter() - t0
    _trim()
    return {"model_mb": size / MB, "rss_before_mb": base / MB, "peak_mb": sampler.peak / MB,
            "peak_over_start_mb": (sampler.peak - base) / MB, "after_mb": rss() / MB,
            "final_state_mb": state_bytes(model) / MB, "tune_s": seconds}


# ---- main ---------------------------------------------------------------------------------------------
def _examples(llama: bool) -> Callable[[], Any]:
    if llama:
        return lambda: torch.randint(0, 1024, (1, 16))
    return lambda: torch.randn(16, HIDDEN)


def tune_runs(llama: bool, runs: int) -> list[dict[str, float]]:
    """`runs` tuning runs, each in a fresh process (a second run in one process would find the
    allocator and libraries warmed by the first): peak RSS varies run to run with where the
    allocator puts things, so one run is not a figure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--tune-once", "--hidden", str(HIDDEN)]
    cmd += ["--llama"] if llama else []
    out = []
    for _ in range(runs):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama", action="store_true", help="tiny LlamaForCausalLM (hidden 512) instead of DemoMLP")
    p.add_argument("--skip-tune", action="store_true", help="only the per-scheme table")
    p.add_argument("--skip-table", action="store_true", help="only the tuning peak")
    p.add_argument("--hidden", type=int, default=512, help="DemoMLP width (default 512; 2048: 0.5 GiB fp32)")
    p.add_argument("--runs", type=int, default=5, help="tuning runs, each in a fresh process (default 5)")
    p.add_argument("--tune-once", action="store_true", help=argparse.SUPPRESS)  # one run, JSON out
    args = p.parse_args(argv)
    global HIDDEN
    HIDDEN = args.hidden
    torch.set_num_threads(max(1, torch.get_num_threads()))
    make = tiny_llama if args.llama else demo_mlp
    if args.tune_once:
        print(json.dumps(tune_peak(make, _examples(args.llama))))
        return 0
    label = "tiny Llama (hidden 512, 4 layers)" if args.llama else f"DemoMLP(hidden={HIDDEN}, blocks=4)"
    f32 = state_bytes(make(F32))
    bf16 = state_bytes(make(BF16))
    print(f"{label}: float32 {f32 / MB:.2f} MiB, bf16 {bf16 / MB:.2f} MiB (parameters + buffers)")
    if not args.skip_table:
        print(f"{'scheme':42s} {'state MiB':>10s} {'vs fp32':>8s} {'vs bf16':>8s} {'runtime MiB':>12s} "
              f"{'runtime/state':>14s}")
        for name, dtype, cand in SCHEMES:
            model = planned(make, dtype, cand)
            sb = state_bytes(model)
            rb = runtime_bytes(model)
            print(f"{name:42s} {sb / MB:10.2f} {sb / f32:8.3f} {sb / bf16:8.3f} {rb / MB:12.2f} {rb / sb:14.3f}")
            del model
    if args.skip_tune:
        return 0
    rs = tune_runs(args.llama, args.runs)
    budget = largest_op_budget(make(F32), 16)
    over = sorted(r["peak_over_start_mb"] for r in rs)
    med = statistics.median(over)
    r = rs[0]
    cands = budget["candidates_mb"]
    print(f"\ntuning the float32 model (autoquant, real CPU timer, cache=None), {len(rs)} runs in fresh processes: "
          f"{statistics.median(x['tune_s'] for x in rs):.1f} s each (median)")
    print(f"  model {r['model_mb']:.2f} MiB; RSS before tuning {r['rss_before_mb']:.1f} MiB (model included); "
          f"after finalize {statistics.median(x['after_mb'] for x in rs):.1f} MiB; finalized state "
          f"{r['final_state_mb']:.2f} MiB")
    print(f"  peak RSS over the start: median +{med:.1f} MiB (runs: {', '.join(f'{v:.1f}' for v in over)}) "
          f"= {med / r['model_mb']:.2f}x the model")
    print(f"  largest op {budget['op']}: its candidates side by side {cands:.1f} MiB; cold copies "
          f"{budget['copies_mb']:.1f} MiB ({budget['copies_per_candidate']} per candidate)")
    print(f"  target: peak <= model + largest op's candidates = {r['model_mb']:.1f} + {cands:.1f} MiB; measured "
          f"model + {med:.1f} MiB (median): {med / cands:.2f}x the candidates "
          f"({'met' if med <= cands else 'not met'})")
    if budget["copies_mb"]:
        held = cands + budget["copies_mb"]
        print(f"  with the cold CPU timer's weight copies (ops whose candidates are smaller than the last-level "
              f"cache get copies up to it): {held:.1f} MiB; peak / that = {med / held:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
