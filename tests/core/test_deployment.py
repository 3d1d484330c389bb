"""TuneConfig.deployment (issue 13, defect 9): on CUDA, candidates are timed the way the tuned model
will run them, eager calls or CUDA-graph replays, and the measurement says which path ran; on a CPU
nothing changes.

The CUDA cases run on a CPU with a "cuda"-labelled device: the op's tensors stay on the CPU (the
synthetic weights are made there), candidates' ``supports`` is answered yes, and a deterministic
FakeTimer gives each (candidate, timed path) its own figure, including a fake capture that fails
for one candidate. Everything between (OpBench, screening, the cache lookup, the cost model,
selection and the report) is the real code.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from autoquant import opbench, tune
from autoquant.bench import CountingTimer, FakeTimer, calls_per_sample, is_eager_job, per_call_s
from autoquant.cache_db import SQLStore
from autoquant.candidates import get_family
from autoquant.config import CostModel, TuneConfig
from autoquant.costmodel import fallback_parts, op_cost, primary_part, timed_parts, usable_parts
from autoquant.hardware import Environment
from autoquant.keys import BenchKey, Measurement, OpShape, Timed
from autoquant.report import TuningReport
from autoquant.selection import select_layer
from autoquant.store import MemoryStore
from autoquant.tune import bench_key, tune_ops

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
GPU_ENV = Environment(device_kind="cuda", sku="NVIDIA H200", capability="9.0", units=132, memory_mb=143771,
                      driver="570.0", cuda="12.8", torch=torch.__version__, triton="3.3.0", autoquant="test")
OP = OpShape(16, 64, 48, True, "float32")
BASE = get_family("float")(kernel="aten")
WO = get_family("int8_weight_only")(kernel="int8pack")
DYN = get_family("int8_dynamic")(kernel="fbgemm")
CANDS = [BASE, WO, DYN]

# Seconds per call by (family, timed path). As on the H200 (benchmarks/results/gpu/
# h200-2026-11-30/report.md), eager calls cost many times the graph replays and rank differently:
# graph replays favour the float baseline, eager calls the weight-only int8 kernel.
FIGURES = {
    ("float", Timed.EAGER): 200e-6, ("int8_weight_only", Timed.EAGER): 60e-6, ("int8_dynamic", Timed.EAGER): 90e-6,
    ("float", Timed.FULL): 10e-6, ("int8_weight_only", Timed.FULL): 30e-6, ("int8_dynamic", Timed.FULL): 25e-6,
    ("int8_dynamic", Timed.MATMUL): 20e-6,
}


def figure(key: BenchKey) -> float:
    return FIGURES[(key.candidate, key.timed)]


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A "cuda" device whose op tensors live on the CPU, and candidates that all say they run."""
    real = opbench._synthetic
    monkeypatch.setattr(opbench, "_synthetic", lambda op, device: real(op, CPU))
    monkeypatch.setattr(tune, "_supports", lambda cand, device, op: None)


def run(store, config: TuneConfig, timer, device=CUDA, env=GPU_ENV):
    return tune_ops({OP: CANDS}, device, store, timer, config, progress=False, env=env)[OP]


def cheapest(trials) -> str:
    return min((t.cost.value, c.family) for c, t in trials.items() if t.ok)[1]


# ---- the cost model's view of the timing paths -------------------------------------------------
@pytest.mark.parametrize("kind", ["interpolate", "relu"])
def test_cuda_eager_times_the_eager_call_alone_under_any_cost_model(kind):
    cm = CostModel(kind)
    for dynamic in (True, False):
        assert timed_parts(cm, dynamic, device="cuda", deployment="eager") == (Timed.EAGER,)
    assert primary_part(cm, device="cuda", deployment="eager") is Timed.EAGER
    assert fallback_parts("cuda", "eager") == ()
    m = lambda t: Measurement(t, t, t, 1)
    # eager calls do not fuse: neither relu nor interpolate changes the eager figure
    assert op_cost(cm, True, {Timed.EAGER: m(7e-6)}).value == 7e-6


