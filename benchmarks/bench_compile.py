"""autoquant eager vs autoquant + torch.compile (both orders) vs torch's quantize_dynamic, one process.

Models: a stack of 6 x (Linear(h, h) + a Llama-style gated MLP h/f without bias, SiLU, layer_norm,
residuals; h=1024, f=2752: 24 linear calls per forward) and a tiny LlamaForCausalLM (as
bench_e2e builds it), fp32 at M in {1, 64}; and the stack in bf16 at M=1. Variants of one case:

- ``aq eager``: ``autoquant(model, x)``, called eagerly;
- ``aq -> compile``: that model, then ``torch.compile`` (inductor, default settings);
- ``compile -> aq``: ``autoquant(torch.compile(model), x)`` (the torchao tutorial's order), given
  the measurements of the first tuning (one in-memory cache), so both orders run the same plan;
- ``quantize_dynamic``: ``torch.ao.quantization.quantize_dynamic`` int8, eager (fp32 models only:
  its fbgemm kernel takes float32 activations).

``aq -> compile`` calls the registered CPU ops' C++ kernels (autoquant/candidates/_cpu_ops.cpp,
built by the first trace). One variant shows what they save:

- ``python op bodies``: the same model compiled against copies of those ops that have only the
  Python bodies (the kernels a machine without a C++ compiler runs; AUTOQUANT_NATIVE_OPS=0).

Two more variants say what bounds ``aq -> compile`` (torch's costs, not autoquant's; they are the
same compiled model with one inductor / dynamo setting changed, not advice to copy blindly):

- ``+ serial kernels``: ``options={"cpp.min_chunk_size": 2**20}``: inductor's fused C++ kernels run
  on one thread. By default a kernel over a row of >= 2 x 512 elements (one layer_norm of h=1024
  at M=1) opens OpenMP parallel regions, and waking the other thread costs microseconds per
  region, more than the work; eager ATen keeps such sizes serial (grain 32768).
- ``+ serial, no module guards``: that plus ``guard_filter_fn=skip_guard_on_all_nn_modules_unsafe``:
  dynamo stops checking every module attribute and buffer on each call (unsafe: a changed module
  is not noticed), which leaves the guard cost on the input alone. What is left between this
  and ``aq eager`` is the compiled region's entry, the registered ops' calls through the
  dispatcher, and whatever else the graph does around the kernels.

With ``--kernel NAME`` (a candidate's name as ``default_candidates`` lists it, e.g.
``"int8_dynamic(kernel=fbgemm)"``) nothing is tuned: a plan gives every linear layer that kernel
(``apply_plan``), so the variants compare one known plan however loaded the machine is while
tuning; ``compile -> aq`` is then left out (it is the same plan, compiled).

Every variant is timed in paired rounds: each round runs a block of calls of every variant, in an
order rotated per round, under ``torch.no_grad()`` with gc paused and a fixed thread count; each
ratio is the median of the per-round ratios to ``aq eager`` (p25-p75 shown), so drift and a
neighbour's bursts hit every variant of a round alike. Also prints the load average.

    python benchmarks/bench_compile.py                   # full (minutes: inductor compiles)
    python benchmarks/bench_compile.py --tiny            # small sizes, a smoke run
    python benchmarks/bench_compile.py --only stack --rounds 41
    python benchmarks/bench_compile.py --only stack --kernel "int8_dynamic(kernel=fbgemm)"
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoquant import autoquant
from autoquant.bench import fixed_threads, quantiles
from autoquant.candidates import default_candidates
from autoquant.plan import PLAN_FORMAT, PLAN_VERSION, apply_plan
from autoquant.store import MemoryStore


class GatedBlock(nn.Module):
    """x + Linear(LN(x)); then x + down(silu(gate(LN(x))) * up(LN(x))), as a Llama MLP."""

    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.h = h
        self.fc = nn.Linear(h, h)
        self.gate = nn.Linear(h, f, bias=False)
        self.up = nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.fc(F.layer_norm(x, (self.h,)))
        y = F.layer_norm(x, (self.h,))
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def stack(h: int, f: int, blocks: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[GatedBlock(h, f) for _ in range(blocks)]).eval().to(dtype)


def tiny_llama(hidden: int, layers: int) -> nn.Module:
    import transformers  # noqa: PLC0415 - only for this model

    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()


class _Logits(nn.Module):
    """LlamaForCausalLM called as f(ids) -> logits, without a KV cache (one input, one output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids, use_cache=False).logits


