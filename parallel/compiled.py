"""torch.compile where it pays: on CUDA, when the caller asks.

It lives in `parallel`, the bottom layer, because the chunked loss (parallel/chunked_loss.py) compiles
its per-chunk steps and `parallel` imports nothing from megassm; megassm.ops re-exports it for the
model's norms and conv."""

from __future__ import annotations

import functools
from typing import Callable

import torch


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)


def maybe_compiled(fn: Callable, enabled: bool, device: torch.device) -> Callable:
    """`fn` through torch.compile when enabled and on CUDA, else `fn` itself (CPU runs and tests stay eager).
    Why: chains of elementwise ops become one or two kernels, and the backward recomputes cheap
    intermediates instead of keeping them. One compiled function per `fn`, shared by every caller."""
    return _compiled(fn) if enabled and device.type == "cuda" else fn
