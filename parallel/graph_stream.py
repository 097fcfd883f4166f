"""One side stream per device, on which the blocks' CUDA graphs are captured (megassm/model/cuda_graphs.py) and DDP
makes its gradient accumulators (parallel/data_parallel.py).

Why one: a parameter's gradient accumulator keeps the stream that was current at its making, and a backward pass syncs
each parameter's gradient with that stream. Made on the capture stream, the sync is a no-op. Made on another stream, it
forks that stream into the capture, joined only when the whole backward ends, so a capture that ends at a collective
fails; made on the default (legacy) stream, CUDA forbids the sync during a capture.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_streams: dict[int, torch.cuda.Stream] = {}


def graph_stream(device: torch.device) -> torch.cuda.Stream:
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(index)
    return _streams[index]


@contextlib.contextmanager
def on_graph_stream(device: torch.device) -> Iterator[None]:
    """On CUDA, the block's work on graph_stream(device), after the current stream's work so far and before what follows."""
    if device.type != "cuda":
        yield
        return
    stream, current = graph_stream(device), torch.cuda.current_stream(device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        current.wait_stream(stream)
