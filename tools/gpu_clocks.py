"""The GPU's SM clock and power while a benchmark runs: NVML (the driver's library) read from a thread.

Why: an H200 at its 700 W limit lowers its clock, and every kernel slows with it. megassm's steps hold the board at
the limit (1,695-1,755 MHz), the peer's, whose GPU waits on its host between kernels, ran at up to 1,965 MHz in the
same call (bench/RESULTS.md): two rows, or one kernel timed alone and inside a step, compare only with their clocks.
At the limit a step takes as long as its energy allows, so the energy per step compares two systems as if both ran
at the same power. The power is read from the board's energy counter, which moves about every 100 ms (an H200):
between the first and the last time it moved within the run, read every 10 ms, rather than from its two ends (a
window of a few steps would be off by up to 100 ms of energy) or from the power reading (a one-second average).
torch.cuda.clock_rate and power_draw read the clock and power through the nvidia-ml-py package, which megassm does
not install; the driver's library is there wherever a CUDA GPU is.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import threading
import time
from typing import Callable

NVML_CLOCK_SM = 1  # nvmlClockType_t

Reader = Callable[[], tuple[float, float]]  # () -> (SM clock MHz, the board's energy in joules since the driver loaded)


def nvml_reader(uuid: str) -> Reader | None:
    """A Reader of the GPU with this UUID ("GPU-..."), or None where NVML is not there (no NVIDIA driver) or does not
    know the GPU. The energy is nan where the GPU has no energy counter (before Volta)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    handle = ctypes.c_void_p()
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
        return None
    mhz, millijoules = ctypes.c_uint(), ctypes.c_ulonglong()

    def read() -> tuple[float, float]:
        nvml.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM, ctypes.byref(mhz))
        counted = nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(millijoules)) == 0
        return float(mhz.value), millijoules.value / 1e3 if counted else math.nan

    return read


def cuda_reader() -> Reader | None:
    """nvml_reader of the current CUDA device, or None (no CUDA, no NVML)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return nvml_reader(f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}")


class Sampler:
    """Calls `read` (returning (SM clock MHz, energy J)) every `interval_s` seconds in a thread while the `with` block
    runs."""

    def __init__(self, read: Reader | None, interval_s: float = 0.01):
        self.read, self.interval_s, self.samples = read, interval_s, []  # samples: (seconds, MHz, J)
        self._stop, self._thread = threading.Event(), None

    def __enter__(self) -> Sampler:
        if self.read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), *self.read()))
            if self._stop.wait(self.interval_s):
                return

    def summary(self) -> dict[str, float]:
        """{"sm_mhz": the median clock, "power_w": the mean power} of the samples ({} without any; no power where the
        energy counter moved fewer than twice, or is not there). The power: the energy between the first and the last
        reading at which the counter had moved, over the time between them."""
        if not self.samples:
            return {}
        result = {"sm_mhz": statistics.median(mhz for _, mhz, _ in self.samples)}
        moved = [(t, joules) for (_, _, before), (t, _, joules) in zip(self.samples, self.samples[1:]) if joules != before]
        if len(moved) >= 2 and all(math.isfinite(joules) for _, joules in moved):
            (start, first), (end, last) = moved[0], moved[-1]
            result["power_w"] = (last - first) / (end - start)
        return result
