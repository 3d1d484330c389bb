#!/usr/bin/env bash
# The prepared GPU run (issue 13): ONE command for the (offline) GPU machine, under 8 minutes,
# writing at most 8 result files to $OUT (or the folder given as an argument):
#
#   env.json           environment, versions, device, autoquant's fingerprint and its hash
#   smoke.jsonl        benchmarks/gpu_smoke.py: every default CUDA candidate x Llama-3-8B shape x M
#   roundtrip.json     benchmarks/gpu_cache_roundtrip.py: the second autoquant times nothing
#   pytest_cuda.xml    junit of `pytest -m cuda` (every CUDA test), per-test timeouts
#   bench_triton.json  benchmarks/bench_triton.py: Triton kernels vs bf16 and torch's paths
#   bench_e2e.json     benchmarks/bench_e2e.py: 1-layer Llama-3-8B-shaped model, bf16, M=1 / 128
#   log.txt            every step's output (benchmarks/gpu_overhead.py prints its host-time
#                      profile there: no file of its own)
#   summary.txt        per step: exit code, seconds, cut or not; then the headline results
#
# Steps run in that order (most information per second first), each under `timeout -s INT` so a
# step cut short still writes what it has, within a total budget (--budget, default 475 s).
# Missing packages (sqlalchemy, platformdirs, psycopg) come from the git-ignored .whl/ folder
# (scripts/fetch_gpu_wheels.sh; carry it with the run), installed with pip --no-index into a scratch
# folder on PYTHONPATH; the checkout itself is installed editable (offline, no build isolation),
# or, where that fails, linked into that folder.
#
#     bash scripts/gpu_check.sh                    # on the GPU machine, results in $OUT
#     bash scripts/gpu_check.sh results/gpu        # results in results/gpu
#     bash scripts/gpu_check.sh --dry-run [DIR]    # CPU, tiny sizes, CUDA steps on CPU or skipped
#     bash scripts/gpu_check.sh --only pytest_cuda,bench_triton --tests FILE --budget 300
#         # a rerun: only the named steps (env, smoke, roundtrip, pytest_cuda, bench_triton,
#         # overhead, bench_e2e), the CUDA tests limited to the node ids listed in FILE (one per line,
#         # relative to the repository root), bench_triton limited by --bench-args "..."
#     env PYTEST_WORKERS=N PYTEST_CAP=SECONDS E2E_M=1,128 E2E_DEPLOYMENT=eager|graphs bash scripts/gpu_check.sh
#         # xdist workers and time cap of the CUDA tests; bench_e2e's M values and deployment
#
# Exit status: 0 when every step exited 0 (a step cut by the budget counts as failed in --dry-run
# only), else 1. PYTHON=... picks the interpreter (default: python3; .venv/bin/python in --dry-run).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DRY=0
BUDGET=475
out_arg=""
ONLY=""
TESTS_FILE=""
BENCH_ARGS=""
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget) BUDGET="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --tests) TESTS_FILE="$2"; shift ;;
        --bench-args) BENCH_ARGS="$2"; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) out_arg="$1" ;;
    esac
    shift
done
START=$(date +%s)
DEADLINE=$((START + BUDGET))

if [[ -n "$out_arg" ]]; then
    OUTDIR="$out_arg"
elif [[ -n "${OUT:-}" ]]; then
    OUTDIR="$OUT"
elif ((DRY)); then
    OUTDIR="$(mktemp -d -t gpu_check_dry.XXXXXX)"
else
    OUTDIR="$REPO/gpu_check_out"
