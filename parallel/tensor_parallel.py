"""Tensor-parallel linear layers (Megatron style) and the sharding of their parameters.

Layers are built from the full, logical initial tensors (so a model initialises identically whatever
its layout) and keep only this rank's contiguous piece, declaring the dimension it is split along
(parallel/roles.py); that is all a checkpoint needs to reassemble or reshard it. With sequence
parallelism the activations between layers are split along dim 1 (the sequence) across the TP group: layer
inputs are all-gathered, outputs reduce-scattered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from parallel.collectives import copy_to_region, gather_from_region, reduce_from_region, reduce_scatter_to_region
from parallel.context import ParallelContext, group_rank, group_size
from parallel.linear import linear
from parallel.roles import REPLICATED, ParamRole, declare_roles

SEQUENCE_DIM = 1


def shard_parameter(full: Tensor, role: ParamRole, group: ProcessGroup | None, name: str = "tensor") -> nn.Parameter:
    """This rank's piece of the logical tensor `full` for a parameter of `role` (local_piece), as a Parameter."""
    dim, size = role.tp_dim, group_size(group)
    if dim is not None and full.shape[dim] % size:
        raise ValueError(f"{name}: dimension {dim} of size {full.shape[dim]} cannot be split evenly over tp = {size}")
    return nn.Parameter(local_piece(full, role, group).detach().clone().contiguous())


def local_piece(full: Tensor, role: ParamRole, group: ProcessGroup | None) -> Tensor:
    """The part of a full (logical) tensor that a parameter of this role holds on this rank."""
    if role.tp_dim is None or group_size(group) == 1:
        return full
    return full.chunk(group_size(group), role.tp_dim)[group_rank(group)]


def layer_input(x: Tensor, ctx: ParallelContext) -> Tensor:
    """Input of a column-parallel layer: all-gathered along the sequence under SP, else as is
    (its gradient all-reduced over TP)."""
    if ctx.sequence_parallel:
        return gather_from_region(x, ctx.tp_group, SEQUENCE_DIM)
    return copy_to_region(x, ctx.tp_group)


def layer_output(x: Tensor, ctx: ParallelContext) -> Tensor:
    """Partial sums of a row-parallel layer: reduce-scattered along the sequence under SP, else all-reduced."""
    if ctx.sequence_parallel:
        return reduce_scatter_to_region(x, ctx.tp_group, SEQUENCE_DIM)
    return reduce_from_region(x, ctx.tp_group)


class ShardedSegments(nn.ParameterDict):
    """The logical segments of one fused tensor, each its own Parameter split on dim 0 over TP.
    Rank r holds [seg1_r | seg2_r | ...]; checkpoints and exports see each segment whole.
    A `replicated` segment is whole on every rank (attention's key/value heads when there are fewer than tp):
    each rank uses part of it, so its gradient is summed over TP (backward's all-reduce of copy_to_region)."""

    def __init__(self, full: dict[str, Tensor], group: ProcessGroup | None, replicated: tuple[str, ...] = ()):
        roles = {name: REPLICATED if name in replicated else ParamRole(tp_dim=0) for name in full}
        super().__init__({name: shard_parameter(t, roles[name], group, name) for name, t in full.items()})
        declare_roles(self, **roles)
        self.order = list(full)  # nn.ParameterDict sorts plain-dict keys
        self.group, self.replicated = group, replicated

    def segments(self) -> list[Tensor]:
        """The segments in order, as this rank uses them (a replicated one through copy_to_region)."""
        return [copy_to_region(self[name], self.group) if name in self.replicated else self[name] for name in self.order]

    def fused(self) -> Tensor:
        return torch.cat(self.segments())


class ColumnParallelLinear(nn.Module):
    """y = x @ cat(segments).T with each segment split on its output dim over TP (or whole on every rank: `replicated`):
    one GEMM per rank."""

    def __init__(self, weights: dict[str, Tensor], ctx: ParallelContext, biases: dict[str, Tensor] | None = None,
                 replicated: tuple[str, ...] = ()):
        super().__init__()
        self.ctx = ctx
        self.weight = ShardedSegments(weights, ctx.tp_group, replicated)
        self.bias = None if biases is None else ShardedSegments(biases, ctx.tp_group, replicated)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.fused()
        return linear(layer_input(x, self.ctx), self.weight.segments(), bias)


class RowParallelLinear(nn.Module):
    """y = x_r @ W_r.T summed over TP ranks (x split on its last dim, W on dim 1); bias added once."""

    builtin_matmul = False  # multiply with F.linear (apply_activation_checkpointing sets it: see forward)

    def __init__(self, weight: Tensor, ctx: ParallelContext, bias: Tensor | None = None):
        super().__init__()
        self.ctx = ctx
        roles = dict(weight=ParamRole(tp_dim=1), bias=ParamRole(sequence_parallel=ctx.sequence_parallel))
        self.weight = shard_parameter(weight, roles["weight"], ctx.tp_group, "row-parallel weight")
        self.bias = None if bias is None else shard_parameter(bias, roles["bias"], ctx.tp_group)
        declare_roles(self, **roles)

    def forward(self, x: Tensor) -> Tensor:
        # parallel/linear.py gives the weight's gradient in fp32 straight from cuBLAS (F.linear's is bf16, then cast). In a
        # recomputed block F.linear: the block's last matmul, which activation checkpointing's recomputation then skips
        # (it stops once the tensors backward needs exist: F.linear saves its inputs before multiplying, linear() after).
        y = layer_output(F.linear(x, self.weight) if self.builtin_matmul else linear(x, [self.weight]), self.ctx)
        return y if self.bias is None else y + self.bias
