"""Packaging: the distribution installs `autoquant`, `autoquant.kernels` and `autoquant.cache_db`,
and adds NO top-level `kernels` or `cache_db` module (PyPI has a `kernels` package that
transformers imports when it finds one)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_no_top_level_kernels_or_cache_db(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = list(tmp_path.glob("autoquant_tuner-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "cache_db" not in tops, tops
    assert "autoquant/kernels/__init__.py" in names
    assert "autoquant/cache_db/__init__.py" in names
    assert "autoquant/candidates/__init__.py" in names
    assert "autoquant/candidates/_cpu_ops.cpp" in names  # built on first use: must ship as source
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["autoquant"]


def test_installed_package_imports_from_elsewhere(tmp_path):
    """The editable install `make test` made: importable from any directory, no stray modules."""
    code = (
        "import importlib.util, autoquant, autoquant.kernels, autoquant.cache_db\n"
        "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')\n"
        "assert importlib.util.find_spec('cache_db') is None\n"
        "print(autoquant.__version__, autoquant.kernels.__name__, autoquant.cache_db.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["0.3.0", "autoquant.kernels", "autoquant.cache_db"]


def test_import_has_no_side_effects(tmp_path):
    """Importing autoquant sets no inductor flag, creates no CUDA context, touches no cache file."""
    code = (
        "import torch, torch._inductor.config as ic\n"
        "before = ic.get_config_copy()\n"
        "import autoquant, autoquant.cache_db, autoquant.kernels\n"
        "assert ic.get_config_copy() == before\n"
        "assert not torch.cuda.is_initialized()\n"
        "import os; assert not os.listdir('.'), os.listdir('.')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True,
                   timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_describing_the_environment_does_not_import_triton(tmp_path):
    """The cache key records Triton's version from package metadata: importing Triton would cost
    every tuning process ~6 MiB and a second of startup, CPU-only ones included."""
    code = (
        "import importlib.metadata as md, sys, torch\n"
        "from autoquant.hardware import environment\n"
        "env = environment(torch.device('cpu'))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
        "try:\n"
        "    want = md.version('triton')\n"
        "except md.PackageNotFoundError:\n"
        "    want = ''\n"
        "assert env.triton == want, (env.triton, want)\n"
        "print(env.triton)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
