"""Autograd-aware collectives. Each is the identity (and issues nothing) on a group of one rank.

Every collective goes through `_issue`, which can record (name, bytes) while `record_communication()`
is active (tests count a layer's collectives with it and measure what context parallelism sends), and
which hands the communication itself to a runner while `collectives_through(runner)` is active: a CUDA-graph
capture (megassm/model/cuda_graphs.py) ends a graph there and replays the call between graphs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from parallel.context import group_rank, group_size

# all_gather_single / reduce_scatter_single are the newer names (torch >= 2.13) of the same calls.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Communication = Callable[[], object]
_records: list[tuple[str, int]] | None = None
_runner: Callable[[Communication], None] | None = None


@contextlib.contextmanager
def record_communication() -> Iterator[list[tuple[str, int]]]:
    """Collect (collective name, bytes this rank sends or contributes) of every collective issued."""
    global _records
    outer, _records = _records, []
    try:
        yield _records
    finally:
        _records = outer


@contextlib.contextmanager
def collectives_through(runner: Callable[[Communication], None]) -> Iterator[None]:
    """Hand each collective's communication to runner instead of running it: a call without arguments that reads
    and writes tensors the collective has already made, so that calling it again communicates their contents then.
    Module-wide, not per thread: autograd's backward runs in threads of its own."""
    global _runner
    outer, _runner = _runner, runner
    try:
        yield
    finally:
        _runner = outer


def handed_over() -> bool:
    """Whether collectives are handed to a runner now (a CUDA-graph capture is under way)."""
    return _runner is not None


def _issue(name: str, tensor: Tensor, communicate: Communication) -> None:
    if _records is not None:
        _records.append((name, tensor.numel() * tensor.element_size()))
    if _runner is None:
        communicate()
    else:
        _runner(communicate)


def all_reduce(x: Tensor, group: ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """Reduce over ranks, in place when x is contiguous (callers pass tensors nothing else holds)."""
    x = x.contiguous()
    _issue("all_reduce", x, lambda: dist.all_reduce(x, op=op, group=group))
    return x


def all_gather(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Concatenate every rank's x along dim, in rank order."""
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((group_size(group) * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _issue("all_gather", moved, lambda: _all_gather(out, moved, group=group))
    return out.movedim(0, dim)


def reduce_scatter(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Sum over ranks, then keep this rank's piece along dim."""
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // group_size(group), *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _issue("reduce_scatter", moved, lambda: _reduce_scatter(out, moved, group=group))
    return out.movedim(0, dim)


def shift(x: Tensor, group: ProcessGroup, step: int) -> Tensor:
    """What rank r-step holds, on rank r (zeros where there is none). One all-gather of x (CP's few halo rows) rather
    than a send and a receive: gloo moves no CUDA tensor point to point, and this way the CUDA graphs of a CP layout
    are checked on one GPU with it (tools/check_graphs.py); its bytes still do not grow with the sequence."""
    source = group_rank(group) - step
    gathered = all_gather(x[None], group, 0)
    return gathered[source] if 0 <= source < group_size(group) else torch.zeros_like(x)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _SendToNextRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        return shift(x, group, +1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return shift(grad, ctx.group, -1), None


def _single(group: ProcessGroup | None) -> bool:
    return group_size(group) == 1


def copy_to_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Identity forward; all-reduce of the gradient backward (the input of a column-parallel layer)."""
    return x if _single(group) else _CopyToRegion.apply(x, group)


def reduce_from_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """All-reduce forward; identity backward (the output of a row-parallel layer)."""
    return x if _single(group) else _ReduceFromRegion.apply(x, group)


def gather_from_region(x: Tensor, group: ProcessGroup | None, dim: int) -> Tensor:
    """All-gather along dim forward; reduce-scatter of the gradient backward."""
    return x if _single(group) else _GatherFromRegion.apply(x, group, dim)


def reduce_scatter_to_region(x: Tensor, group: ProcessGroup | None, dim: int) -> Tensor:
    """Reduce-scatter along dim forward; all-gather of the gradient backward."""
    return x if _single(group) else _ReduceScatterToRegion.apply(x, group, dim)


def send_to_next_rank(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """On rank r, what rank r-1 holds (zeros on rank 0); the gradient flows back to rank r-1."""
    return torch.zeros_like(x) if _single(group) else _SendToNextRank.apply(x, group)
