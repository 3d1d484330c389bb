"""The `autoquant cache ...` commands, through their functions and their argument parser."""

from __future__ import annotations

import argparse
import io
from datetime import timedelta
from pathlib import Path

import pytest
from autoquant.cache_db import SQLStore
from autoquant.cache_db.cli import add_cache_parser
from autoquant.cache_db.cli_ops import (
    cmd_export,
    cmd_import,
    cmd_ls,
    cmd_merge,
    cmd_path,
    cmd_prune,
    cmd_stats,
    parse_age,
)

from autoquant.keys import OpShape

from .conftest import CPU_ENV, GPU_ENV
from .helpers import figures, key, model_keys


@pytest.fixture
def filled(tmp_path: Path) -> SQLStore:
    store = SQLStore(tmp_path / "cache.sqlite")
    store.put_many(CPU_ENV, model_keys(CPU_ENV, 12))
    store.put_many(GPU_ENV, {key(GPU_ENV): figures()})
    store.save_profile("mlp", "fp0", {OpShape(16, 96, 4097, True, "bfloat16"): 4})
    return store


def test_path(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOQUANT_CACHE_URL", str(tmp_path / "x.sqlite"))
    lines = cmd_path()
    assert "AUTOQUANT_CACHE_URL" in lines[0] and "not created yet" in lines[1]
    monkeypatch.setenv("AUTOQUANT_CACHE_URL", "postgresql+psycopg://u:secret@h/db")
    assert cmd_path() == ["postgresql+psycopg://u:***@h/db  (from $AUTOQUANT_CACHE_URL)"]


def test_ls_and_stats(filled: SQLStore) -> None:
    text = "\n".join(cmd_ls(filled))
    assert "2 environment(s)" in text and CPU_ENV.hash in text and "12 measurements" in text
    assert "mlp  1 ops, 4 calls" in text
    stats = cmd_stats(filled)
    assert stats[1:4] == ["environments: 2", "measurements: 13", "shape profiles: 1"]


def test_export_import_merge(filled: SQLStore, tmp_path: Path) -> None:
    buf = io.StringIO()
    assert cmd_export(filled, buf, "H100") == [
        "exported 1 measurements from 1 environment(s) matching SKU 'H100' and 0 profile(s)"]
    other = SQLStore(tmp_path / "other.sqlite")
    lines = cmd_import(other, io.StringIO(buf.getvalue()))
    assert lines[0].startswith("imported 3 records: 1 new, 0 already present, 0 conflicts")
    lines = cmd_merge(other, str(filled.describe()))
    assert "12 new, 1 already present" in lines[0]


def test_prune(filled: SQLStore) -> None:
    assert "nothing to prune" in cmd_prune(filled, None, None)[0]
    assert cmd_prune(filled, timedelta(days=1), None)[0].startswith("deleted 0 measurements")
    line = cmd_prune(filled, None, CPU_ENV)[0]
    assert line.startswith("deleted 1 measurements") and "1 environment(s)" in line


@pytest.mark.parametrize("text,expected", [
    ("90d", timedelta(days=90)), ("12h", timedelta(hours=12)), ("1.5w", timedelta(weeks=1.5)),
    ("30 m", timedelta(minutes=30)),
])
def test_parse_age(text: str, expected: timedelta) -> None:
    assert parse_age(text) == expected


def test_parse_age_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="30 days"):
        parse_age("30 days")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_cache_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_argument_parser(filled: SQLStore, tmp_path: Path, capsys) -> None:
    cache = filled.describe()
    out = tmp_path / "dump.jsonl"
    assert _run(["cache", "stats", "--cache", cache]) == 0
    assert "measurements: 13" in capsys.readouterr().out
    assert _run(["cache", "export", "--cache", cache, "-o", str(out)]) == 0
    assert _run(["cache", "import", "--cache", str(tmp_path / "n.sqlite"), str(out)]) == 0
    assert "13 new" in capsys.readouterr().out
    assert _run(["cache", "prune", "--cache", cache, "--older-than", "bogus"]) == 1
    assert _run(["cache", "ls", "--cache", str(tmp_path)]) == 2  # a directory: unavailable
    assert "is a directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\n")
    assert _run(["cache", "import", "--cache", cache, str(bad)]) == 1
    assert "line 1" in capsys.readouterr().err
