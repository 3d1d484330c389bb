"""Device + software fingerprint: what changes timings, and so what a cache row is valid for.

Queried only when asked (never at import). On CUDA: pynvml for the SKU name, memory and driver,
torch.cuda for capability, SM count and CUDA runtime. On CPU: model name, the ISA flags that decide
which kernels are fast (avx2, avx512*, amx, vnni), and the thread count torch will use.

>>> env = environment(torch.device("cpu"))
>>> env.device_kind
'cpu'
>>> len(env.hash)
16
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, fields

import torch

__all__ = ["Environment", "environment", "software_versions", "AUTOQUANT_VERSION"]

AUTOQUANT_VERSION = "0.2.2"

# CPU flags that decide which CPU kernels exist or are fast (fbgemm/oneDNN int8 paths, bf16 units).
_CPU_FLAGS_OF_INTEREST = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16",
)


@dataclass(frozen=True)
class Environment:
    """Everything a timing depends on besides the op itself. Two runs agree on every field or
    share no cache row. `extra` holds canonical JSON of further facts that are shown, not keyed."""

    device_kind: str  # "cpu" | "cuda"
    sku: str  # "NVIDIA H100 80GB HBM3" or the CPU model name
    capability: str  # "9.0" on CUDA; sorted ISA flags joined by "," on CPU
    units: int  # SM count on CUDA; torch thread count on CPU
    memory_mb: int
    driver: str  # NVIDIA driver version; "" on CPU
    cuda: str  # CUDA runtime torch was built with; "" on CPU builds
    torch: str
    triton: str
    autoquant: str

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit digest of every field: the `env_hash` of BenchKey."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Environment":
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"environment record lacks fields {sorted(missing)}")
        return cls(**{n: data[n] for n in names})

    def short(self) -> str:
        return f"{self.device_kind}:{self.sku} ({self.capability if self.device_kind == 'cuda' else f'{self.units} threads'})"


@functools.lru_cache(maxsize=1)
def software_versions() -> tuple[str, str, str]:
    """(torch, triton, autoquant) versions; triton is "" where it is not installed. Triton's comes
    from its distribution's metadata: importing it would cost ~6 MiB of memory (and time) in every
    process that tunes, CPU-only ones included."""
    import importlib.metadata as metadata  # noqa: PLC0415 - only when an environment is described

    triton_version = ""
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            triton_version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return str(torch.__version__), triton_version, AUTOQUANT_VERSION


@functools.lru_cache(maxsize=1)
def _cpu_model_and_flags() -> tuple[str, tuple[str, ...], int]:
    model, flags, mem_mb = platform.processor() or platform.machine(), set(), 0
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            mem_mb = int(fh.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return model or "unknown-cpu", tuple(sorted(f for f in flags if f in _CPU_FLAGS_OF_INTEREST)), mem_mb


def _nvml_facts(index: int) -> tuple[str, int, str]:
    """(name, memory MB, driver) through pynvml; torch.cuda facts where NVML is unavailable."""
    try:
        import pynvml  # noqa: PLC0415 - only needed on GPU machines

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1 << 20)
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
            return name, mem, driver
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing or failing (containers without it): fall back to torch
        props = torch.cuda.get_device_properties(index)
        return props.name, int(props.total_memory) // (1 << 20), ""


def environment(device: torch.device | str) -> Environment:
    """Fingerprint of `device` and the software in this process."""
    device = torch.device(device)
    torch_v, triton_v, aq_v = software_versions()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name, mem, driver = _nvml_facts(index)
        return Environment(
            device_kind="cuda", sku=name, capability=f"{props.major}.{props.minor}",
            units=int(props.multi_processor_count), memory_mb=mem, driver=driver,
            cuda=str(torch.version.cuda or ""), torch=torch_v, triton=triton_v, autoquant=aq_v,
        )
    if device.type != "cpu":
        raise ValueError(f"autoquant tunes on 'cpu' or 'cuda' devices, not {device.type!r}")
    model, flags, mem = _cpu_model_and_flags()
    threads = torch.get_num_threads()
    return Environment(
        device_kind="cpu", sku=model, capability=",".join(flags), units=threads, memory_mb=mem,
        driver="", cuda="", torch=torch_v, triton=triton_v, autoquant=aq_v,
    )
