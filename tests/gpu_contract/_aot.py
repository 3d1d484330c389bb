"""Ahead-of-time compilation of the autoquant Triton kernels for a CUDA target, with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's whole NVIDIA
pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas from the triton wheel) on the CPU. What it cannot do
without a GPU is the launch: Triton's shared-memory check and the register / spill counts it reads
when loading the cubin. This module builds each kernel's signature the way a real launch would
specialize it, compiles it, and reads the resources from the result (shared memory from Triton's
metadata, registers and local memory from ``cuobjdump --dump-resource-usage`` on the cubin).

Signatures follow the launches in ``autoquant/kernels/*.py`` on row-major tensors of the Llama-3-8B
shapes: pointers 16-byte aligned, K, N and row strides multiples of 16 (``tt.divisibility``), unit
strides specialized to the constant 1 as the JIT does. A kernel's argument list is read from the
kernel itself; an argument this table does not know fails with a message naming it.

The compilations run in a child process (``compile_in_child``, this file run as a script): Triton
sets up its language library once per process, at the first ``import triton``, for the interpreter
when TRITON_INTERPRET=1 is set at that moment (as the CPU suite's conftest sets it) and for the
compiler otherwise, so a pytest process set up for the interpreter cannot compile for a GPU. The
child's environment has TRITON_INTERPRET removed; it compiles every requested (variant, arch) in
turn and writes one JSON line per compilation (resources, or the error text).

Nothing runs at import: Triton and the kernel modules are imported by the functions. The kernel
modules are loaded as a private copy (package ``_autoquant_aot_kernels``, decorated with the
interpreter off): importing ``autoquant.kernels._*_kernel`` itself would decorate the shared kernels
as compiled for the rest of the process, and the CPU tests that run them through the Triton
interpreter (TRITON_INTERPRET=1, set by tests/kernel_ops/conftest.py) would then fail.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Dynamic shared memory one block may use after opting in (cudaDevAttrMaxSharedMemoryPerBlockOptin,
# which Triton's launcher compares with the kernel's metadata.shared), in bytes: A100 (sm_80)
# 163 KiB, H100 / H200 (sm_90) 227 KiB.
SMEM_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
# Activation dtypes as Triton pointer element types.
TRITON_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# M buckets the launch wrappers produce (kernels._registry.m_bucket): 16, 32, ..., 1024.
M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class KernelSpec:
    """How one Triton kernel is launched: where it lives, the types of its pointer arguments per
    activation dtype, which integer arguments are unit strides (specialized to 1) or multiples of
    16, and the constexpr values the launch wrapper passes."""

    name: str
    module: str  # kernels/<module>.py
    attr: str  # the module attribute holding the (autotuned) kernel
    dtypes: tuple[str, ...]  # the dtype axis: activation (or output) dtype names
    pointers: tuple[tuple[str, str], ...]  # (arg, type); "{x}" is replaced by the dtype's type
    unit: frozenset[str]  # integer args that are 1 at every real launch
    div16: frozenset[str]  # integer args that are multiples of 16 at every real launch
    constexprs: tuple[tuple[str, Any], ...]  # fixed constexpr values (not config-dependent)
    dtype_constexprs: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per dtype name
    group_sizes: tuple[int, ...] = ()  # int4: the GROUP_SIZE axis
    min_arch: int = 80
    fixed_config: tuple[tuple[str, Any], ...] = ()  # for kernels without autotuning
    fixed_warps: int = 4
    ints: frozenset[str] = frozenset()  # other integer args, with no divisibility known

    def pointer_types(self, dtype: str) -> dict[str, str]:
        x = TRITON_DTYPES[dtype]
        return {arg: t.replace("{x}", x) for arg, t in self.pointers}

    def constexpr_values(self, dtype: str) -> dict[str, Any]:
        out = dict(self.constexprs)
        out.update(dict(dict(self.dtype_constexprs).get(dtype, ())))
        return out


_FLOAT_DTYPES = ("bfloat16", "float16", "float32")
_DOT_PRECISION = (("float32", (("DOT_PRECISION", "ieee"),)),
                  ("bfloat16", (("DOT_PRECISION", "tf32"),)),
                  ("float16", (("DOT_PRECISION", "tf32"),)))

SPECS = (
    KernelSpec(
        name="int8_wo_mm", module="_int8_wo_kernel", attr="KERNEL", dtypes=_FLOAT_DTYPES,
        pointers=(("x_ptr", "*{x}"), ("w_ptr", "*i8"), ("s_ptr", "*fp32"), ("b_ptr", "*fp32"),
                  ("o_ptr", "*{x}")),
        unit=frozenset({"stride_xk", "stride_wk", "stride_on"}),
        div16=frozenset({"N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_om"}),
        constexprs=(("HAS_BIAS", False), ("UPCAST_DOT", False)), dtype_constexprs=_DOT_PRECISION,
    ),
    KernelSpec(
        name="int4_wo_mm", module="_int4_wo_kernel", attr="KERNEL", dtypes=_FLOAT_DTYPES,
        pointers=(("x_ptr", "*{x}"), ("w_ptr", "*u8"), ("s_ptr", "*fp32"), ("z_ptr", "*fp32"),
                  ("b_ptr", "*fp32"), ("o_ptr", "*{x}")),
        unit=frozenset({"stride_xk", "stride_wj", "stride_sn", "stride_zn", "stride_on"}),
        div16=frozenset({"N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_sg", "stride_zg",
                         "stride_om"}),
        constexprs=(("HAS_BIAS", False), ("UPCAST_DOT", False)), dtype_constexprs=_DOT_PRECISION,
        group_sizes=(32, 64, 128),
    ),
    KernelSpec(
        # Decode GEMV (kernels/_gemv.py); o_ptr is the output (one K split) or a float32 workspace.
        name="int4_wo_gemv", module="_int4_wo_kernel", attr="GEMV_KERNEL", dtypes=_FLOAT_DTYPES,
        pointers=(("x_ptr", "*{x}"), ("w_ptr", "*u8"), ("s_ptr", "*fp32"), ("z_ptr", "*fp32"),
                  ("b_ptr", "*fp32"), ("o_ptr", "*{x}")),
        unit=frozenset({"stride_xk", "stride_wj", "stride_sn", "stride_zn", "stride_on"}),
        div16=frozenset({"N", "K", "stride_xm", "stride_wn", "stride_sg", "stride_zg", "stride_om"}),
        ints=frozenset({"GROUPS_PER_SPLIT", "stride_os"}),
        constexprs=(("HAS_BIAS", False),),
        group_sizes=(32, 64, 128),
    ),
    KernelSpec(
        # The dtype axis is the output dtype (operands are int8 whatever the model's dtype).
        name="int8_dyn_mm", module="_int8_dyn_kernel", attr="KERNEL", dtypes=_FLOAT_DTYPES,
        pointers=(("x_ptr", "*i8"), ("xs_ptr", "*fp32"), ("w_ptr", "*i8"), ("ws_ptr", "*fp32"),
                  ("b_ptr", "*fp32"), ("o_ptr", "*{x}")),
        unit=frozenset({"stride_xk", "stride_wk", "stride_on"}),
        div16=frozenset({"N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_om"}),
        constexprs=(("HAS_BIAS", False),),
    ),
    KernelSpec(
        name="quantize_per_token_int8", module="_int8_dyn_kernel", attr="QUANTIZE_KERNEL",
        dtypes=_FLOAT_DTYPES,
        pointers=(("x_ptr", "*{x}"), ("q_ptr", "*i8"), ("s_ptr", "*fp32")),
        unit=frozenset({"stride_xk", "stride_qk"}),
        div16=frozenset({"K", "stride_xm", "stride_qm"}),
        constexprs=(("EPS", 1e-12),),
        # int8_dynamic._launch_quantize: BLOCK_K = min(next_power_of_2(K), 1024), 4 warps.
        fixed_config=(("BLOCK_K", 1024),),
    ),
    KernelSpec(
        # fp8 tensor cores: sm_89+, so sm_90 only among the targets here.
        name="fp8_rowwise_mm", module="_fp8_kernel", attr="KERNEL", dtypes=_FLOAT_DTYPES,
        pointers=(("x_ptr", "*fp8e4nv"), ("xs_ptr", "*fp32"), ("w_ptr", "*fp8e4nv"),
                  ("ws_ptr", "*fp32"), ("b_ptr", "*fp32"), ("o_ptr", "*{x}")),
        unit=frozenset({"stride_xk", "stride_wk", "stride_on"}),
        div16=frozenset({"N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_om"}),
        constexprs=(("HAS_BIAS", False),),
        min_arch=89,
    ),
)


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel spec at a dtype, group size (int4) and launch config."""

    spec: KernelSpec
    dtype: str
    config: tuple[tuple[str, Any], ...]  # BLOCK_* and friends
    num_warps: int
    num_stages: int
    group_size: int | None = None
    origins: tuple[str, ...] = field(default=(), compare=False)  # "eager" (pruned) / "autotune" (raw)

    @property
    def id(self) -> str:
        cfg = "-".join(f"{k[:7]}{v}" for k, v in self.config)
        g = f"-G{self.group_size}" if self.group_size else ""
        return f"{self.spec.name}-{self.dtype}{g}-{cfg}-w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class Compiled:
    """What one compilation produced, per target architecture."""

    variant: Variant
    arch: int
    shared_bytes: int  # dynamic shared memory per block (Triton's metadata: what its launch checks)
    static_shared_bytes: int | None  # static shared memory in the cubin (sm_90: 1 KiB reserved)
    registers: int | None  # per thread, from cuobjdump (None where it could not be read)
    local_bytes: int | None  # local memory per thread: register spills (and stack arrays)
    compile_s: float


