"""The `autoquant` command end to end, in subprocesses, on a small model and a real SQLite cache."""

import json
import os
import subprocess
import sys

import pytest

MODEL = "autoquant.demo:tiny_demo"


def aq(*args, env_extra=None, check=True, cwd=None):
    """Run the real command in a subprocess (its own process, as a user would)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-m", "autoquant.cli", *args], capture_output=True, text=True,
                         timeout=600, env=env, cwd=cwd)
    if check and out.returncode != 0:
        raise AssertionError(f"autoquant {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.mark.parametrize("verb", [[], ["demo"], ["profile"], ["pretune"], ["report"], ["plan"], ["plan", "show"],
                                  ["cache"], ["cache", "export"], ["cache", "import"], ["cache", "prune"],
                                  ["cache", "coverage"], ["worker"]],
                         ids=lambda v: "-".join(v) or "top")
def test_help_everywhere(verb, capsys):
    from autoquant.cli import main

    with pytest.raises(SystemExit) as done:
        main([*verb, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: autoquant")
    assert len(text.splitlines()) > 3


def test_profile_pretune_report_plan_flow(tmp_path):
    cache = str(tmp_path / "team.sqlite")
    prof = tmp_path / "prof.json"
    out = aq("profile", "--model", MODEL, "--input", "float32[4,128]", "--name", "demo-m4",
             "--out", str(prof), "--cache", cache)
    assert "wrote profile 'demo-m4' (3 ops)" in out.stdout
    data = json.loads(prof.read_text())
    assert {(o["m"], o["k"], o["n"], o["count"]) for o in data["ops"]} == {(4, 128, 512, 2), (4, 512, 128, 2), (4, 128, 64, 1)}
    # pre-tune by the name stored in the cache; a second run times nothing (resumable)
    first = aq("pretune", "demo-m4", "--cache", cache, "--device", "cpu", "--no-progress")
    assert "ops: 3" in first.stdout and "already cached: 0" in first.stdout
    second = aq("pretune", str(prof), "--cache", cache, "--device", "cpu", "--no-progress")
    assert "timed now: 0" in second.stdout
    # a strict deployment on the pre-tuned cache benchmarks nothing and succeeds
    plan = tmp_path / "plan.json"
    rep = aq("report", "--model", MODEL, "--input", "float32[4,128]", "--cache", cache, "--on-miss", "error",
             "--format", "markdown", "--save-plan", str(plan), "--plot", str(tmp_path / "r.png"), "--no-progress")
    assert rep.stdout.startswith("| layer")
    assert "blocks.0.0" in rep.stdout
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    shown = aq("plan", "show", str(plan))
    assert "blocks.1.2" in shown.stdout and "plan tuned on cpu" in shown.stdout
    # a different shape is not pre-tuned: strict mode says what to do
    miss = aq("report", "--model", MODEL, "--input", "float32[9,128]", "--cache", cache, "--on-miss", "error",
              "--no-progress", check=False)
    assert miss.returncode != 0 and "autoquant pretune" in miss.stderr


def test_cache_commands(tmp_path):
    cache = str(tmp_path / "c.sqlite")
    aq("report", "--model", MODEL, "--input", "float32[2,128]", "--cache", cache, "--no-progress")
    assert "measurements:" in aq("cache", "stats", "--cache", cache).stdout
    assert aq("cache", "ls", "--cache", cache).stdout.strip()
    exported = tmp_path / "x.jsonl"
    out = aq("cache", "export", "--cache", cache)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert lines
    exported.write_text(out.stdout)
    other = str(tmp_path / "other.sqlite")
    imported = aq("cache", "import", str(exported), "--cache", other)
    assert "imported" in imported.stdout.lower() or "inserted" in imported.stdout.lower()
    path = aq("cache", "path", env_extra={"AUTOQUANT_CACHE_URL": cache})
    assert cache in path.stdout


def test_bad_input_gives_clear_errors(tmp_path):
    bad = aq("profile", "--model", "nope:factory", "--input", "float32[2,4]", check=False)
    assert bad.returncode == 1 and "cannot import 'nope'" in bad.stderr
    spec = aq("profile", "--model", MODEL, "--input", "float32(2,4)", check=False)
    assert spec.returncode == 1 and "is not DTYPE[d0,d1,...]" in spec.stderr
    missing = aq("plan", "show", str(tmp_path / "none.json"), check=False)
    assert missing.returncode == 1 and "none.json" in missing.stderr


def test_profile_with_m_buckets_then_a_worker_fills_the_cache(tmp_path):
    """Issue 17 from the command line: a profile stored with M buckets, one worker until idle, the
    coverage at 100%, and a deployment at a bucketed M (not the recorded one) that times nothing."""
    cache = str(tmp_path / "team.sqlite")
    out = aq("profile", "--model", MODEL, "--input", "float32[4,128]", "--name", "demo", "--m", "1-8",
             "--cache", cache)
    assert "stored profile 'demo'" in out.stdout
    bad = aq("worker", "--cache", cache, "--threads", "0", "--until-idle", check=False)
    assert bad.returncode != 0 and "--threads must be at least 1" in bad.stderr
    work = aq("worker", "--cache", cache, "--device", "cpu", "--candidates", "int8_dynamic", "--until-idle",
              "--poll", "0.1")
    assert "12 units done" in work.stdout, work.stdout + work.stderr  # 3 layer shapes x M in {1, 2, 4, 8}
    cov = aq("cache", "coverage", "--cache", cache, "--candidates", "int8_dynamic")
    assert "12/12 100%" in cov.stdout, cov.stdout
    again = aq("worker", "--cache", cache, "--device", "cpu", "--candidates", "int8_dynamic", "--until-idle")
    assert "0 units done" in again.stdout
    rep = aq("report", "--model", MODEL, "--input", "float32[2,128]", "--cache", cache, "--on-miss", "error",
             "--candidates", "int8_dynamic", "--no-progress")
    assert rep.returncode == 0
