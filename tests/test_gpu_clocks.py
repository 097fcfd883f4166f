"""The benchmark's clock and power readings (tools/gpu_clocks.py) and the columns tools/bench.py builds from them."""

import itertools
import math
import threading
import time
from types import SimpleNamespace
from typing import Callable

import pytest

from tools import bench, gpu_clocks
from tools.gpu_clocks import Sampler, nvml_reader


def counter(joules_per_second: float, period_s: float, started: float, clock: Callable[[], float] = time.perf_counter):
    """An energy counter as a board keeps one: moving every `period_s` seconds of `clock` by the energy used since."""
    return lambda: joules_per_second * period_s * ((clock() - started) // period_s)


def test_sampler_reads_in_a_thread_until_the_block_ends(monkeypatch):
    """The clock's median; the power from the readings at which the energy counter had moved, not from the block's ends.
    The sampler's clock is the test's (20 ms a reading, however late the thread runs on a loaded machine): a counter
    moving every 100 ms, 1 ms before the first reading, moves 60 J between readings 100 ms apart (600 W)."""
    clocks, threads, now = itertools.count(1000), set(), itertools.count(0.0, 0.02)
    seconds = []
    monkeypatch.setattr(gpu_clocks, "time", SimpleNamespace(perf_counter=lambda: seconds.append(next(now)) or seconds[-1]))
    energy = counter(600.0, 0.1, -0.001, clock=lambda: seconds[-1])

    def read():
        threads.add(threading.get_ident())
        return float(next(clocks)), energy()

    with Sampler(read, interval_s=0.002) as sampler:
        time.sleep(0.35)
    taken = len(sampler.samples)
    time.sleep(0.05)
    assert len(sampler.samples) == taken >= 20  # stopped with the block
    assert threads and threading.get_ident() not in threads
    summary = sampler.summary()
    assert summary["sm_mhz"] == 1000 + (taken - 1) / 2  # the median of 1000, 1001, ...
    assert math.isclose(summary["power_w"], 600.0, rel_tol=1e-9)
    sampler.samples = [(0.0, 1000, 0.0), (0.06, 1000, 60.0), (0.16, 1000, 120.0), (0.25, 1000, 120.0)]
    assert math.isclose(sampler.summary()["power_w"], 600.0)  # the ends alone: 480 W


def test_sampler_without_a_reader_an_energy_counter_or_two_moves_of_it():
    with Sampler(None) as sampler:
        pass
    assert sampler.summary() == {} and sampler.samples == []
    for energy in (lambda: math.nan, counter(600.0, 10.0, time.perf_counter() - 9.99)):  # none; moves once in the block
        with Sampler(lambda e=energy: (1500.0, e()), interval_s=0.005) as sampler:
            time.sleep(0.05)
        assert sampler.summary() == {"sm_mhz": 1500.0}


def test_no_reader_where_there_is_no_nvidia_driver_or_no_such_gpu():
    assert nvml_reader("GPU-00000000-0000-0000-0000-000000000000") is None


def test_timed_steps_measure_the_timed_steps_only(monkeypatch):
    """No reading during the warm-up steps; the mean power from the counter's moves during the timed ones; the host's
    time from the last warm-up step, begun with the GPU idle."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls, during, events = [], [], []
    energy = counter(500.0, 0.01, time.perf_counter())

    def step(i):
        calls.append(i)
        events.append(("step", i))
        time.sleep(0.2 if i == 2 else 0.05)
        return i

    def read():
        during.append(len(calls))  # steps begun when read
        return 1500.0, energy()

    monkeypatch.setattr(bench, "cuda_reader", lambda: read)
    monkeypatch.setattr(bench, "synchronize", lambda: events.append(("synchronize", None)))
    first, seconds, results, measured = bench.timed_steps(step, warmup=3, steps=3, started=time.perf_counter())
    assert calls == results == [0, 1, 2, 3, 4, 5] and first > 0 and 0.05 <= seconds < 0.2
    assert events[events.index(("step", 2)) - 1] == ("synchronize", None)  # the last warm-up step begun from idle
    assert during and min(during) >= 3  # no reading during the warm-up steps
    assert measured["sm_mhz"] == 1500.0 and math.isclose(measured["power_w"], 500.0, rel_tol=0.1)
    assert measured["host_s"] >= 0.2 and "syncs" not in measured  # step 2's; no CUDA: no count of waits
    monkeypatch.setattr(bench, "cuda_reader", lambda: None)  # no NVML: no clock nor power
    assert set(bench.timed_steps(step, warmup=2, steps=1, started=time.perf_counter())[3]) == {"host_s"}
    calls.clear()
    assert bench.timed_steps(step, warmup=1, steps=1, started=time.perf_counter())[3] == {} and calls == [0, 1]  # step 0 compiles
    calls.clear()
    assert bench.timed_steps(step, warmup=0, steps=1, started=time.perf_counter())[2:] == ([0], {}) and calls == [0]


def test_queued_from_idle_counts_the_synchronizing_calls(monkeypatch):
    """Each of the debug mode's warnings about a synchronizing operation counts, also one line's repeated; not its
    notice; other warnings go where the caller's filters send them (also "error"); the mode it found is restored, also
    where the step fails."""
    import warnings

    import torch

    modes = [2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    steps, idle = [], []
    monkeypatch.setattr(bench, "synchronize", lambda: idle.append(len(steps)))  # steps begun when synchronized

    def step():
        steps.append(1)
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations")
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation (Triggered internally at c10/cuda)")
        warnings.warn("some other warning")
        time.sleep(0.05)

    with warnings.catch_warnings(record=True) as passed_on:
        warnings.simplefilter("once")  # as Python's default filters would show them: the count must not depend on that
        measured = bench.queued_from_idle(step)
    assert measured["syncs"] == 3 and measured["host_s"] >= 0.05 and modes == [2, "warn", 2]
    assert idle[0] == 0  # the GPU idle before the step
    assert [str(w.message) for w in passed_on] == ["some other warning"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="some other warning"):  # raised where it is warned
            bench.queued_from_idle(step)
    assert modes[-1] == 2
    with pytest.raises(RuntimeError):
        bench.queued_from_idle(lambda: (_ for _ in ()).throw(RuntimeError("step failed")))
    assert modes[-1] == 2


def test_rows_show_clocks_energy_and_the_ratios_to_the_peer():
    peer = {"step_s": 0.3, "tokens": 3000, "flops_per_token": 1e9, "peak_flops": 1e13, "peak_gib": 40.0, "reserved_gib": 44.5,
            "first_step_s": 20.0, "sm_mhz": 1965.0, "power_w": 600.0, "profile": {"matmuls": 150.0, "other": 50.0}}
    mine = dict(peer, step_s=0.2, sm_mhz=1755.0, power_w=700.0, profile={"matmuls": 140.0, "other": 20.0})
    shown = bench.describe(mine)
    assert (shown["tokens/s"], shown["MFU"], shown["SM MHz"], shown["W"], shown["tokens/J"]) == ("15,000", "150.0%", "1755", "700", "21.4")
    assert (shown["peak GiB"], shown["reserved GiB"], shown["host ms"], shown["GPU waits"]) == ("40.0", "44.5", "-", "-")
    timed_host = bench.describe(dict(mine, host_s=0.0183, syncs=0))
    assert (timed_host["host ms"], timed_host["GPU waits"]) == ("18", "0")
    assert bench.ratio(peer, mine, bench.wall_time) == "1.50x"
    assert bench.ratio(peer, mine, bench.gpu_time) == "1.25x"  # 200 ms of kernels against 160
    assert bench.ratio(peer, mine, bench.step_energy) == "1.29x"  # 180 J per step (600 W x 0.3 s) against 140
    assert bench.ratio({}, mine, bench.wall_time) == "-" and bench.ratio(peer, dict(mine, profile={}), bench.gpu_time) == "-"
    without = bench.describe({key: value for key, value in mine.items() if key not in ("sm_mhz", "power_w")})
    assert (without["SM MHz"], without["W"], without["tokens/J"]) == ("-", "-", "-")
    assert bench.ratio(peer, {key: value for key, value in mine.items() if key != "power_w"}, bench.step_energy) == "-"
    assert list(bench.describe({"oom": True})) == list(shown)  # a failed row has the same columns
