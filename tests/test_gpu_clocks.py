"""The benchmark's clock and power sampling (tools/gpu_clocks.py) and the columns tools/bench.py builds from it."""

import itertools
import threading
import time

from tools import bench
from tools.gpu_clocks import Sampler, nvml_reader


def test_sampler_reads_in_a_thread_until_the_block_ends_and_gives_the_median_clock_and_highest_power():
    values = itertools.count()
    threads = set()

    def read():
        threads.add(threading.get_ident())
        n = next(values)
        return float(n), 10.0 * n

    with Sampler(read, interval_s=0.01) as sampler:
        time.sleep(0.1)
    taken = len(sampler.samples)
    time.sleep(0.05)
    assert len(sampler.samples) == taken >= 3  # stopped with the block
    assert threads and threading.get_ident() not in threads
    clocks = sorted(s[0] for s in sampler.samples)
    assert sampler.summary() == {"sm_mhz": (clocks[(taken - 1) // 2] + clocks[taken // 2]) / 2, "power_w": 10.0 * (taken - 1)}


def test_sampler_without_a_reader_reads_nothing():
    with Sampler(None) as sampler:
        pass
    assert sampler.summary() == {} and sampler.samples == []


def test_no_reader_where_there_is_no_nvidia_driver_or_no_such_gpu():
    assert nvml_reader("GPU-00000000-0000-0000-0000-000000000000") is None


def test_timed_steps_sample_the_clocks_during_the_timed_steps_only(monkeypatch):
    calls, during = [], []

    def step(i):
        calls.append(i)
        time.sleep(0.03)
        return i

    def read():
        during.append(len(calls))  # steps begun when read
        return 1500.0, 600.0 + len(during)

    monkeypatch.setattr(bench, "cuda_reader", lambda: read)
    first, seconds, results, clocks = bench.timed_steps(step, warmup=2, steps=3, started=time.perf_counter())
    assert calls == results == [0, 1, 2, 3, 4] and first > 0 and seconds >= 0.03
    assert during and min(during) >= 2  # no reading during the warm-up steps
    assert clocks == {"sm_mhz": 1500.0, "power_w": 600.0 + len(during)}
    monkeypatch.setattr(bench, "cuda_reader", lambda: None)  # no NVML: no clocks
    assert bench.timed_steps(step, warmup=1, steps=1, started=time.perf_counter())[3] == {}


def test_rows_show_clocks_and_both_ratios_to_the_peer():
    peer = {"step_s": 0.3, "tokens": 3000, "flops_per_token": 1e9, "peak_flops": 1e13, "peak_gib": 40.0, "first_step_s": 20.0,
            "sm_mhz": 1965.0, "power_w": 589.4, "profile": {"matmuls": 150.0, "other": 50.0}}
    mine = dict(peer, step_s=0.2, sm_mhz=1755.0, power_w=687.0, profile={"matmuls": 140.0, "other": 20.0})
    shown = bench.describe(mine)
    assert (shown["tokens/s"], shown["MFU"], shown["SM MHz"], shown["W"]) == ("15,000", "150.0%", "1755", "687")
    assert bench.ratio(peer, mine, bench.wall_time) == "1.50x"
    assert bench.ratio(peer, mine, bench.gpu_time) == "1.25x"  # 200 ms of kernels against 160
    assert bench.ratio({}, mine, bench.wall_time) == "-" and bench.ratio(peer, dict(mine, profile={}), bench.gpu_time) == "-"
    without = bench.describe({key: value for key, value in mine.items() if key not in ("sm_mhz", "power_w")})
    assert (without["SM MHz"], without["W"]) == ("-", "-")
    assert list(bench.describe({"oom": True})) == list(shown)  # a failed row has the same columns