def test_graphs_and_cpu_keep_the_cost_models_parts():
    interp = CostModel("interpolate")
    for device, deployment in (("cuda", "graphs"), ("cpu", "eager"), ("cpu", "graphs")):
        assert timed_parts(interp, True, device=device, deployment=deployment) == (Timed.FULL, Timed.MATMUL)
        assert timed_parts(CostModel("relu"), False, device=device, deployment=deployment) == (Timed.RELU,)
        assert primary_part(interp, device=device, deployment=deployment) is Timed.FULL
    assert fallback_parts("cuda", "graphs") == (Timed.EAGER,)
    assert fallback_parts("cpu", "graphs") == ()
    # an uncapturable candidate's EAGER row stands in only where graphs were wanted on CUDA
    assert usable_parts(interp, True, {Timed.EAGER}, device="cuda", deployment="graphs") == (Timed.EAGER,)
    assert usable_parts(interp, True, {Timed.FULL, Timed.MATMUL, Timed.EAGER}, device="cuda",
                        deployment="graphs") == (Timed.FULL, Timed.MATMUL)
    assert usable_parts(interp, True, {Timed.EAGER}, device="cpu", deployment="graphs") is None


def test_invalid_deployment_is_a_clear_error():
    with pytest.raises(ValueError, match="deployment='compiled'.*'eager'.*'graphs'"):
        TuneConfig(deployment="compiled")
    assert TuneConfig().deployment == "eager"
    assert TuneConfig.from_json(TuneConfig(deployment="graphs").to_json()).deployment == "graphs"
    old = TuneConfig().to_json().replace(', "deployment": "eager"', "")
    assert "deployment" not in old and TuneConfig.from_json(old).deployment == "eager"


def test_autoquant_rejects_an_unknown_deployment():
    from autoquant import autoquant

    with pytest.raises(ValueError, match="deployment="):
        autoquant(torch.nn.Sequential(torch.nn.Linear(8, 8)), manual=True, cache=None, progress=False,
                  deployment="reduce-overhead")


# ---- the harness's per-sample arithmetic -------------------------------------------------------
def test_calls_per_sample_aims_at_a_replay_well_above_launch_latency():
    assert calls_per_sample(5e-6, 32) == 15  # 75 us of 5 us calls
    assert calls_per_sample(5e-6, 4) == 4  # never more calls than distinct weight copies
    assert calls_per_sample(1e-6, 64) == 32  # capped
    assert calls_per_sample(2e-3, 32) == 1  # a long call is a sample alone
    assert calls_per_sample(0.0, 3) == 3  # a replay too short to read: as many as allowed
    assert calls_per_sample(5e-6, 32, most=8) == 8
    assert per_call_s(90e-6, 3) == pytest.approx(30e-6)
    with pytest.raises(ValueError):
        per_call_s(1.0, 0)


def test_job_label_decides_the_cuda_path():
    from autoquant.bench import BenchJob

    k = bench_key("e", BASE, OP, Timed.EAGER)
    assert is_eager_job(BenchJob(k, lambda: None))
    assert not is_eager_job(BenchJob(bench_key("e", BASE, OP, Timed.FULL), lambda: None))


# ---- selection by deployment on a (faked) GPU --------------------------------------------------
@pytest.mark.usefixtures("fake_cuda")
def test_deployment_decides_the_winner_where_the_paths_disagree():
    eager_timer, graphs_timer = CountingTimer(FakeTimer(figure)), CountingTimer(FakeTimer(figure))
    eager = run(MemoryStore(), TuneConfig(), eager_timer)
    graphs = run(MemoryStore(), TuneConfig(deployment="graphs"), graphs_timer)
    assert cheapest(eager) == "int8_weight_only" and eager[WO].cost.value == pytest.approx(60e-6)
    assert cheapest(graphs) == "float" and graphs[BASE].cost.value == pytest.approx(10e-6)
    # interpolate applies to graph replays only: 0.85 * 25 + 0.15 * 20 us
    assert graphs[DYN].cost.value == pytest.approx(24.25e-6) and eager[DYN].cost.value == pytest.approx(90e-6)
    assert {k.timed for k in eager_timer.keys + eager_timer.quick_keys} == {Timed.EAGER}
    assert {k.timed for k in graphs_timer.keys} == {Timed.FULL, Timed.MATMUL}
    assert all(set(t.parts) == {Timed.EAGER} for t in eager.values())


