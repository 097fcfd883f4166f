"""A device scalar read on the host without waiting for the work queued after it.

`tensor.item()` waits for everything queued on the stream so far. The training loop queues the next step before
it reads the last one's gradient norm (and, under torchrun, the ranks' stop flag): the GPU does not run dry while
Python waits, and the host stays at most one step ahead.
"""

from __future__ import annotations

import torch
from torch import Tensor


class HostScalar:
    """A 0-dim tensor's value, copied to pinned host memory behind the work queued so far; item() waits for that
    work only (at once for a tensor on the CPU)."""

    def __init__(self, value: Tensor):
        self._ready = None
        if value.device.type == "cuda":
            self._host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self._host.copy_(value.detach(), non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = value.detach()

    def item(self) -> float | int | bool:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.item()
