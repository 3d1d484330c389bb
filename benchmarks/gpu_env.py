"""The machine a GPU run happened on, as JSON: versions, the device, and autoquant's fingerprint.

Written first by scripts/gpu_check.sh so every other result can be read against it: Python, torch,
triton and CUDA versions, the packages autoquant imports (and where from), the device's properties,
NVML's record of it (matched by UUID), ``autoquant.hardware.environment`` with its cache-key hash,
whether autoquant's Triton kernels import, and ``nvidia-smi``'s summary.

    python benchmarks/gpu_env.py --out env.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys

import torch

PACKAGES = ("torch", "triton", "sqlalchemy", "platformdirs", "psycopg", "pandas", "safetensors", "tqdm",
            "tabulate", "pynvml", "transformers", "pytest", "xdist", "pytest_timeout", "numpy")


def _module(name: str) -> dict:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - recorded, not raised
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"version": str(getattr(mod, "__version__", "")), "file": str(getattr(mod, "__file__", ""))}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout[-20000:]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"


def collect(device_name: str) -> dict:
    from autoquant import hardware

    out: dict = {
        "python": sys.version, "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_cuda": torch.version.cuda,
        "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH", "TRITON_CACHE_DIR",
                                               "AUTOQUANT_CACHE_URL")},
        "packages": {name: _module(name) for name in PACKAGES},
    }
    try:
        import autoquant
        from autoquant import kernels

        out["autoquant"] = {"file": autoquant.__file__, "kernels_file": kernels.__file__,
                            "has_triton": kernels.HAS_TRITON}
    except Exception as exc:  # noqa: BLE001
        out["autoquant"] = {"error": f"{type(exc).__name__}: {exc}"}
    device = torch.device(device_name)
    try:
        env = hardware.environment(device)
        out["fingerprint"] = {**env.to_dict(), "hash": env.hash}
    except Exception as exc:  # noqa: BLE001
        out["fingerprint"] = {"error": f"{type(exc).__name__}: {exc}"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["device"] = {k: str(getattr(props, k)) for k in dir(props) if not k.startswith("_")}
        facts = hardware.nvml_facts(device)
        out["nvml"] = dataclasses.asdict(facts) if facts else None
        out["nvidia_smi"] = _run(["nvidia-smi"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="env.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    info = collect(args.device)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1, default=str)
    fp = info.get("fingerprint", {})
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {info['packages']['triton'].get('version', 'missing')}")
    print(f"fingerprint {fp.get('hash', fp.get('error'))}: {fp.get('sku')} cap {fp.get('capability')} "
          f"units {fp.get('units')} driver {fp.get('driver')!r}")
    print(f"autoquant: {info['autoquant']}")
    missing = [n for n, v in info["packages"].items() if "error" in v]
    if missing:
        print(f"not importable: {', '.join(missing)}")
    return 0 if "error" not in info["autoquant"] else 1


if __name__ == "__main__":
    sys.exit(main())
