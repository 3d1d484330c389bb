"""The prepared GPU run keeps working without a GPU: its scripts parse, and the smoke test and the
environment report run on a CPU (--dry-run). The whole script's dry run (every step, ~3 minutes)
runs in CI as ``bash scripts/gpu_check.sh --dry-run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # From a scratch folder, as gpu_check.sh runs them: the installed autoquant is imported.
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    proc = subprocess.run([bash, "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_help_names_the_result_files():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--help"], capture_output=True,
                          text=True, check=False, timeout=30)
    assert proc.returncode == 0
    for name in ("env.json", "smoke.jsonl", "roundtrip.json", "pytest_cuda.xml", "bench_triton.json",
                 "bench_e2e.json", "log.txt", "summary.txt"):
        assert name in proc.stdout


def test_smoke_dry_run_covers_every_shape_and_m(tmp_path):
    proc = _python([str(ROOT / "benchmarks" / "gpu_smoke.py"), "--dry-run", "--no-library", "--out",
                    str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    header, cases = rows[0], [r for r in rows[1:] if "candidate" in r]
    assert not [r for r in rows if "stopped" in r]
    assert {r["shape"] for r in cases} == {"qo", "kv", "gate_up", "down"}
    assert {r["m"] for r in cases} == {1, 17}
    assert {r["candidate"] for r in cases} == set(header["candidates"])
    ran = [r for r in cases if r["supports"] is None]
    assert ran and not [r for r in ran if r.get("error")], [r for r in ran if r.get("error")][:3]
    # Every case that ran was checked against its reference and against float, and timed.
    for r in ran:
        assert r["sqnr_ref_db"] is not None and r["sqnr_float_db"] is not None and r["eager_us"] > 0, r
    assert "rows, 0 with errors" in proc.stdout


def test_env_report_has_the_fingerprint(tmp_path):
    out = tmp_path / "env.json"
    proc = _python([str(ROOT / "benchmarks" / "gpu_env.py"), "--device", "cpu", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.read_text())
    assert len(info["fingerprint"]["hash"]) == 16
    assert info["autoquant"]["kernels_file"].endswith("__init__.py")


def test_gpu_check_rerun_runs_only_the_named_steps_and_tests(tmp_path):
    """The rerun mode (--only, --tests): two listed CUDA node ids are collected, nothing else runs."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    ids = ["tests/candidates/test_definitions.py::test_floors_reject_a_three_percent_gain",  # not CUDA
           "tests/core/test_hardware.py"]
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(ids) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([bash, str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--only", "pytest_cuda",
                           "--tests", str(listed), "--budget", "200", str(out)],
                          capture_output=True, text=True, timeout=400, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "pytest_cuda: 2 node ids from" in log
    for name in ("env", "smoke", "roundtrip", "bench_triton", "overhead", "bench_e2e"):
        assert f"=== {name}: not run (--only pytest_cuda)" in log
    # Only the CUDA-marked tests of the listed ones: none of the first, the CUDA ones of the file.
    collected = [line for line in log.splitlines() if line.startswith("tests/") and "::" in line]
    assert collected and all(line.startswith("tests/core/test_hardware.py::") for line in collected), collected
    summary = (out / "summary.txt").read_text()
    assert "pytest_cuda rc=0" in summary and "smoke rc=" not in summary


def test_gpu_report_renders_the_first_h200_run(tmp_path):
    folder = ROOT / "benchmarks" / "results" / "gpu" / "h200-2026-11-30"
    out = tmp_path / "report.md"
    proc = _python([str(ROOT / "benchmarks" / "gpu_report.py"), str(folder), "--out", str(out)], tmp_path, 60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for shape in ("qo K=4096 N=4096", "kv K=4096 N=1024", "gate_up K=4096 N=14336", "down K=14336 N=4096"):
        for m in (1, 17, 128):
            assert f"### {shape}, M={m}" in text
    # The bf16 baseline's own ratio is 1.00, and the first run's int8 weight-only M=1 row is there.
    assert "| float(kernel=aten, compute_dtype=None) | 17.8 | 1.00 | 42.7 | 2.40 |" in text
    assert "| int8_wo | 1 | 4096 | 4096 | 18.8 |" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _python([str(ROOT / "benchmarks" / "gpu_report.py"), str(empty)], tmp_path, 60)
    assert proc.returncode != 0 and "no smoke.jsonl" in proc.stderr