@pytest.mark.usefixtures("fake_cuda")
def test_eager_rows_never_stand_in_for_graph_replays_of_a_capturable_candidate():
    store = MemoryStore()
    run(store, TuneConfig(), FakeTimer(figure))  # an eager deployment's rows
    timer = CountingTimer(FakeTimer(figure))
    graphs = run(store, TuneConfig(deployment="graphs"), timer)
    assert cheapest(graphs) == "float"
    assert {(k.candidate, k.timed) for k in timer.keys} >= {(c.family, Timed.FULL) for c in CANDS}
    assert all(Timed.EAGER not in t.parts for t in graphs.values())


@pytest.mark.usefixtures("fake_cuda")
def test_capture_failure_is_timed_and_stored_as_eager_and_used_by_graphs(tmp_path: Path):
    figures = {**FIGURES, ("int8_weight_only", Timed.EAGER): 5e-6}  # cheapest of all, eagerly
    cost = lambda k: figures[(k.candidate, k.timed)]
    capture = lambda k: k.candidate != "int8_weight_only"  # its kernel syncs on the host
    store = SQLStore(tmp_path / "cache.sqlite")
    config = TuneConfig(deployment="graphs")
    timer = CountingTimer(FakeTimer(cost, capture=capture))
    trials = run(store, config, timer)
    assert set(trials[WO].parts) == {Timed.EAGER} and trials[WO].cost.value == pytest.approx(5e-6)
    assert set(trials[BASE].parts) == {Timed.FULL}
    assert all(k.timed is Timed.EAGER for k in timer.keys + timer.quick_keys if k.candidate == "int8_weight_only")
    # the row says the path that ran: EAGER, never a graph label, for the uncapturable candidate
    rows = {(r.key.candidate, r.key.timed) for r in store.measurements()}
    assert ("int8_weight_only", Timed.EAGER) in rows and ("int8_weight_only", Timed.FULL) not in rows
    assert ("float", Timed.FULL) in rows and ("float", Timed.EAGER) not in rows

    # a warm cache times nothing (the capture check builds and captures; it times nothing)
    warm_timer = CountingTimer(FakeTimer(cost, capture=capture))
    warm = run(store, config, warm_timer)
    assert (warm_timer.calls, warm_timer.quick_calls) == (0, 0)
    assert {c: t.cost for c, t in warm.items()} == {c: t.cost for c, t in trials.items()}

    # selection uses the fallback figure, and the report shows which path each cost came from
    torch.manual_seed(0)
    w, b = torch.randn(OP.n, OP.k) / 8, torch.randn(OP.n) / 10
    plan = select_layer("fc", {OP: 1}, {OP: warm}, w, b, torch.randn(OP.m, OP.k), config)
    assert plan.winner == WO
    rep = TuningReport(layers=[plan], skipped={}, environments=[GPU_ENV], cost_model=config.cost_model,
                       min_sqnr=None, cache="test", seconds=0.0, deployment="graphs")
    ops = rep.to_ops_frame().set_index("candidate")["timed"]
    assert ops[WO.name].startswith("eager (not capturable")
    assert ops[BASE.name] == "full" and ops[DYN.name] == "full+matmul"
    assert rep.to_long_frame().set_index("candidate").loc[WO.name, "timed"].startswith("eager (not capturable")
    assert "deployment 'graphs'" in rep.summary()
    store.close()


@pytest.mark.usefixtures("fake_cuda")
def test_eager_report_states_its_deployment():
    config = TuneConfig()
    trials = run(MemoryStore(), config, FakeTimer(figure))
    torch.manual_seed(0)
    plan = select_layer("fc", {OP: 1}, {OP: trials}, torch.randn(OP.n, OP.k) / 8, torch.randn(OP.n) / 10,
                        torch.randn(OP.m, OP.k), config)
    rep = TuningReport(layers=[plan], skipped={}, environments=[GPU_ENV], cost_model=config.cost_model,
                       min_sqnr=None, cache="test", seconds=0.0, deployment=config.deployment)
    assert set(rep.to_ops_frame()["timed"]) == {"eager"}
    assert "deployment 'eager'" in rep.summary() and "host time included" in rep.summary()


