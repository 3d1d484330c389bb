"""Device + software fingerprint: what changes timings, and so what a cache row is valid for.

Queried only when asked (never at import). On CUDA: torch.cuda for the SKU name, capability, SM
count, memory and CUDA runtime, libcuda for the driver API version: sources that answer the same in
every process that can run CUDA, so one GPU always gets one key (``nvml_facts`` adds NVML's details
for people, matched by UUID, never keyed). On CPU: model name, the ISA flags that decide
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
import logging
import platform
from dataclasses import asdict, dataclass, fields

import torch

__all__ = ["AUTOQUANT_VERSION", "CudaFacts", "Environment", "NvmlDevice", "environment", "nvml_facts",
           "software_versions"]

log = logging.getLogger("autoquant")

AUTOQUANT_VERSION = "0.3.0"

# CPU flags that decide which CPU kernels exist or are fast (fbgemm/oneDNN int8 paths, bf16 units).
_CPU_FLAGS_OF_INTEREST = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16",
)


@dataclass(frozen=True)
class Environment:
    """Everything a timing depends on besides the op itself. Two runs agree on every field or
    share no cache row."""

    device_kind: str  # "cpu" | "cuda"
    sku: str  # "NVIDIA H100 80GB HBM3" or the CPU model name
    capability: str  # "9.0" on CUDA; sorted ISA flags joined by "," on CPU
    units: int  # SM count on CUDA; torch thread count on CPU
    memory_mb: int
    driver: str  # CUDA driver API version ("13.0", libcuda); "" on CPU
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


# ---- CUDA facts. Three seams, each a small function that tests replace: torch's view of a device,
# the CUDA driver's version, and NVML's list of devices. What keys the cache comes from the first
# two only (always there when CUDA works); NVML adds facts for people (exact driver build, the MIG
# profile's name), matched to torch's device by UUID.


@dataclass(frozen=True)
class CudaFacts:
    """torch's view of one CUDA device (``torch.cuda.get_device_properties``)."""

    name: str
    uuid: str  # canonical form, see _canonical_uuid
    capability: str  # "9.0"
    sms: int
    memory_mb: int


@dataclass(frozen=True)
class NvmlDevice:
    """One device as NVML lists it: a whole GPU, or a MIG instance of one (``mig=True``)."""

    uuid: str  # canonical form
    name: str
    memory_mb: int
    driver: str  # NVIDIA driver build, e.g. "580.159.03"
    mig: bool


def _canonical_uuid(uuid: object) -> str:
    """Lower-case hex with dashes and no "GPU-" / "MIG-" prefix: torch prints a device UUID bare,
    NVML with a prefix, so both compare equal once canonical."""
    text = str(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _torch_cuda_facts(index: int) -> CudaFacts:
    """Seam: torch's properties of CUDA device `index` (as this process numbers them)."""
    props = torch.cuda.get_device_properties(index)
    return CudaFacts(
        name=str(props.name), uuid=_canonical_uuid(getattr(props, "uuid", "")),
        capability=f"{props.major}.{props.minor}", sms=int(props.multi_processor_count),
        memory_mb=int(props.total_memory) // (1 << 20),
    )


@functools.lru_cache(maxsize=1)
def _cuda_driver_version() -> str:
    """Seam: the CUDA driver API version, e.g. "13.0", from libcuda's cuDriverGetVersion (the
    library torch itself runs on, so present wherever a CUDA device is); "" if it cannot be read.
    Read once per process."""
    import ctypes  # noqa: PLC0415 - only on CUDA machines

    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    return ""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_devices() -> list[NvmlDevice]:
    """Seam: every GPU NVML sees and every MIG instance on them, whatever CUDA_VISIBLE_DEVICES says
    (NVML ignores it; so do its indices). Raises whatever pynvml raises when NVML is missing."""
    import pynvml  # noqa: PLC0415 - only needed on GPU machines (nvidia-ml-py)

    pynvml.nvmlInit()
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        out: list[NvmlDevice] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append(_nvml_device(pynvml, handle, driver, mig=False))
            try:
                current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
            except pynvml.NVMLError:  # not a MIG-capable GPU
                current = 0
            if current != 1:
                continue
            for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                except pynvml.NVMLError:  # an unused slot
                    continue
                out.append(_nvml_device(pynvml, mig, driver, mig=True))
        return out
    finally:
        pynvml.nvmlShutdown()


def _nvml_device(pynvml: object, handle: object, driver: str, *, mig: bool) -> NvmlDevice:
    return NvmlDevice(
        uuid=_canonical_uuid(_text(pynvml.nvmlDeviceGetUUID(handle))),  # type: ignore[attr-defined]
        name=_text(pynvml.nvmlDeviceGetName(handle)),  # type: ignore[attr-defined]
        memory_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1 << 20),  # type: ignore[attr-defined]
        driver=driver, mig=mig,
    )


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def nvml_facts(device: torch.device | str) -> NvmlDevice | None:
    """NVML's record of the CUDA device `device`, found by UUID (never by index: NVML numbers every
    GPU in the machine, torch only those CUDA_VISIBLE_DEVICES shows, and a MIG instance has no NVML
    index at all). None, with the reason logged, when NVML is unavailable or lists no such UUID.
    For people (reports, the GPU check); never part of the cache key."""
    facts = _torch_cuda_facts(_cuda_index(torch.device(device)))
    try:
        devices = _nvml_devices()
    except Exception as exc:  # noqa: BLE001 - NVML missing or failing (containers): facts only lost
        log.info("NVML unavailable (%s: %s); GPU facts come from torch alone", type(exc).__name__, exc)
        return None
    for found in devices:
        if found.uuid == facts.uuid:
            return found
    log.info("NVML lists no device with UUID %s (torch's %s); GPU facts come from torch alone",
             facts.uuid, facts.name)
    return None


def environment(device: torch.device | str) -> Environment:
    """Fingerprint of `device` and the software in this process."""
    device = torch.device(device)
    torch_v, triton_v, aq_v = software_versions()
    if device.type == "cuda":
        # Only facts every process that can run CUDA reads the same way: torch's properties and
        # the driver API version. NVML (exact driver build, memory as NVML counts it) is not used
        # here: a process where it fails must produce the same key, or one SKU gets two hashes and
        # a team cache splits. A MIG instance differs in SM count and memory, so it keys apart.
        facts = _torch_cuda_facts(_cuda_index(device))
        return Environment(
            device_kind="cuda", sku=facts.name, capability=facts.capability, units=facts.sms,
            memory_mb=facts.memory_mb, driver=_cuda_driver_version(),
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
