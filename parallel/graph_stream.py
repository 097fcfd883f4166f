"""One side stream per device, on which the blocks' CUDA graphs are captured (megassm/model/cuda_graphs.py) and the
data-parallel engines make the gradient accumulators they keep (DDP's, DeepSpeed's).

Why one: a parameter's gradient accumulator keeps the stream that was current at its making, and a backward pass syncs
each parameter's gradient with that stream. Made on the capture stream, the sync is a no-op. Made on another stream, it
forks that stream into the capture, joined only when the whole backward ends, so a capture that ends at a collective
fails; made on the default (legacy) stream, CUDA forbids the sync during a capture. A step's backward, outside the
capture, then hands the blocks' gradients from the caller's stream to accumulators of this one: one stream sync each.
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
def engine_on_graph_stream(device: torch.device) -> Iterator[None]:
    """Build a data-parallel engine (DDP, DeepSpeed: each keeps its parameters' gradient accumulators) on graph_stream.
    torch warns once of an accumulator that was kept from an earlier step and is on another stream than its gradient:
    here that is the point, so the warning is turned off."""
    if device.type == "cuda":
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    with on_graph_stream(device):
        yield


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
