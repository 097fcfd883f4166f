"""The blocks' forward and backward replayed as CUDA graphs, in pieces between their collectives.

Why: a Mamba-2 block launches a few hundred small kernels (mamba-ssm's SSD alone is ~30 Triton
launches through Python autotuner wrappers). At 130M parameters and 8 x 2048 tokens the GPU work of
a training step is ~90 ms while issuing it from Python takes ~240 ms: the GPU waits on the CPU. One
graph replays the forward kernels of a group of blocks with one launch, another their backward. A group
reads the previous group's outputs where that group's graph wrote them: nothing is copied between groups.
Its parameters' gradients appear when its backward is done, so the trainer takes one group for all blocks
where nothing waits for gradients, and several on several replicas, whose sums over the ranks (DDP's; ZeRO-2's, not
measured on several GPUs) then run during the earlier groups' backward instead of after the whole backward.

Under TP, SP and CP the blocks communicate, and a collective is not captured: each pass is captured as
graphs that end where a collective is issued (parallel/collectives.py hands the communication here), and
replays as graph, collective, graph, ... with each collective run again on the tensors it ran on at
capture, on whatever backend the job uses. Per layer that is a few launches instead of hundreds; without
collectives (tp = cp = 1) each pass is one graph.

The graphs are captured at the first forward pass that wants gradients, from that batch's shapes
(the trainer's micro batch); any other shape runs the ordinary blocks, and a pass of that shape without
gradients (validation) replays the forward graphs. A forward replay overwrites what the previous one kept
for its backward: a pass's backward must come before the next forward of that shape (a backward
after another forward raises). A graph's parameter gradients come out of static buffers, which the
next replay overwrites. Where a parameter has no `.grad`, autograd adopts the buffer as `.grad`: with
one micro batch per step the optimizer drops the gradients after its step, so there is no fp32 add of
every gradient and no zeroing (~2% of a 780m step). With several, whose gradients are summed, the
trainer's engine zeroes `.grad` in place and autograd adds the buffers into it; a `.grad` that is still
an adopted buffer is copied before the next pass's first replay (all graphs share one pool: a forward's
temporaries may lie where the backward's buffers do) and before another backward replay of its group.
Capture allocates no `.grad` (zeroed gradients next to the buffers: 2.9 GiB more in a 780m run's first
step).
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

Blocks = Callable[[Tensor, Tensor | None, Tensor, Tensor | None, slice], tuple[Tensor, Tensor]]
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
        try:
            with warnings.catch_warnings(), collectives_through(self._between):
                warnings.filterwarnings("ignore", "The CUDA Graph is empty")  # a pass may end with a collective
                yield
        except BaseException:
            with contextlib.suppress(RuntimeError):  # the stream out of capture, so that the error reported is the one raised
                self.graphs[-1].capture_end()
            raise
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
    """One group of blocks: its forward graphs replayed, and in backward its backward graphs."""

    @staticmethod
    def forward(ctx, graphs: BlockGraphs, group: int, h: Tensor, update: Tensor | None, seq_idx: Tensor,
                halo_seq_idx: Tensor | None, *params: Tensor) -> tuple[Tensor, ...]:
        ctx.graphs, ctx.group = graphs, group
        if group == 0:
            graphs.copy_adopted_gradients()
        # The first group reads the ids too; a later group's h and update are the earlier group's outputs, in place.
        given = (h, update, seq_idx, halo_seq_idx) if group == 0 else (h, update)
        for static, tensor in zip((*graphs.inputs[group], *graphs.ids), given):
            if static is not None and static.data_ptr() != tensor.data_ptr():
                static.copy_(tensor)
        graphs.forward_passes[group].replay()
        graphs.forward_replays[group] += 1
        ctx.replay = graphs.forward_replays[group]
        return tuple(out.detach() for out in graphs.inputs[group + 1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        graphs, group = ctx.graphs, ctx.group
        if ctx.replay != graphs.forward_replays[group]:
            raise RuntimeError("the blocks' CUDA graphs replayed another forward pass of this shape before this pass's backward, "
                               "overwriting what it kept for it: run each pass's backward before the next forward of the same "
                               "shape, or build the model without CUDA graphs")
        graphs.copy_adopted_gradients(group)  # a second backward through this pass (retain_graph) overwrites them too
        for static, grad in zip(graphs.grad_inputs[group + 1], grads):
            if static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        graphs.backward_passes[group].replay()
        grad_inputs = (None if grad is None else grad.detach() for grad in graphs.grad_inputs[group])
        # Detached, the buffers can become .grad without a copy (autograd adopts a gradient nothing else references).
        return None, None, *grad_inputs, None, None, *(grad.detach() for grad in graphs.grad_params[group])


class BlockGraphs:
    """CUDA graphs of the blocks in `groups` consecutive groups of layers, `run(h, update, seq_idx, halo_seq_idx,
    layers)` for each, for inputs shaped like these (update: the previous block's output not yet added to h, None
    before the first block; halo_seq_idx: the previous CP rank's last document ids, or None). Each group is one
    autograd node, so its parameters' gradients appear when its backward is done: DDP sums them over the ranks while
    the earlier groups' backward runs. A group's forward graphs read the earlier group's outputs where they are, and its
    backward graphs the later group's input gradients: nothing is copied between groups. The price: each boundary's
    (h, update) and their gradients stay in the graphs' pool (at 780m, 8 x 2048 tokens, ~150 MB each per boundary)."""

    def __init__(self, run: Blocks, blocks: nn.ModuleList, groups: int, h: Tensor, seq_idx: Tensor, halo_seq_idx: Tensor | None):
        device = h.device.type
        if torch.is_autocast_enabled(device) and torch.is_autocast_cache_enabled():
            raise RuntimeError("CUDA graphs of the blocks need torch.autocast(..., cache_enabled=False)")
        self.meta = self._meta(h, seq_idx, halo_seq_idx)
        groups = min(groups, len(blocks))
        layers = [slice(i * len(blocks) // groups, (i + 1) * len(blocks) // groups) for i in range(groups)]
        self.params = [tuple(p for p in blocks[group].parameters() if p.requires_grad) for group in layers]
        self.ids = (seq_idx.clone(), None if halo_seq_idx is None else halo_seq_idx.clone())
        # inputs[g]: group g's (h, update), the tensors its graphs read; inputs[g + 1] its outputs. grad_inputs alike.
        self.inputs: list[tuple[Tensor, Tensor | None]] = [(h.detach().clone().requires_grad_(h.requires_grad), None)]
        pool = torch.cuda.graph_pool_handle()
        self.forward_passes = [_Pieces(pool) for _ in layers]
        self.forward_replays = [0 for _ in layers]  # a backward replay checks that no forward replay came after its own
        self.backward_passes = [_Pieces(pool) for _ in layers]
        with on_graph_stream(h.device):
            for _ in range(WARMUP_PASSES):
                outputs = run(*self.inputs[0], *self.ids, slice(None))
                torch.autograd.grad(outputs, self._wrt(self.inputs[0], sum(self.params, ())), [torch.zeros_like(out) for out in outputs])
            del outputs
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            outputs = []
            for group, forward_pass in zip(layers, self.forward_passes):
                with forward_pass.capture():
                    outputs.append(run(*self.inputs[-1], *self.ids, group))
                self.inputs.append(tuple(out.detach().requires_grad_() for out in outputs[-1]))
            self.grad_inputs: list[tuple[Tensor | None, ...]] = [tuple(torch.empty_like(out) for out in outputs[-1])]
            self.grad_params: list[tuple[Tensor, ...]] = []
            for group in reversed(range(len(layers))):  # in the order autograd runs them
                wrt = self._wrt(self.inputs[group], self.params[group])
                with self.backward_passes[group].capture():
                    grads = iter(torch.autograd.grad(outputs[group], wrt, self.grad_inputs[0]))
                self.grad_inputs.insert(0, tuple(None if t is None or not t.requires_grad else next(grads) for t in self.inputs[group]))
                self.grad_params.insert(0, tuple(grads))

    def copy_adopted_gradients(self, group: int | None = None) -> None:
        """Give each `.grad` that is still a gradient buffer (adopted by autograd) of `group` (of every group: None) its
        own copy: any replay may overwrite the buffers, a forward's temporaries too (all graphs share one pool; a buffer
        may lie where an earlier captured graph's temporaries did)."""
        groups = range(len(self.params)) if group is None else [group]
        for params, buffers in ((self.params[g], self.grad_params[g]) for g in groups):
            for param, buffer in zip(params, buffers):
                if param.grad is not None and param.grad.data_ptr() == buffer.data_ptr():
                    param.grad = param.grad.clone()

    @staticmethod
    def _wrt(inputs: tuple[Tensor, Tensor | None], params: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (*(t for t in inputs if t is not None and t.requires_grad), *params)

    @property
    def pieces(self) -> tuple[int, int]:
        """How many graphs a forward and a backward replay (a group's pieces, split by collectives, over all groups)."""
        return (sum(len(p.graphs) for p in self.forward_passes), sum(len(p.graphs) for p in self.backward_passes))

    @staticmethod
    def _meta(h: Tensor, seq_idx: Tensor | None, halo_seq_idx: Tensor | None) -> tuple:
        device = h.device.type
        return ([None if t is None else (t.shape, t.dtype) for t in (h, seq_idx, halo_seq_idx)],
                (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))

    def matches(self, h: Tensor, seq_idx: Tensor | None, halo_seq_idx: Tensor | None) -> bool:
        return seq_idx is not None and self._meta(h, seq_idx, halo_seq_idx) == self.meta

    def __call__(self, h: Tensor, seq_idx: Tensor, halo_seq_idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """(residual stream, last block's output not yet added), as the blocks return them."""
        update = None
        for group, params in enumerate(self.params):
            h, update = _Replay.apply(self, group, h, update, seq_idx, halo_seq_idx, *params)
        return h, update