# ---------------------------------------------------------------------------------- enumeration
PRIVATE_PACKAGE = "_autoquant_aot_kernels"


def kernels_dir() -> str:
    """The folder of autoquant.kernels (found without importing it)."""
    spec = importlib.util.find_spec("autoquant.kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("autoquant.kernels is not installed (pip install -e .)")
    return list(spec.submodule_search_locations)[0]


def kernel_module(name: str) -> types.ModuleType:
    """A private copy of ``kernels/<name>.py``, decorated with the Triton interpreter off (see the
    module docstring); loaded once per process."""
    full = f"{PRIVATE_PACKAGE}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if PRIVATE_PACKAGE not in sys.modules:
        package = types.ModuleType(PRIVATE_PACKAGE)
        package.__path__ = [kernels_dir()]  # relative imports (._triton_common) resolve in the copy
        sys.modules[PRIVATE_PACKAGE] = package
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return importlib.import_module(full)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def load_kernel(spec: KernelSpec) -> Any:
    """The kernel object (autotuner or JITFunction) of `spec`, from the private copy."""
    return getattr(kernel_module(spec.module), spec.attr)


def jit_function(kernel: Any) -> Any:
    """The innermost ``triton.runtime.jit.JITFunction`` under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(kernel, JITFunction):
        kernel = getattr(kernel, "fn", None)
        seen += 1
        if kernel is None or seen > 8:
            raise TypeError("not a triton.jit kernel (no JITFunction under its wrappers)")
    return kernel


def _configs(kernel: Any, spec: KernelSpec, group: int | None) -> dict[tuple, tuple[Any, set[str]]]:
    """Launch configs by identity -> (config, origins). "autotune": every config of the list
    (what torch.compile's autotuner may run: inductor ignores the pruning hook); "eager": what the
    early_config_prune hook keeps at each M bucket (and group size) in an eager launch."""
    if spec.fixed_config:
        import triton

        cfg = triton.Config(dict(spec.fixed_config), num_warps=spec.fixed_warps, num_stages=1)
        return {_cfg_key(cfg): (cfg, {"fixed"})}
    out: dict[tuple, tuple[Any, set[str]]] = {}
    for cfg in kernel.configs:
        out.setdefault(_cfg_key(cfg), (cfg, set()))[1].add("autotune")
    prune = _early_prune(kernel)
    if prune is None:  # no pruning hook: an eager launch may run every config of the list
        for cfg_and_origins in out.values():
            cfg_and_origins[1].add("eager")
    else:
        for bucket in M_BUCKETS:
            named = {"M_BUCKET": bucket}
            if group is not None:
                named["GROUP_SIZE"] = group
            for cfg in _call_prune(prune, kernel.configs, named):
                out.setdefault(_cfg_key(cfg), (cfg, set()))[1].add("eager")
    return out


def _early_prune(kernel: Any) -> Any:
    """The autotuner's early_config_prune hook (attribute names differ across Triton versions)."""
    for name in ("early_config_prune", "_early_config_prune"):
        hook = getattr(kernel, name, None)
        if callable(hook):
            return hook
    return None


def _call_prune(prune: Any, configs: list, named: dict[str, Any]) -> list:
    params = inspect.signature(prune).parameters
    if "named_args" in params or len(params) >= 2:
        return list(prune(configs, named))
    return list(prune(configs))


def _cfg_key(cfg: Any) -> tuple:
    return (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)


def variants(spec: KernelSpec) -> Iterator[Variant]:
    """Every (dtype, group size, launch config) of `spec`, each config once with its origins."""
    kernel = load_kernel(spec)
    for group in spec.group_sizes or (None,):
        for cfg, origins in _configs(kernel, spec, group).values():
            for dtype in spec.dtypes:
                yield Variant(spec, dtype, tuple(sorted(cfg.kwargs.items())), cfg.num_warps,
                              cfg.num_stages, group, tuple(sorted(origins)))


# ---------------------------------------------------------------------------------- compilation
def signature(variant: Variant) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource`` as a real launch of
    `variant` would specialize the kernel."""
    spec = variant.spec
    fn = jit_function(load_kernel(spec))
    ptrs = spec.pointer_types(variant.dtype)
    consts = spec.constexpr_values(variant.dtype)
    consts.update(dict(variant.config))
    if variant.group_size is not None:
        consts["GROUP_SIZE"] = variant.group_size
    sig: dict[str, str] = {}
    attrs: dict[tuple[int], list] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            if name not in consts:
                default = getattr(param, "default", inspect.Parameter.empty)
                if default is inspect.Parameter.empty:
                    raise KeyError(
                        f"{spec.name}: constexpr argument {name!r} has no value in "
                        "tests/gpu_contract/_aot.py SPECS; add the value its launch wrapper passes")
                consts[name] = default
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in spec.unit:
            sig[name] = "constexpr"
            consts[name] = 1
        elif (name.startswith("stride") or name in ("M", "N", "K", "M_BUCKET") or name in spec.div16
              or name in spec.ints):
            sig[name] = "i32"
            if name in spec.div16:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{spec.name}: argument {name!r} has no type in tests/gpu_contract/_aot.py "
                           "SPECS; add it (pointer type, unit stride or integer)")
    unknown = set(consts) - {p.name for p in fn.params}
    if unknown:
        raise KeyError(f"{spec.name}: SPECS sets {sorted(unknown)}, which the kernel does not take "
                       "(renamed or removed?): update tests/gpu_contract/_aot.py")
    return sig, {k: v for k, v in consts.items() if sig.get(k) == "constexpr"}, attrs


def compile_variant(variant: Variant, arch: int) -> Compiled:
    """Compile `variant` for sm_`arch` and read its resources. Raises what Triton / ptxas raise."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(load_kernel(variant.spec))
    sig, consts, attrs = signature(variant)
    t0 = time.perf_counter()
    src = ASTSource(fn, sig, consts, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    elapsed = time.perf_counter() - t0
    regs, local, static = resource_usage(kernel.asm["cubin"])
    return Compiled(variant, arch, int(kernel.metadata.shared), static, regs, local, elapsed)


@functools.lru_cache(maxsize=1)
def cuobjdump_path() -> str | None:
    """cuobjdump shipped with the triton wheel (or on PATH); None if neither exists."""
    try:
        import triton

        knob = getattr(getattr(triton, "knobs", None), "nvidia", None)
        tool = getattr(knob, "cuobjdump", None)
        path = getattr(tool, "path", None)
        if path and os.path.exists(path):
            return str(path)
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    except Exception:  # noqa: BLE001 - a missing tool only loses the register report
        pass
    return shutil.which("cuobjdump")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int | None, int | None, int | None]:
    """(registers per thread, local bytes per thread, static shared bytes) of the cubin's kernel,
    from ``cuobjdump --dump-resource-usage``; (None, None, None) where the tool is missing."""
    tool = cuobjdump_path()
    if tool is None:
        return None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=False, timeout=60).stdout
    match = _RES.search(out)
    if match is None:
        return None, None, None
    regs, stack, shared, local = (int(g) for g in match.groups())
    return regs, max(local, stack), shared


def _tile_bytes(variant: Variant) -> int:
    """Rough shared-memory footprint of a config (pipelined operand tiles): which is the largest."""
    cfg = dict(variant.config)
    size = 4 if variant.dtype == "float32" else 2
    bm, bn, bk = cfg.get("BLOCK_M", 1), cfg.get("BLOCK_N", 1), cfg.get("BLOCK_K", 1)
    return variant.num_stages * (bm * bk + bk * bn) * size


def sampled(all_variants: list[Variant]) -> list[Variant]:
    """Per (kernel, dtype, group size): the config with the largest operand tiles (the
    shared-memory worst case) and, except for float16, the first of the list (a decode tile). The CI default: every config
    of every kernel costs ~1-7 s of ptxas each (see tests/gpu_contract/README.md)."""
    groups: dict[tuple, list[Variant]] = {}
    for v in all_variants:
        groups.setdefault((v.spec.name, v.dtype, v.group_size), []).append(v)
    out: list[Variant] = []
    for (_, dtype, _), members in groups.items():
        first, largest = members[0], max(members, key=_tile_bytes)
        # The decode tile's code differs little between the 16-bit types: bf16 stands for fp16.
        keep_first = dtype != "float16" and first != largest
        out.extend([first, largest] if keep_first else [largest])
    return out


# ------------------------------------------------------------------ compilation in a child process
def result_key(variant: Variant, arch: int) -> str:
    """The name of one compilation (the test id of test_triton_aot)."""
    return f"sm{arch}-{variant.id}"


def _request(variant: Variant, arch: int) -> dict[str, Any]:
    return {"key": result_key(variant, arch), "kernel": variant.spec.name, "dtype": variant.dtype,
            "config": [list(kv) for kv in variant.config], "num_warps": variant.num_warps,
            "num_stages": variant.num_stages, "group_size": variant.group_size, "arch": arch}


def _from_request(req: dict[str, Any]) -> tuple[Variant, int]:
    spec = {s.name: s for s in SPECS}[req["kernel"]]
    variant = Variant(spec, req["dtype"], tuple((k, v) for k, v in req["config"]), req["num_warps"],
                      req["num_stages"], req["group_size"])
    if result_key(variant, req["arch"]) != req["key"]:
        raise ValueError(f"request {req['key']!r} rebuilt as {result_key(variant, req['arch'])!r}")
    return variant, req["arch"]


@dataclass
class ChildRun:
    """What the compiling child process reported: one result per requested key."""

    results: dict[str, dict[str, Any]]
    requested: set[str]
    returncode: int
    stderr_tail: str

    def outcome(self, variant: Variant, arch: int) -> tuple[Compiled | None, str | None]:
        """(compiled, None) or (None, the error text: the compilation's, or why it has none)."""
        key = result_key(variant, arch)
        res = self.results.get(key)
        if res is None:
            why = ("was not requested from the compiling child process" if key not in self.requested
                   else f"got no result: the compiling child process exited with code {self.returncode}")
            return None, f"{key} {why}; its stderr ends with:\n{self.stderr_tail}"
        if res.get("error"):
            return None, f"compiling {variant.id} for sm_{arch} failed: {res['error']}"
        return Compiled(variant, arch, res["shared_bytes"], res["static_shared_bytes"],
                        res["registers"], res["local_bytes"], res["compile_s"]), None


def child_env() -> dict[str, str]:
    """The environment of the compiling child: this one, without the Triton interpreter."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def compile_in_child(pairs: list[tuple[Variant, int]]) -> ChildRun:
    """Compile every (variant, arch) of `pairs` in ONE child Python process (this file as a script,
    in ``child_env()``), in order; returns what it reported, however it ended."""
    requests = list({result_key(v, a): _request(v, a) for v, a in pairs}.values())
    if not requests:
        return ChildRun({}, set(), 0, "")
    with tempfile.TemporaryDirectory(prefix="autoquant-aot-") as tmp:
        req_path, out_path = os.path.join(tmp, "requests.json"), os.path.join(tmp, "results.jsonl")
        with open(req_path, "w", encoding="utf-8") as fh:
            json.dump(requests, fh)
        with open(os.path.join(tmp, "stderr.txt"), "w+", encoding="utf-8", errors="replace") as err:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), req_path, out_path],
                                  env=child_env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                  check=False)
            err.seek(0)
            tail = err.read()[-6000:]
        results: dict[str, dict[str, Any]] = {}
        if os.path.exists(out_path):
            with open(out_path, encoding="utf-8") as fh:
                for line in fh:
                    if line.endswith("\n"):  # a line cut short by a crash is no result
                        res = json.loads(line)
                        results[res["key"]] = res
    return ChildRun(results, {r["key"] for r in requests}, proc.returncode, tail)


def main(argv: list[str]) -> int:
    """Child process: ``_aot.py REQUESTS.json RESULTS.jsonl``; one JSON line per compilation."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT compilations need TRITON_INTERPRET unset (see the module docstring)")
    req_path, out_path = argv
    with open(req_path, encoding="utf-8") as fh:
        requests = json.load(fh)
    with open(out_path, "w", encoding="utf-8") as out:
        for req in requests:
            res: dict[str, Any] = {"key": req["key"], "error": None}
            try:
                variant, arch = _from_request(req)
                compiled = compile_variant(variant, arch)
                res.update(shared_bytes=compiled.shared_bytes,
                           static_shared_bytes=compiled.static_shared_bytes,
                           registers=compiled.registers, local_bytes=compiled.local_bytes,
                           compile_s=compiled.compile_s)
            except Exception as exc:  # noqa: BLE001 - reported as that variant's failure
                res["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            out.write(json.dumps(res) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
