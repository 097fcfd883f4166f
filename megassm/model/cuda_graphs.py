"""The blocks' forward and backward replayed as two CUDA graphs (torch.cuda.make_graphed_callables).

Why: a Mamba-2 block launches a few hundred small kernels (mamba-ssm's SSD alone is ~30 Triton
launches through Python autotuner wrappers). At 130M parameters and 8 x 2048 tokens the GPU work of
a training step is ~90 ms while issuing it from Python takes ~240 ms: the GPU waits on the CPU. One
graph replays the forward kernels of every block with one launch, another their backward. (One
graph for the whole stack rather than one per block: no copies of activations into and out of
per-block graphs; the price is that gradients appear only when the whole backward graph is done.)

The graphs are captured at the first forward pass that wants gradients, from that batch's shapes
(the trainer's micro batch); any other shape, CP halo or grad mode runs the ordinary blocks. A graph's
parameter gradients come out of static buffers, which the next replay overwrites. Where a parameter has
no `.grad`, autograd adopts the buffer as `.grad`: right with one micro batch per step (the optimizer
drops the gradients after its step, so no fp32 add of every gradient and no zeroing, ~2% of a 780m
step), wrong with several, whose gradients must be summed: then the trainer's engine zeroes `.grad` in
place and autograd adds the buffers into it. Capture allocates every parameter's `.grad`, so the first
step adds in either case.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class _Stack(nn.Module):
    """The blocks run in order by `run`, with tensor arguments only, as make_graphed_callables needs."""

    def __init__(self, run: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], blocks: nn.ModuleList):
        super().__init__()
        self.run, self.blocks = run, blocks  # blocks: registered so that their parameters are the graphs' parameters

    def forward(self, h: Tensor, seq_idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.run(h, seq_idx)


class BlockGraphs:
    """CUDA graphs of `run(h, seq_idx)`, the blocks in order, for inputs shaped like (h, seq_idx)."""

    def __init__(self, run: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], blocks: nn.ModuleList, h: Tensor, seq_idx: Tensor):
        device = h.device.type
        if torch.is_autocast_enabled(device) and torch.is_autocast_cache_enabled():
            raise RuntimeError("CUDA graphs of the blocks need torch.autocast(..., cache_enabled=False)")
        self.h_meta, self.seq_meta = (h.shape, h.dtype), (seq_idx.shape, seq_idx.dtype)
        self.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        for p in blocks.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        sample = (torch.zeros_like(h).requires_grad_(h.requires_grad), seq_idx.clone())
        self.stack = torch.cuda.make_graphed_callables(_Stack(run, blocks), sample)

    def matches(self, h: Tensor, seq_idx: Tensor | None, halo_seq_idx: Tensor | None) -> bool:
        device = h.device.type
        return (seq_idx is not None and halo_seq_idx is None and (h.shape, h.dtype) == self.h_meta
                and (seq_idx.shape, seq_idx.dtype) == self.seq_meta
                and (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) == self.autocast)

    def __call__(self, h: Tensor, seq_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(residual stream, last block's output not yet added), as the blocks return them."""
        return self.stack(h, seq_idx)
