"""The timing harness: real CPU timer behaviour, the fake and counting timers."""

import time

import pytest
import torch

from autoquant.bench import (BenchConfig, BenchJob, CountingTimer, CpuTimer, FakeTimer, fixed_threads,
                             quantiles, time_callables)
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
