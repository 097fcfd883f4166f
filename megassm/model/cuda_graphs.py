"""The blocks' forward and backward replayed as CUDA graphs, in pieces between their collectives.

Why: a Mamba-2 block launches a few hundred small kernels (mamba-ssm's SSD alone is ~30 Triton
launches through Python autotuner wrappers). At 130M parameters and 8 x 2048 tokens the GPU work of
a training step is ~90 ms while issuing it from Python takes ~240 ms: the GPU waits on the CPU. One
graph replays the forward kernels of every block with one launch, another their backward. (Graphs of the
whole stack rather than one per block: no copies of activations into and out of per-block graphs; the
price is that gradients appear only when the whole backward is done.)

Under TP, SP and CP the blocks communicate, and a collective is not captured: each pass is captured as
graphs that end where a collective is issued (parallel/collectives.py hands the communication here), and
replays as graph, collective, graph, ... with each collective run again on the tensors it ran on at
capture, on whatever backend the job uses. Per layer that is a few launches instead of hundreds; without
collectives (tp = cp = 1) each pass is one graph.

The graphs are captured at the first forward pass that wants gradients, from that batch's shapes
(the trainer's micro batch); any other shape or grad mode runs the ordinary blocks. A graph's
parameter gradients come out of static buffers, which the next replay overwrites. Where a parameter has
no `.grad`, autograd adopts the buffer as `.grad`: right with one micro batch per step (the optimizer
drops the gradients after its step, so no fp32 add of every gradient and no zeroing, ~2% of a 780m
step), wrong with several, whose gradients must be summed: then the trainer's engine zeroes `.grad` in
place and autograd adds the buffers into it. Capture allocates every parameter's `.grad`, so the first
step adds in either case.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from parallel.collectives import Communication, collectives_through
from parallel.graph_stream import on_graph_stream

Blocks = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]
WARMUP_PASSES = 3  # as torch.cuda.make_graphed_callables: lazy initialisation (Triton's compilation, autotuning) before capture


class _Pieces:
    """One pass captured as CUDA graphs in order, sharing a memory pool, with the collectives between them."""

    def __init__(self, pool: tuple[int, int]):
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.steps: list[Callable[[], object]] = []  # the graphs' replays and the collectives, in order

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Capture the kernels launched in the block on the current stream; collectives end a graph and start the next."""
        self._begin()
        with warnings.catch_warnings(), collectives_through(self._between):
            warnings.filterwarnings("ignore", "The CUDA Graph is empty")  # a pass may end with a collective
            yield
            self._end()

    def replay(self) -> None:
        for step in self.steps:
            step()

    def _begin(self) -> None:
        self.graphs.append(torch.cuda.CUDAGraph())
        # Relaxed: a collective of the backward ends a graph from autograd's thread, not the one that began it.
        self.graphs[-1].capture_begin(pool=self.pool, capture_error_mode="relaxed")

    def _end(self) -> None:
        self.graphs[-1].capture_end()
        self.steps.append(self.graphs[-1].replay)

    def _between(self, communicate: Communication) -> None:
        """A collective at capture: not run now (the captured kernels have not run, its tensors hold nothing yet), but
        between this graph and the next at every replay."""
        self._end()
        self.steps.append(communicate)
        self._begin()


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: BlockGraphs, *inputs: Tensor | None) -> tuple[Tensor, ...]:
        ctx.graphs = graphs
        for static, given in zip(graphs.inputs, inputs):  # (h, seq_idx, halo_seq_idx); the parameters follow, for autograd
            if static is not None and static.data_ptr() != given.data_ptr():
                static.copy_(given)
        graphs.forward_pass.replay()
        return tuple(out.detach() for out in graphs.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        graphs = ctx.graphs
        for static, grad in zip(graphs.grad_outputs, grads):
            if static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        graphs.backward_pass.replay()
        grad_h = None if graphs.grad_h is None else graphs.grad_h.detach()
        # Detached, the buffers can become .grad without a copy (autograd adopts a gradient nothing else references).
        return None, grad_h, None, None, *(grad.detach() for grad in graphs.grad_params)


class BlockGraphs:
    """CUDA graphs of `run(h, seq_idx, halo_seq_idx)`, the blocks in order, for inputs shaped like these
    (halo_seq_idx: the previous CP rank's last document ids, or None)."""

    def __init__(self, run: Blocks, blocks: nn.ModuleList, h: Tensor, seq_idx: Tensor, halo_seq_idx: Tensor | None):
        device = h.device.type
        if torch.is_autocast_enabled(device) and torch.is_autocast_cache_enabled():
            raise RuntimeError("CUDA graphs of the blocks need torch.autocast(..., cache_enabled=False)")
        self.meta = self._meta(h, seq_idx, halo_seq_idx)
        self.params = tuple(p for p in blocks.parameters() if p.requires_grad)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.inputs = (h.detach().clone().requires_grad_(h.requires_grad), seq_idx.clone(),
                       None if halo_seq_idx is None else halo_seq_idx.clone())
        wrt = (self.inputs[0], *self.params) if h.requires_grad else self.params
        pool = torch.cuda.graph_pool_handle()
        self.forward_pass, self.backward_pass = _Pieces(pool), _Pieces(pool)
        with on_graph_stream(h.device):
            for _ in range(WARMUP_PASSES):
                outputs = run(*self.inputs)
                torch.autograd.grad(outputs, wrt, [torch.zeros_like(out) for out in outputs])
            del outputs
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            with self.forward_pass.capture():
                self.outputs = run(*self.inputs)
            self.grad_outputs = tuple(torch.empty_like(out) for out in self.outputs)
            with self.backward_pass.capture():
                grads = torch.autograd.grad(self.outputs, wrt, self.grad_outputs)
        self.grad_h = grads[0] if h.requires_grad else None
        self.grad_params = grads[1:] if h.requires_grad else grads

    @staticmethod
    def _meta(h: Tensor, seq_idx: Tensor | None, halo_seq_idx: Tensor | None) -> tuple:
        device = h.device.type
        return ([None if t is None else (t.shape, t.dtype) for t in (h, seq_idx, halo_seq_idx)],
                (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))

    def matches(self, h: Tensor, seq_idx: Tensor | None, halo_seq_idx: Tensor | None) -> bool:
        return seq_idx is not None and self._meta(h, seq_idx, halo_seq_idx) == self.meta

    def __call__(self, h: Tensor, seq_idx: Tensor, halo_seq_idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """(residual stream, last block's output not yet added), as the blocks return them."""
        return _Replay.apply(self, h, seq_idx, halo_seq_idx, *self.params)
