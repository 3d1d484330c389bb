"""The timing harness: real CPU timer behaviour, the fake and counting timers."""

import time

import pytest
import torch

from autoquant.bench import (
    BenchConfig,
    BenchJob,
    CountingTimer,
    CpuTimer,
    FakeTimer,
    fixed_threads,
    quantiles,
    time_callables,
)
from autoquant.keys import BenchKey, Measurement, OpShape, Timed


def key(name="k", timed=Timed.FULL):
    return BenchKey("env", name, "{}", 1, OpShape(4, 8, 8, False, "float32"), timed)


def sleeper(seconds):
    def fn():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass
    return fn


def test_cpu_timer_orders_and_scales_real_work():
    cfg = BenchConfig(rounds=5, min_block_s=2e-3, warmup_s=1e-3)
    fast, slow = sleeper(50e-6), sleeper(200e-6)
    m_fast, m_slow = CpuTimer(cfg).measure([BenchJob(key("a"), fast), BenchJob(key("b"), slow)], torch.device("cpu"))
    assert m_fast.samples == m_slow.samples == 5
    assert m_fast.p25_s <= m_fast.median_s <= m_fast.p75_s
    # busy-waits of 50us and 200us: the ratio is ~4; bounds are loose because other processes
    # on this 2-core machine stretch busy-waits (no speed target here, only the harness logic)
    assert m_slow.median_s > 2.0 * m_fast.median_s
    assert m_fast.median_s >= 50e-6


def test_cpu_timer_blocks_exceed_min_block():
    calls = []
    cfg = BenchConfig(rounds=3, min_block_s=1e-3, warmup_s=0)
    CpuTimer(cfg).measure([BenchJob(key(), lambda: calls.append(1))], torch.device("cpu"))
    # a near-free call needs many repetitions per block to last 1 ms
    assert len(calls) > 100


def test_cold_timer_never_repeats_a_pass_back_to_back():
    """Cold CPU timing: a block is one pass over a job's weight copies, and the next block is
    another job's, so no copy is read twice without the other jobs' copies read in between."""
    log = []

    def job(name, copies):
        state = {"i": 0}

        def fn():
            log.append((name, state["i"] % copies))
            state["i"] += 1
        return BenchJob(key(name), fn, calls=copies)

    cfg = BenchConfig(rounds=4, min_block_s=1e-4, warmup_s=0, cold_bytes=1 << 20)
    out = CpuTimer(cfg).measure([job("a", 3), job("b", 3), job("c", 3)], torch.device("cpu"))
    assert [m.samples for m in out] == [4, 4, 4]
    timed = log[3 * 3:]  # after the warm-up: one pass per job (warmup_s=0)
    passes = [timed[i:i + 3] for i in range(0, len(timed) - len(timed) % 3, 3)]
    assert len(passes) >= 12
    for p in passes:  # a pass is one call on each copy of ONE job
        assert len({n for n, _ in p}) == 1 and sorted(c for _, c in p) == [0, 1, 2]
    for p, q in zip(passes, passes[1:]):
        assert p[0][0] != q[0][0]

    log.clear()  # hot: each job repeats its block, calibrated to last min_block_s
    CpuTimer(BenchConfig(rounds=2, min_block_s=1e-4, warmup_s=0, cold_bytes=0)).measure(
        [job("a", 3), job("b", 3)], torch.device("cpu"))
    assert any(log[i] == log[i + 3] for i in range(len(log) - 3)) and ("a", 0) in log and ("b", 0) in log