# ---- a CPU: nothing changes ----------------------------------------------------------------------
CPU_ENV = Environment(device_kind="cpu", sku="Test CPU", capability="avx2", units=2, memory_mb=8192, driver="",
                      cuda="", torch=torch.__version__, triton="", autoquant="test")


def test_cpu_keys_and_warm_cache_do_not_depend_on_the_deployment():
    store = MemoryStore()
    # rows under today's keys: the cost model's parts, FULL for an eager call on a CPU
    today = {bench_key(CPU_ENV.hash, c, OP, p): Measurement(t, t, t, 3)
             for c, t in ((BASE, 10e-6), (WO, 30e-6), (DYN, 25e-6))
             for p in timed_parts(CostModel(), c.dynamic_activation)}
    assert {k.timed for k in today} == {Timed.FULL, Timed.MATMUL}
    store.put_many(CPU_ENV, today)
    for deployment in ("eager", "graphs"):
        timer = CountingTimer(FakeTimer(figure))
        trials = run(store, TuneConfig(deployment=deployment), timer, device=CPU, env=CPU_ENV)
        assert (timer.calls, timer.quick_calls) == (0, 0), deployment
        assert cheapest(trials) == "float"
        assert {p for t in trials.values() for p in t.parts} == {Timed.FULL, Timed.MATMUL}


def test_cpu_cold_run_times_the_same_keys_for_either_deployment():
    keys = {}
    for deployment in ("eager", "graphs"):
        timer = CountingTimer(FakeTimer(figure))
        run(MemoryStore(), TuneConfig(deployment=deployment), timer, device=CPU, env=CPU_ENV)
        keys[deployment] = sorted(set(timer.keys), key=repr)
    assert keys["eager"] == keys["graphs"] and {k.timed for k in keys["eager"]} == {Timed.FULL, Timed.MATMUL}


# ---- the cache accepts and round-trips EAGER rows ------------------------------------------------
def test_eager_rows_round_trip_through_sqlite_and_jsonl(tmp_path: Path):
    k = bench_key(GPU_ENV.hash, WO, OP, Timed.EAGER)
    m = Measurement(6e-5, 5.5e-5, 6.5e-5, 25, None)
    with SQLStore(tmp_path / "a.sqlite") as a:
        a.put_many(GPU_ENV, {k: m})
        assert a.get_many([k]) == {k: m}
        assert a.get_many([bench_key(GPU_ENV.hash, WO, OP, Timed.FULL)]) == {}
        buf = io.StringIO()
        a.export_jsonl(buf)
    assert '"timed":"eager"' in buf.getvalue().replace(" ", "")
    with SQLStore(tmp_path / "b.sqlite") as b:
        b.import_jsonl(io.StringIO(buf.getvalue()))
        assert b.get_many([k]) == {k: m}
    assert Timed("eager") is Timed.EAGER


def test_a_v2_cache_file_accepts_eager_rows_after_its_upgrade(tmp_path: Path):
    import shutil
    import sqlite3

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v2" / "cache_v2.db.bin"
    path = tmp_path / "cache.sqlite"
    shutil.copy(fixture, path)
    con = sqlite3.connect(path)
    before = con.execute("SELECT id, candidate, timed, median_s FROM measurements ORDER BY id").fetchall()
    con.close()
    with SQLStore(path) as store:
        assert [(r.key.candidate, r.key.timed.value) for r in store.measurements()] != []
        k = bench_key(GPU_ENV.hash, WO, OP, Timed.EAGER)
        store.put_many(GPU_ENV, {k: Measurement(1e-5, 1e-5, 1e-5, 3)})
        assert k in store.get_many([k])
    con = sqlite3.connect(path)
    after = con.execute("SELECT id, candidate, timed, median_s FROM measurements ORDER BY id").fetchall()
    with pytest.raises(sqlite3.IntegrityError):  # the check constraint still guards the column
        con.execute("UPDATE measurements SET timed = 'bogus' WHERE id = ?", (after[0][0],))
    con.close()
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert not math.isnan(after[-1][3])
