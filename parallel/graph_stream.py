"""One side stream per device, on which the blocks' CUDA graphs are captured (megassm/model/cuda_graphs.py) and, for a
graphed model, the data-parallel engines make the gradient accumulators they keep (DDP's, DeepSpeed's).

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


def engine_stream(graphed: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """Where a data-parallel engine (DDP, DeepSpeed: each keeps its parameters' gradient accumulators) is built: on
    graph_stream for a model whose blocks run as CUDA graphs (`graphed`), else where it is. torch (2.10 and later) warns
    once of an accumulator kept from an earlier step on another stream than its gradient: for a graphed model that is
    the point, so the call turns the warning off (for the process)."""
    if not graphed or device.type != "cuda":
        return contextlib.nullcontext()
    switch = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if switch is not None:
        switch(False)
    return on_graph_stream(device)


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