def test_cpu_timer_restores_thread_count():
    before = torch.get_num_threads()
    CpuTimer(BenchConfig(rounds=1, min_block_s=1e-4, cpu_threads=1)).measure(
        [BenchJob(key(), lambda: torch.ones(4).sum())], torch.device("cpu"))
    assert torch.get_num_threads() == before
    with fixed_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_quantiles():
    assert quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert quantiles([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        quantiles([])


def test_fake_and_counting_timer():
    ran = []
    fake = FakeTimer(lambda k: {"a": 1e-6, "b": 3e-6}[k.candidate], spread=0.1)
    counting = CountingTimer(fake)
    out = counting.measure([BenchJob(key("a"), lambda: ran.append("a")), BenchJob(key("b"), lambda: ran.append("b"))],
                           torch.device("cpu"))
    assert [m.median_s for m in out] == [1e-6, 3e-6]
    assert out[0].p25_s == pytest.approx(0.9e-6) and out[0].p75_s == pytest.approx(1.1e-6)
    assert ran == ["a", "b"]
    assert counting.calls == 1 and len(counting.keys) == 2


def test_measurement_validation():
    with pytest.raises(ValueError):
        Measurement(-1.0, 0.0, 0.0, 1)
    with pytest.raises(ValueError):
        Measurement(1.0, 1.0, 1.0, 0)
    assert Measurement(2.0, 1.0, 3.0, 3).spread == pytest.approx(0.5)


def test_time_callables_side_by_side():
    out = time_callables({"fast": sleeper(20e-6), "slow": sleeper(100e-6)}, torch.device("cpu"),
                         BenchConfig(rounds=3, min_block_s=1e-3, warmup_s=0))
    assert out["slow"].median_s > out["fast"].median_s


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA timer needs a GPU")
def test_cuda_timer_graph_replay():
    from autoquant.bench import CudaTimer

    a = torch.randn(2048, 2048, device="cuda")
    small = torch.randn(256, 256, device="cuda")
    timer = CudaTimer(BenchConfig(cuda_samples=10))
    big_m, small_m = timer.measure([BenchJob(key("big"), lambda: a @ a), BenchJob(key("small"), lambda: small @ small)],
                                   torch.device("cuda"))
    assert big_m.samples == 10 and big_m.median_s > small_m.median_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA timer needs a GPU")
def test_cuda_timer_times_each_job_on_the_path_its_key_names():
    """EAGER: synchronized eager calls, host time included, so above the graph replay of the same
    call; a call that syncs on the host cannot be captured, and is never timed as a replay."""
    from autoquant.bench import CaptureError, CudaTimer

    dev = torch.device("cuda")
    x, w = torch.randn(1, 512, device=dev), torch.randn(512, 512, device=dev)
    timer = CudaTimer(BenchConfig(cuda_samples=10))
    graph, eager = timer.measure([BenchJob(key("g", Timed.FULL), lambda: x @ w),
                                  BenchJob(key("e", Timed.EAGER), lambda: x @ w)], dev)
    assert eager.median_s > graph.median_s > 0 and graph.samples == eager.samples == 10
    copies = [torch.randn(512, 512, device=dev) for _ in range(8)]
    it = iter(range(10**9))
    cycling = BenchJob(key("c", Timed.FULL), lambda: x @ copies[next(it) % 8], calls=8)
    assert timer.measure([cycling], dev)[0].median_s > 0  # a graph of up to 8 calls, one per copy
    syncing = lambda: (x @ w).sum().item()
    assert not timer.can_capture(BenchJob(key("s"), syncing), dev)
    with pytest.raises(CaptureError, match="Timed.EAGER"):
        timer.measure([BenchJob(key("s", Timed.FULL), syncing)], dev)
    assert timer.measure([BenchJob(key("s", Timed.EAGER), syncing)], dev)[0].median_s > 0
    assert timer.quick(BenchJob(key("s", Timed.EAGER), syncing), dev) > 0


def test_fake_capture_and_counting_timer_pass_the_capture_check_on():
    fake = FakeTimer(lambda k: 1e-6, capture=lambda k: k.candidate != "syncs")
    job = lambda name: BenchJob(key(name), lambda: None)
    counting = CountingTimer(fake)
    assert counting.can_capture(job("ok"), torch.device("cpu"))
    assert not counting.can_capture(job("syncs"), torch.device("cpu"))
    assert CountingTimer(FakeTimer(lambda k: 1e-6)).can_capture(job("syncs"), torch.device("cpu"))


def test_cold_target_follows_the_last_level_cache():
    from autoquant.bench import last_level_cache_bytes

    llc = last_level_cache_bytes()
    assert llc >= 1 << 20  # sysfs or the 32 MiB fallback: never zero
    assert BenchConfig().cold_target_bytes() == llc
    assert BenchConfig(cold_bytes=0).cold_target_bytes() == 0
    assert CpuTimer(BenchConfig(cold_bytes=123)).cold_bytes(torch.device("cpu")) == 123
    assert CountingTimer(CpuTimer(BenchConfig(cold_bytes=5))).cold_bytes(torch.device("cpu")) == 5
    assert CountingTimer(FakeTimer(lambda k: 1.0)).cold_bytes(torch.device("cpu")) == 0
    with pytest.raises(ValueError, match="cold_bytes"):
        BenchConfig(cold_bytes=-1)


def test_cold_copies_cycle_over_distinct_weights_with_equal_outputs():
    """Each timed call of a candidate reads a different copy of what it reads (so it comes from
    memory, not cache); the copies compute exactly what the original does, on the same eager
    path. A prepacked kernel reads its handle, not its plain weight: its copies have their own
    handles over views of one plain weight; other kernels' copies have their own buffers."""
    from autoquant.candidates import get_family
    from autoquant.candidates._cpu_ops import PREPACK_CACHE
    from autoquant.tune import _clones, _jobs_for, _read_bytes, _state_bytes

    torch.manual_seed(0)
    cand = get_family("int8_dynamic")(kernel="fbgemm")
    layer = cand.build(torch.randn(48, 64), torch.randn(48))
    buffers = sum(t.nbytes for t in layer.buffers())
    # fbgemm holds a prepacked copy of the int8 weight beside the buffers: counted as held, and
    # read instead of the int8 buffer
    assert _state_bytes(layer) >= buffers + 48 * 64
    assert _read_bytes(layer) == _state_bytes(layer) - 48 * 64
    copies = _clones(layer, 5)
    assert len(copies) == 5 and copies[0] is layer
    assert len({c.w_int8.data_ptr() for c in copies}) == 1  # views of one plain weight ...
    handles = {id(PREPACK_CACHE.get("fbgemm_int8", (c.w_int8, c.w_scale), None)) for c in copies}
    assert len(handles) == 5  # ... each with its own prepacked handle
    assert len({c.bias.data_ptr() for c in copies}) == 5
    assert all(c._hot is not None for c in copies)  # the same eager path as the layer
    x = torch.randn(3, 64)
    for c in copies:
        assert torch.equal(c(x), layer(x))
    aten = get_family("float")(kernel="aten").build(torch.randn(48, 64), None)
    assert len({c.weight.data_ptr() for c in _clones(aten, 3)}) == 3  # F.linear reads the weight

    seen = []
    for c in copies:
        c.register_forward_hook(lambda mod, args, out: seen.append(mod))
    op = OpShape(3, 64, 48, True, "float32")
    [job] = _jobs_for(cand, op, "env", [Timed.FULL], copies, [x])
    assert job.calls == 5  # one pass: each copy once
    for _ in range(10):
        job.fn()
    assert [id(m) for m in seen] == [id(copies[i % 5]) for i in range(10)]


def test_copies_share_one_budget_per_op():
    """The cold budget is for all of an op's candidates together, not for each one."""
    from autoquant.tune import copies_per_candidate

    assert copies_per_candidate([100, 300], 4000) == 10  # one pass of both reads 4000 bytes
    assert copies_per_candidate([100, 300], 4001) == 11
    assert copies_per_candidate([3000, 2000], 4000) == 1  # big enough to evict each other
    assert copies_per_candidate([100], 0) == 1  # hot timing
    assert copies_per_candidate([], 4000) == 1
    assert copies_per_candidate([1], 1 << 30) == 256  # capped


def test_candidates_of_one_weight_format_share_the_quantized_weight():
    """An op's int8 kernels read one int8 copy of its weight (each its own prepacked handle), and
    compute exactly what each would built alone."""
    from autoquant.candidates import FloatCandidate, Int8Dynamic
    from autoquant.config import TuneConfig
    from autoquant.tune import Trial, _OpBench

    op = OpShape(3, 64, 48, True, "float32")
    cands = [FloatCandidate("aten"), Int8Dynamic("fbgemm"), Int8Dynamic("onednn")]
    bench = _OpBench(op, "env", torch.device("cpu"), FakeTimer(lambda k: 1e-5), TuneConfig(),
                     {c: Trial(c) for c in cands})
    bench.build(cands)
    fb, dnn = bench.built[cands[1]], bench.built[cands[2]]
    assert fb.w_int8 is dnn.w_int8 and fb.w_scale is dnn.w_scale
    # what a call of each reads: its own handle (not the other's, built on the same int8 tensor)
    from autoquant.candidates._cpu_ops import PREPACK_CACHE
    from autoquant.tune import _read_bytes

    small = fb.w_scale.nbytes + fb.bias.nbytes
    assert _read_bytes(fb) == PREPACK_CACHE.held_for(list(fb.buffers()), "fbgemm_int8") + small
    assert _read_bytes(dnn) == PREPACK_CACHE.held_for(list(dnn.buffers()), "onednn_int8") + small
    x = bench.xs[0]
    for cand in cands[1:]:
        alone = cand.build(bench.weight, bench.bias)
        assert torch.equal(bench.built[cand](x), alone(x))
    # The baseline is timed the way a layer it wins runs after finalize: a plain nn.Linear (over
    # the op's weight itself), with cold copies like the others.
    from autoquant.tune import _clones, _read_bytes

    base = bench.built[cands[0]]
    assert type(base) is torch.nn.Linear and base.weight.data_ptr() == bench.weight.data_ptr()
    assert _read_bytes(base) == bench.weight.nbytes + bench.bias.nbytes
    copies = _clones(base, 3)
    assert [type(c) for c in copies] == [torch.nn.Linear] * 3
    assert len({c.weight.data_ptr() for c in copies}) == 3
    with torch.no_grad():
        assert all(torch.equal(c(x), torch.nn.functional.linear(x, bench.weight, bench.bias)) for c in copies)


@pytest.mark.parametrize("cold", [0, 1 << 20], ids=["hot", "cold"])
def test_budget_sets_the_sample_count(cold):
    """Within a time budget a job gets as many samples as fit, between min_samples and rounds: a
    2 ms call gets the minimum in a 1 ms budget and all rounds without one."""
    from autoquant.bench import measure_within

    cfg = BenchConfig(rounds=9, min_samples=3, min_block_s=1e-3, warmup_s=0, cold_bytes=cold)
    job = BenchJob(key("slow"), sleeper(2e-3))
    [tight] = measure_within(CpuTimer(cfg), [job], torch.device("cpu"), 1e-3)
    [free] = measure_within(CpuTimer(cfg), [job], torch.device("cpu"), None)
    [roomy] = measure_within(CpuTimer(cfg), [job], torch.device("cpu"), 10.0)
    assert tight.samples == 3 and free.samples == 9 and roomy.samples == 9
    [probe] = measure_within(CpuTimer(cfg), [job], torch.device("cpu"), 0.0, least=5)
    assert probe.samples == 5  # a caller may ask for more than the minimum (the tuner's probes)
    with pytest.raises(ValueError, match="min_samples"):
        BenchConfig(min_samples=0)


def test_budget_falls_back_to_measure_for_user_timers():
    """A user's timer without measure_within keeps its own sample count."""
    from autoquant.bench import measure_within

    class Mine:
        def quick(self, job, device):
            return 1.0

        def measure(self, jobs, device):
            return [Measurement(1.0, 1.0, 1.0, 7) for _ in jobs]

    [m] = measure_within(Mine(), [BenchJob(key(), lambda: None)], torch.device("cpu"), 0.0)
    assert m.samples == 7
    counting = CountingTimer(Mine())
    counting.measure_within([BenchJob(key(), lambda: None)], torch.device("cpu"), 0.5)
    assert counting.budgets == [(key(), 0.5)] and counting.calls == 1


def test_slow_calls_get_no_cold_copies():
    """Copies keep calls cold; a call that lasts far longer than reading its weights from memory
    gets one copy, so a timed pass of a slow kernel is one call, not a hundred."""
    from autoquant.candidates import FloatCandidate
    from autoquant.config import TuneConfig
    from autoquant.tune import Trial, _OpBench

    op = OpShape(3, 64, 48, True, "float32")
    cand = FloatCandidate("aten")
    bench = _OpBench(op, "env", torch.device("cpu"), CpuTimer(BenchConfig(cold_bytes=1 << 20)), TuneConfig(),
                     {cand: Trial(cand)})
    bench.build([cand])
    assert bench.copies_of(cand, 50) == 50  # no first call yet: cold copies as asked
    bench.first_calls[cand] = 1e-6
    assert bench.copies_of(cand, 50) == 50  # a short call: its weight read matters
    bench.first_calls[cand] = 0.5
    assert bench.copies_of(cand, 50) == 1
    [job] = bench.cold_jobs([cand], 50)
    assert job.calls == 1


def test_retime_drops_the_other_candidates_copies_before_copying_again(monkeypatch):
    """A close race between the two cheapest is timed again on fresh weight copies of those two;
    by the time those are made, the full run's copies of every other candidate are freed. They
    used to stay alive beside the new ones, so a retimed op set the tuning's memory peak
    (benchmarks/bench_memory.py). Fails with the full run's jobs kept through the retime."""
    import gc
    import weakref

    from autoquant import opbench
    from autoquant.candidates import default_candidates
    from autoquant.config import TuneConfig
    from autoquant.tune import Trial, _OpBench, _retime

    op = OpShape(8, 256, 256, True, "float32")
    cpu = torch.device("cpu")
    cands = [c for c in default_candidates(cpu, torch.float32)
             if c.name in ("float(kernel=aten, compute_dtype=None)", "int8_dynamic(kernel=fbgemm)",
                           "int8_weight_only(kernel=int8pack)", "float(kernel=onednn, compute_dtype=None)")]
    assert len(cands) == 4
    bench = _OpBench(op, "env", cpu, CpuTimer(BenchConfig(cold_bytes=1 << 20, rounds=3)),
                     TuneConfig(), {c: Trial(c) for c in cands})
    bench.build(cands)
    copies: dict[object, list[weakref.ref]] = {}
    real_clones = opbench._clones

    def tracked(module, n):  # the real _clones, remembering what it made for whom
        out = real_clones(module, n)
        owner = next(c for c, m in bench.built.items() if m is module)
        copies.setdefault(owner, []).extend(weakref.ref(m) for m in out[1:])
        return out

    monkeypatch.setattr(opbench, "_clones", tracked)
    jobs = bench.cold_jobs(list(bench.built), 3)
    assert all(len(copies[c]) == 2 for c in bench.built)  # 3 per candidate: the layer + 2 copies
    # Figures that make the first two a close race (1% apart), the others 10-40x dearer.
    top = list(bench.built)[:2]
    seconds = {c: 1e-4 * (1 + 0.01 * i) if c in top else 1e-3 * (1 + i) for i, c in enumerate(bench.built)}
    measured = {j.key: Measurement(seconds[bench.owners[j.key]], seconds[bench.owners[j.key]],
                                   seconds[bench.owners[j.key]], 3) for j in jobs}
    alive_when_copying: list[int] = []
    real_cold_jobs = bench.cold_jobs

    def cold_jobs(cands, n, **kw):  # the real cold_jobs, counting the others' copies still alive
        gc.collect()
        alive_when_copying.append(sum(r() is not None for c in bench.built if c not in top for r in copies[c]))
        return real_cold_jobs(cands, n, **kw)

    monkeypatch.setattr(bench, "cold_jobs", cold_jobs)
    _retime(bench, list(bench.built), jobs, measured, None)
    assert alive_when_copying == [0], alive_when_copying  # the retime happened, with no stale copies
    assert jobs == []  # the caller's list was emptied
