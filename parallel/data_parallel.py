"""Gradient reduction for the simplest data-parallel engine: sum over DP x CP after backward.

The loss on each rank is its tokens' loss divided by the *global* number of target tokens, so the
parameters' gradients are sums (not means) over the ranks that saw different tokens: DP replicas and
CP slices. Replicated parameters inside the sequence-parallel region also get their TP partial sums.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup

from parallel.collectives import all_reduce
from parallel.context import ParallelContext, group_size


def _sum_over(grads: list[torch.Tensor], group: ProcessGroup | None) -> None:
    """All-reduce the gradients as one flat buffer per dtype (few large collectives, not many small ones)."""
    if group_size(group) == 1 or not grads:
        return
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = all_reduce(_flatten_dense_tensors(same), group)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


def reduce_gradients(params: Iterable[nn.Parameter], ctx: ParallelContext) -> None:
    """After backward: TP sums for sequence-parallel replicated parameters, then sums over DP x CP."""
    with_grad = [p for p in params if p.grad is not None]
    if ctx.sequence_parallel:
        _sum_over([p.grad for p in with_grad if getattr(p, "sequence_parallel", False)], ctx.tp_group)
    _sum_over([p.grad for p in with_grad], ctx.dp_cp_group)
