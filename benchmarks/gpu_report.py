"""Tables from a GPU run's result folder (what scripts/gpu_check.sh writes), as Markdown.

    python benchmarks/gpu_report.py benchmarks/results/gpu/h200-2026-11-30 [--out report.md]

Per Llama-3-8B shape and M (smoke.jsonl): every CUDA candidate's CUDA-graph replay time, its ratio
to bf16 ``F.linear`` (the float candidate) measured in the same run, the synchronized eager time and
the eager / graph ratio (what running outside a graph adds), SQNR vs float; then the Triton kernel
targets (bench_triton.json) and autoquant end to end vs bf16 and every uniform scheme
(bench_e2e.json). Reads result files only: no torch, no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

BASELINE = "float(kernel=aten, compute_dtype=None)"


def _load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def smoke_tables(rows: list[dict]) -> list[str]:
    header, cases = rows[0], [r for r in rows[1:] if "candidate" in r]
    out = [f"## Candidates vs bf16 F.linear ({header.get('gpu')}, {header.get('dtype')}, torch "
           f"{header.get('torch')}; CUDA-graph replay after an L2 flush, us)", ""]
    for shape, k, n in header["shapes"]:
        for m in header["ms"]:
            here = [r for r in cases if r["shape"] == shape and r["m"] == m]
            base = next((r for r in here if r["candidate"] == BASELINE), None)
            base_us = base.get("graph_us") if base else None
            out += [f"### {shape} K={k} N={n}, M={m}", "",
                    "| candidate | graph us | vs bf16 | eager us | eager / graph | SQNR vs float dB | note |",
                    "|---|---|---|---|---|---|---|"]
            for r in sorted(here, key=lambda r: (r.get("graph_us") is None, r.get("graph_us") or 0)):
                g, e = r.get("graph_us"), r.get("eager_us")
                note = r.get("supports") or r.get("error") or ("" if r.get("graph", True) else "graph capture failed")
                out.append(
                    f"| {r['candidate']} | {_fmt(g)} | {_fmt(base_us / g if g and base_us else None, '.2f')} | "
                    f"{_fmt(e)} | {_fmt(e / g if e and g else None, '.2f')} | {_fmt(r.get('sqnr_float_db'))} | "
                    f"{(note or '')[:90]} |")
            out.append("")
    return out


def triton_table(data: dict) -> list[str]:
    out = ["## Triton kernels vs bf16 F.linear (bench_triton.json)", "",
           "| scheme | M | K | N | bf16 us | comparison us | triton us | vs bf16 | vs comparison | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data.get("rows", []):
        out.append(f"| {r['scheme']} | {r['m']} | {r['k']} | {r['n']} | {_fmt(r['bf16_us'])} | "
                   f"{_fmt(r.get('builtin_us'))} | {_fmt(r['triton_us'])} | {_fmt(r['vs_bf16'], '.2f')} | "
                   f"{_fmt(r.get('vs_builtin'), '.2f')} | {r.get('note', '')} |")
    return out + [""]


def e2e_tables(data: list[dict]) -> list[str]:
    out = ["## autoquant end to end (bench_e2e.json)", ""]
    for r in data:
        if "timed_ms" not in r:
            continue
        out += [f"### {r['case']}, M={r['m']}: tuned in {r['tune_s']:.1f} s, chose {r['chosen']}", "",
                f"autoquant vs bf16 {r['speedup_vs_baseline']:.2f}x, vs best uniform "
                f"({r['best_uniform']}) {r['autoquant_vs_best_uniform']:.2f}x; paired rounds "
                f"{r['paired_vs_baseline']:.2f}x / {r['paired_vs_best_uniform']:.2f}x", "",
                "| variant | ms | vs bf16 |", "|---|---|---|"]
        base = r["timed_ms"].get("bfloat16 baseline")
        for name, ms in sorted(r["timed_ms"].items(), key=lambda kv: kv[1]):
            out.append(f"| {name} | {ms:.3f} | {_fmt(base / ms if base else None, '.2f')} |")
        out.append("")
    return out


def report(folder: Path) -> str:
    lines = [f"# GPU run: {folder.name}", ""]
    if (folder / "smoke.jsonl").exists():
        lines += smoke_tables(_load_jsonl(folder / "smoke.jsonl"))
    if (folder / "bench_triton.json").exists():
        lines += triton_table(json.loads((folder / "bench_triton.json").read_text()))
    if (folder / "bench_e2e.json").exists():
        lines += e2e_tables(json.loads((folder / "bench_e2e.json").read_text()))
    if len(lines) == 2:
        raise SystemExit(f"gpu_report: no smoke.jsonl, bench_triton.json or bench_e2e.json in {folder}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a result folder written by scripts/gpu_check.sh")
    ap.add_argument("--out", type=Path, help="write the Markdown here (default: stdout)")
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"gpu_report: {args.folder} is not a folder")
    text = report(args.folder)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