fi
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/log.txt"
SUMMARY="$OUTDIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if ((DRY)) && [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
if [[ "$PY" == */* ]]; then  # a path: make it absolute, the steps run from another folder
    PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi
# Commands run from a scratch folder: the checkout's root is never on sys.path, so its autoquant/
# folder (which lacks the kernels and cache_db subpackages the install maps in) cannot shadow
# the installed package.
WORK="$(mktemp -d -t gpu_check_work.XXXXXX)"
DEPS="$WORK/deps"
mkdir -p "$DEPS"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$WORK/triton-cache"   # shared by the steps: kernels compile once
export AUTOQUANT_CACHE_URL="$WORK/autoquant-cache.sqlite"
export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"

FAILED=0
say() { echo "$*" | tee -a "$LOG"; }

# step NAME CAP RESERVE CMD...: run CMD in $WORK under `timeout -s INT`, for at most CAP seconds
# and never into the last RESERVE seconds of the budget (kept for the steps after it).
step() {
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local now left t rc t0 t1 status
    if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then
        say "=== $name: not run (--only $ONLY)"
        return
    fi
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    t=$((cap < left ? cap : left))
    if ((t < 10)); then
        say "=== $name: skipped, the time budget is spent"
        echo "$name rc=- seconds=0 skipped(budget)" >>"$SUMMARY"
        ((DRY)) && FAILED=1
        return
    fi
    say "=== $name (at most ${t}s): $*"
    t0=$(date +%s)
    (cd "$WORK" && timeout -s INT -k 20 "$t" "$@") 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s)
    status=ok
    if ((rc == 124 || rc == 137)); then
        status="cut at ${t}s (partial results kept)"
        ((DRY)) && FAILED=1
    elif ((rc != 0)); then
        status=failed
        FAILED=1
    fi
    say "=== $name: exit $rc after $((t1 - t0))s: $status"
    echo "$name rc=$rc seconds=$((t1 - t0)) $status" >>"$SUMMARY"
}

# run_setup: the install, in this shell (no timeout: pip --no-index only copies local files).
run_setup() {
    local rc t0 t1
    say "=== setup"
    t0=$(date +%s)
    setup 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s)
    ((rc)) && FAILED=1
    say "=== setup: exit $rc after $((t1 - t0))s"
    echo "setup rc=$rc seconds=$((t1 - t0)) $( ((rc)) && echo failed || echo ok)" >>"$SUMMARY"
}

have() { (cd "$WORK" && "$PY" -c "import $1" >/dev/null 2>&1); }

# ---------------------------------------------------------------------------------------- setup
setup() {
    shopt -s nullglob
    local wheels=("$REPO"/.whl/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})) && ((DRY)); then
        # This interpreter is not the GPU machine's 3.12: install for that target into a folder
        # kept off PYTHONPATH, which proves the wheels fit it.
        "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --only-binary :all: \
            --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_28_x86_64 --platform any \
            --target "$WORK/wheels-for-3.12" "${wheels[@]}" || return 1
        echo "dry run: the wheels install for cp312 manylinux x86_64 (not used by this interpreter)"
    elif ((${#wheels[@]})); then
        "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --target "$DEPS" "${wheels[@]}" \
            || return 1
    else
        echo "no wheels in $REPO/.whl: not installing any (run scripts/fetch_gpu_wheels.sh and carry .whl)"
    fi
    local where
    where=$(cd "$WORK" && "$PY" -c "import autoquant.kernels, autoquant.cache_db, autoquant; print(autoquant.__file__)" 2>/dev/null)
    if [[ "$where" == "$REPO/"* ]]; then
        echo "autoquant already importable from this checkout ($where)"
    elif "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --no-build-isolation -e "$REPO"; then
        echo "installed this checkout editable"
    else
        # No setuptools fit to build offline: link the package together as an install would lay it
        # out (autoquant.kernels <- kernels/, autoquant.cache_db <- cache_db/).
        echo "editable install failed: linking the checkout into $DEPS/autoquant"
        mkdir -p "$DEPS/autoquant"
        ln -sf "$REPO"/autoquant/* "$DEPS/autoquant/"
        ln -sfn "$REPO/kernels" "$DEPS/autoquant/kernels"
        ln -sfn "$REPO/cache_db" "$DEPS/autoquant/cache_db"
    fi
    (cd "$WORK" && "$PY" -c "
import autoquant, autoquant.kernels, autoquant.cache_db, sqlalchemy, platformdirs
print('autoquant', autoquant.__version__, 'from', autoquant.__file__, '| sqlalchemy', sqlalchemy.__version__)
try:
    import psycopg
    print('psycopg', psycopg.__version__)
except ImportError as exc:
    print('psycopg not importable (PostgreSQL tests will skip):', exc)
")
}

say "gpu_check: repo $REPO, out $OUTDIR, python $PY, budget ${BUDGET}s, dry-run $DRY"
run_setup

# ---------------------------------------------------------------------------------------- steps
step env 40 300 "$PY" "$REPO/benchmarks/gpu_env.py" --out "$OUTDIR/env.json"

if ((DRY)); then
    step smoke 120 200 "$PY" "$REPO/benchmarks/gpu_smoke.py" --dry-run --out "$OUTDIR"
    step roundtrip 90 150 "$PY" "$REPO/benchmarks/gpu_cache_roundtrip.py" --dry-run --out "$OUTDIR/roundtrip.json"
else
    step smoke 150 200 "$PY" "$REPO/benchmarks/gpu_smoke.py" --out "$OUTDIR" --max-seconds 130
    step roundtrip 50 150 "$PY" "$REPO/benchmarks/gpu_cache_roundtrip.py" --dtype bfloat16 \
        --out "$OUTDIR/roundtrip.json"
fi

pytest_targets=("$REPO/tests")
if [[ -n "$TESTS_FILE" ]]; then
    # A rerun: the listed node ids only (made absolute: pytest runs from the scratch folder).
    [[ "$TESTS_FILE" == /* ]] || TESTS_FILE="$REPO/$TESTS_FILE"
    mapfile -t ids < <(grep -v '^[[:space:]]*$' "$TESTS_FILE")
    pytest_targets=("${ids[@]/#/$REPO/}")
    say "pytest_cuda: ${#ids[@]} node ids from $TESTS_FILE"
fi
pytest_args=(-m pytest -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" "${pytest_targets[@]}"
             -m cuda -q -rfE --junitxml "$OUTDIR/pytest_cuda.xml")
if have xdist; then pytest_args+=(-n "${PYTEST_WORKERS:-8}"); else say "pytest-xdist missing: CUDA tests run in one process"; fi
if have pytest_timeout; then pytest_args+=(--timeout 120); else say "pytest-timeout missing: no per-test timeout"; fi
if ((DRY)); then
    # No GPU: the selection is collected (exit 5, "no tests", would mean the marker selects
    # nothing), not run.
    say "dry run: collecting the CUDA-marked tests only"
    pytest_args+=(--collect-only)
fi
step pytest_cuda "${PYTEST_CAP:-110}" 100 "$PY" "${pytest_args[@]}"

if ((DRY)); then
    step bench_triton 90 40 env TRITON_INTERPRET=1 "$PY" "$REPO/benchmarks/bench_triton.py" --dry-run \
        --schemes int8_wo,int4_wo --m 1 --out "$OUTDIR/bench_triton.json"
    step overhead 60 0 "$PY" "$REPO/benchmarks/gpu_overhead.py" --device cpu --dtype float32 --calls 20 \
        --profile 1 --top 8
    step bench_e2e 120 0 "$PY" "$REPO/benchmarks/bench_e2e.py" --device cpu --dtype bfloat16 \
        --models llama3-8b --tiny --layers 1 --m 1 --deployment "${E2E_DEPLOYMENT:-eager}" \
        --out "$OUTDIR/bench_e2e.json"
else
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    step bench_triton 60 60 "$PY" "$REPO/benchmarks/bench_triton.py" ${BENCH_ARGS:---m 1,16,128,1024} \
        --samples 50 --out "$OUTDIR/bench_triton.json"
    step overhead 30 90 "$PY" "$REPO/benchmarks/gpu_overhead.py"
    step bench_e2e 100 0 "$PY" "$REPO/benchmarks/bench_e2e.py" --device cuda --dtype bfloat16 \
        --models llama3-8b --layers 1 --m "${E2E_M:-1,128}" --deployment "${E2E_DEPLOYMENT:-eager}" \
        --out "$OUTDIR/bench_e2e.json"
fi

# ---------------------------------------------------------------------------------------- summary
{
    echo
    echo "total $(($(date +%s) - START))s of a ${BUDGET}s budget"
    (cd "$WORK" && "$PY" - "$OUTDIR" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f"{name}: missing")
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            if name.endswith(".jsonl"):
                return [json.loads(line) for line in fh if line.strip()]
            if name.endswith(".xml"):
                return ET.parse(fh).getroot()
            return json.load(fh)
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: unreadable ({type(exc).__name__}: {exc})")
        return None


env = load("env.json")
if env:
    fp = env.get("fingerprint", {})
    print(f"device: {fp.get('sku')} cap {fp.get('capability')} driver {fp.get('driver')!r} hash {fp.get('hash')}")
smoke = load("smoke.jsonl")
if smoke:
    cases = [r for r in smoke if "candidate" in r]
    ran = [r for r in cases if r.get("supports") is None]
    errors = [r for r in ran if r.get("error")]
    low = [r for r in ran if not r.get("error") and r.get("sqnr_ref_db") is not None and r["sqnr_ref_db"] < 40]
    print(f"smoke: {len(cases)} cases, {len(ran)} ran, {len(errors)} errors, {len(low)} below 40 dB vs reference"
          + "".join(f"; {r['stopped']}" for r in smoke if "stopped" in r))
    for r in errors[:15]:
        print(f"  ERROR {r['candidate']} {r['shape']} M={r['m']}: {r['error'][:160]}")
    for r in low[:10]:
        print(f"  LOW {r['candidate']} {r['shape']} M={r['m']}: {r['sqnr_ref_db']} dB vs reference")
rt = load("roundtrip.json")
if rt:
    print("roundtrip: " + ("OK" if rt.get("ok") else "FAILED: " + "; ".join(rt.get("problems", []))))
junit = load("pytest_cuda.xml")
if junit is not None:
    suites = [junit] if junit.tag == "testsuite" else list(junit)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    print(f"pytest -m cuda: {tot['tests']} tests, {tot['failures']} failures, {tot['errors']} errors, "
          f"{tot['skipped']} skipped")
    if not tot["tests"]:  # --dry-run collects only: say how many the marker selected
        with open(os.path.join(out, "log.txt"), encoding="utf-8", errors="replace") as fh:
            collected = [line.strip() for line in fh if "tests collected" in line]
        if collected:
            print(f"  collected: {collected[-1]}")
    for case in junit.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            print(f"  FAIL {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:160]}")
bt = load("bench_triton.json")
if bt:
    rows = bt.get("rows", [])
    print(f"bench_triton: {len(rows)} rows")
    for r in rows:
        if (r["scheme"], r["m"]) in {("int8_wo", 1), ("int4_wo", 1), ("int8_dyn", 1024)}:
            print(f"  {r['scheme']} M={r['m']} K={r['k']} N={r['n']}: vs bf16 {r['vs_bf16']}, "
                  f"vs builtin {r['vs_builtin']} ({r['note']})")
e2e = load("bench_e2e.json")
if e2e:
    for r in e2e:
        if "autoquant_vs_best_uniform" in r:
            print(f"e2e {r['case']} M={r['m']}: vs baseline {r['speedup_vs_baseline']:.2f}x, vs best uniform "
                  f"{r['autoquant_vs_best_uniform']:.2f}x ({r['best_uniform']}), paired {r['paired_vs_best_uniform']:.2f}x")
EOF
    )
} 2>&1 | tee -a "$SUMMARY"

# Every file must come back: at most 8, each under 16 MiB (the log is the one that could grow).
max=$((15 * 1024 * 1024))
if [[ -f "$LOG" ]] && (($(stat -c %s "$LOG") > max)); then
    { head -c $((max / 2)) "$LOG"; echo; echo "[... log cut to fit 16 MiB ...]"; tail -c $((max / 2)) "$LOG"; } >"$LOG.tmp"
    mv "$LOG.tmp" "$LOG"
fi
nfiles=$(find "$OUTDIR" -type f | wc -l)
if ((nfiles > 8)); then
    echo "gpu_check: $nfiles files in $OUTDIR, more than the 8 that come back:" >&2
    find "$OUTDIR" -type f >&2
    FAILED=1
fi
rm -rf "$WORK"
echo "gpu_check: results in $OUTDIR ($nfiles files); $( ((FAILED)) && echo 'some steps failed' || echo 'all steps passed')"
exit $FAILED