def fixed_plan(model: nn.Module, kernel: str, dtype: torch.dtype) -> nn.Module:
    """`model` with every nn.Linear finalized as the candidate named `kernel` (no tuning)."""
    by_name = {c.name: c for c in default_candidates(torch.device("cpu"), dtype)}
    if kernel not in by_name:
        raise SystemExit(f"--kernel {kernel!r} is not a CPU candidate for {dtype}; one of: {sorted(by_name)}")
    c = by_name[kernel]
    layers = {name: {"kind": "candidate", "family": c.family, "params": c.params()}
              for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    return apply_plan(model, {"format": PLAN_FORMAT, "version": PLAN_VERSION, "environment": None, "layers": layers})


# ---- "python op bodies": the CPU ops again, without their C++ kernels ------------------------------
_PY_LIB: torch.library.Library | None = None
_PY_OPS: dict[str, Any] = {}  # _cpu_ops global name -> the Python-bodied copy of that op


def _python_bodied_ops() -> dict[str, Any]:
    """Copies of autoquant's registered CPU ops (same schemas, bodies and fake impls) in a bench-only
    namespace, with no C++ kernel, keyed by the ``_cpu_ops`` global a traced layer calls."""
    global _PY_LIB
    if _PY_LIB is None:
        from autoquant.candidates import _cpu_ops as ops  # noqa: PLC0415

        _PY_LIB = torch.library.Library("aqbench_py", "DEF")
        for name, (schema, body) in ops._SCHEMAS.items():
            _PY_LIB.define(name + schema)
            _PY_LIB.impl(name, body, "CPU")
            real = getattr(torch.ops.autoquant, name).default
            fake = torch._library.simple_registry.singleton.find(real.name()).fake_impl.kernel
            torch.library.register_fake(f"aqbench_py::{name}", fake, lib=_PY_LIB)
            [glob] = [g for g, v in vars(ops).items() if v is real]  # e.g. _fbgemm_int8_op
            _PY_OPS[glob] = getattr(torch.ops.aqbench_py, name).default
    return _PY_OPS


def _with_python_bodies(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` called with ``_cpu_ops``'s op globals pointing at the Python-bodied copies (dynamo
    guards on those globals: a model traced with them must also be called with them)."""
    from autoquant.candidates import _cpu_ops as ops  # noqa: PLC0415

    swap = _python_bodied_ops()
    real = {name: getattr(ops, name) for name in swap}

    def run(*args: Any) -> Any:
        for name, op in swap.items():
            setattr(ops, name, op)
        try:
            return fn(*args)
        finally:
            for name, op in real.items():
                setattr(ops, name, op)

    return run


def variants(model: nn.Module, x: Tensor, fp32: bool, kernel: str | None = None) -> dict[str, Callable[[], Any]]:
    store = MemoryStore()
    with torch.no_grad():
        if kernel is None:
            eager = autoquant(copy.deepcopy(model), x, cache=store, progress=False)
        else:
            eager = fixed_plan(copy.deepcopy(model), kernel, x.dtype if x.is_floating_point() else torch.float32)
        then_compile = torch.compile(copy.deepcopy(eager))
        py_compile = _with_python_bodies(torch.compile(copy.deepcopy(eager)))
        serial = {"cpp.min_chunk_size": 1 << 20}
        serial_compile = torch.compile(copy.deepcopy(eager), options=serial)
        bare_compile = torch.compile(copy.deepcopy(eager), options={
            **serial, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    out: dict[str, Callable[[], Any]] = {
        "aq eager": lambda: eager(x),
        "aq -> compile": lambda: then_compile(x),
    }
    if kernel is None:
        with torch.no_grad():
            compile_first = autoquant(torch.compile(copy.deepcopy(model)), x, cache=store, progress=False)
        out["compile -> aq"] = lambda: compile_first(x)
    if fp32:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            qd = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        out["quantize_dynamic"] = lambda: qd(x)
    out["python op bodies"] = lambda: py_compile(x)
    out["+ serial kernels"] = lambda: serial_compile(x)  # aq -> compile, one setting changed (see top)
    out["+ serial, no module guards"] = lambda: bare_compile(x)
    return out


def _block(fn: Callable[[], Any], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def paired_rounds(fns: dict[str, Callable[[], Any]], rounds: int, block_s: float) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample per round; the order rotates each round."""
    names = list(fns)
    with torch.no_grad():
        for fn in fns.values():  # warm-up: compilation and first-call work happen here
            for _ in range(3):
                fn()
        slowest = max(_block(fn, 3) for fn in fns.values())
        reps = max(1, int(block_s / max(slowest, 1e-9)))
        samples: dict[str, list[float]] = {n: [] for n in names}
        import gc  # noqa: PLC0415

        gc.collect()
        gc.disable()
        try:
            # A variant that recompiled while timed would time dynamo: fail instead.
            with torch.compiler.set_stance("fail_on_recompile"):
                for r in range(rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for n in order:
                        samples[n].append(_block(fns[n], reps))
        finally:
            gc.enable()
    return samples


def report(label: str, samples: dict[str, list[float]]) -> None:
    base = samples["aq eager"]
    print(f"\n{label}  (load average {os.getloadavg()[0]:.2f})")
    print(f"  {'variant':26s} {'median ms':>10s} {'x aq eager (p25-p75)':>24s}")
    for name, s in samples.items():
        ratios = [a / b for a, b in zip(s, base)]
        lo, mid, hi = quantiles(ratios)
        print(f"  {name:26s} {statistics.median(s) * 1e3:10.3f} {mid:10.3f} ({lo:.3f}-{hi:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small models and few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("stack", "llama", "bf16"), default=None)
    parser.add_argument("--kernel", default=None,
                        help='no tuning: every linear layer runs this candidate, e.g. "int8_dynamic(kernel=fbgemm)"')
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.tiny else 31)
    block_s = 0.02 if args.tiny else 0.2
    h, f, blocks = (128, 352, 2) if args.tiny else (1024, 2752, 6)
    llama_h, llama_layers = (128, 1) if args.tiny else (512, 4)
    plan_note = f", every linear layer {args.kernel} (no tuning)" if args.kernel else ""
    print(f"torch {torch.__version__}, {args.threads} threads, {rounds} paired rounds{plan_note}")
    with fixed_threads(args.threads):
        cases: list[tuple[str, Callable[[], nn.Module], Callable[[int], Tensor], list[int], bool]] = [
            ("stack fp32", lambda: stack(h, f, blocks, torch.float32), lambda m: torch.randn(m, h), [1, 64], True),
            ("tiny llama fp32", lambda: _Logits(tiny_llama(llama_h, llama_layers)),
             lambda m: torch.randint(0, 4096, (1, m)), [1, 64], True),
            ("stack bf16", lambda: stack(h, f, blocks, torch.bfloat16),
             lambda m: torch.randn(m, h, dtype=torch.bfloat16), [1], False),
        ]
        for label, make, make_x, ms, fp32 in cases:
            if args.only and not label.startswith({"stack": "stack fp32", "llama": "tiny", "bf16": "stack bf16"}[args.only]):
                continue
            for m in ms:
                torch._dynamo.reset()
                fns = variants(make(), make_x(m), fp32, args.kernel)
                report(f"{label}, M={m}", paired_rounds(fns, rounds, block_s))


if __name__ == "__main__":
    main()
