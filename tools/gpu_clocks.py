"""The GPU's SM clock and board power while a benchmark runs: NVML (the driver's library) read from a thread.

Why: an H200 at its 700 W limit lowers its clock, and every kernel slows with it. megassm's steps hold the board at
the limit (1,710-1,755 MHz), the peer's, whose GPU waits on its host between kernels, ran at up to 1,965 MHz in the
same call (bench/RESULTS.md): two rows, or one kernel timed alone and inside a step, compare only with their clocks.
torch.cuda.clock_rate and power_draw read the same through the nvidia-ml-py package, which megassm does not install;
the driver's library is there wherever a CUDA GPU is.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
from typing import Callable

NVML_CLOCK_SM = 1  # nvmlClockType_t


def nvml_reader(uuid: str) -> Callable[[], tuple[float, float]] | None:
    """A function returning (SM clock MHz, board power W) of the GPU with this UUID ("GPU-..."), or None where NVML is
    not there (no NVIDIA driver) or does not know the GPU."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    handle = ctypes.c_void_p()
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle)) != 0:
        return None
    mhz, milliwatts = ctypes.c_uint(), ctypes.c_uint()

    def read() -> tuple[float, float]:
        nvml.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM, ctypes.byref(mhz))
        nvml.nvmlDeviceGetPowerUsage(handle, ctypes.byref(milliwatts))
        return float(mhz.value), milliwatts.value / 1e3

    return read


def cuda_reader() -> Callable[[], tuple[float, float]] | None:
    """nvml_reader of the current CUDA device, or None (no CUDA, no NVML)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return nvml_reader(f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}")


class Sampler:
    """Calls `read` (returning (SM clock MHz, board power W)) every `interval_s` seconds in a thread while the `with`
    block runs."""

    def __init__(self, read: Callable[[], tuple[float, float]] | None, interval_s: float = 0.05):
        self.read, self.interval_s, self.samples = read, interval_s, []
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
            self.samples.append(self.read())
            if self._stop.wait(self.interval_s):
                return

    def summary(self) -> dict[str, float]:
        """{"sm_mhz": the median clock, "power_w": the highest power} of the samples ({} without any). The highest: the
        board averages its power over about a second, so the first readings of a run still count the idle time before
        it, the last ones the run alone."""
        if not self.samples:
            return {}
        clocks, powers = zip(*self.samples)
        return {"sm_mhz": statistics.median(clocks), "power_w": max(powers)}
