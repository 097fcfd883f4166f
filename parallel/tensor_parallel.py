"""Tensor-parallel layers (Megatron style) and the sharding of their parameters.

Layers are built from the full, logical initial tensors (so a model initialises identically whatever
its layout) and keep only this rank's contiguous piece. Every sharded parameter records the dimension
it is split along in `param.tp_dim` (None: replicated); that is all a checkpoint needs to reassemble
or reshard it. With sequence parallelism the activations between layers are split along dim 1 (the
sequence) across the TP group: layer inputs are all-gathered, outputs reduce-scattered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from parallel.collectives import all_gather, all_reduce, copy_to_region, gather_from_region, reduce_from_region, reduce_scatter_to_region
from parallel.context import ParallelContext, group_rank, group_size

SEQUENCE_DIM = 1
# Tokens per chunk of the fused LM head + loss: 4096 tokens' fp32 logits at a 50k vocabulary are 0.8 GB.
LOSS_CHUNK_TOKENS = 4096


def shard_parameter(full: Tensor, dim: int | None, group: ProcessGroup | None, name: str = "tensor") -> nn.Parameter:
    """This rank's contiguous piece of `full` along dim (all of it when dim is None) as a Parameter."""
    size = group_size(group)
    if dim is not None and size > 1:
        if full.shape[dim] % size:
            raise ValueError(f"{name}: dimension {dim} of size {full.shape[dim]} cannot be split evenly over tp = {size}")
        full = full.chunk(size, dim)[group_rank(group)]
    param = nn.Parameter(full.detach().clone().contiguous())
    param.tp_dim = dim
    return param


def local_piece(full: Tensor, param: nn.Parameter, group: ProcessGroup | None) -> Tensor:
    """The part of a full (logical) tensor that `param` holds on this rank."""
    dim = getattr(param, "tp_dim", None)
    if dim is None or group_size(group) == 1:
        return full
    return full.chunk(group_size(group), dim)[group_rank(group)]


@torch.no_grad()
def full_tensor(param: Tensor, tp_dim: int | None, group: ProcessGroup | None) -> Tensor:
    """The logical tensor assembled from every rank's piece."""
    if tp_dim is None or group_size(group) == 1:
        return param.detach()
    return all_gather(param.detach(), group, tp_dim)


def mark_sequence_parallel(param: nn.Parameter) -> None:
    """A replicated parameter applied to sequence-split activations: each TP rank sees part of its
    gradient, so reduce_gradients() sums it over the TP group."""
    param.sequence_parallel = True


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
    Rank r holds [seg1_r | seg2_r | ...]; checkpoints and exports see each segment whole."""

    def __init__(self, full: dict[str, Tensor], group: ProcessGroup | None):
        super().__init__({name: shard_parameter(t, 0, group, name) for name, t in full.items()})
        self.order = list(full)  # nn.ParameterDict sorts plain-dict keys

    def fused(self) -> Tensor:
        return torch.cat([self[name] for name in self.order])

    def local_sizes(self) -> list[int]:
        return [self[name].shape[0] for name in self.order]


class ColumnParallelLinear(nn.Module):
    """y = x @ cat(segments).T with each segment split on its output dim over TP: one GEMM per rank."""

    def __init__(self, weights: dict[str, Tensor], ctx: ParallelContext, biases: dict[str, Tensor] | None = None):
        super().__init__()
        self.ctx = ctx
        self.weight = ShardedSegments(weights, ctx.tp_group)
        self.bias = None if biases is None else ShardedSegments(biases, ctx.tp_group)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.fused()
        return F.linear(layer_input(x, self.ctx), self.weight.fused(), bias)


class RowParallelLinear(nn.Module):
    """y = x_r @ W_r.T summed over TP ranks (x split on its last dim, W on dim 1); bias added once."""

    def __init__(self, weight: Tensor, ctx: ParallelContext, bias: Tensor | None = None):
        super().__init__()
        self.ctx = ctx
        self.weight = shard_parameter(weight, 1, ctx.tp_group, "row-parallel weight")
        self.bias = None if bias is None else shard_parameter(bias, None, ctx.tp_group)
        if self.bias is not None and ctx.sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = layer_output(F.linear(x, self.weight), self.ctx)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over TP; each rank looks up its own rows,
    zeros elsewhere, and the partial results are summed (reduce-scattered along the sequence under SP)."""

    def __init__(self, weight: Tensor, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.weight = shard_parameter(weight, 0, ctx.tp_group, "embedding (vocab_size)")
        self.vocab_start = ctx.tp_rank * self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        if self.ctx.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return layer_output(out, self.ctx)


def vocab_parallel_logits(h: Tensor, weight: Tensor, ctx: ParallelContext) -> Tensor:
    """This rank's slice of the vocabulary's logits (b, l, V/tp), from vocab-split `weight`."""
    return F.linear(layer_input(h, ctx), weight)


class VocabParallelLMHead(nn.Module):
    """An untied output layer, its rows (the vocabulary) split over TP."""

    def __init__(self, weight: Tensor, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.weight = shard_parameter(weight, 0, ctx.tp_group, "lm_head (vocab_size)")

    def forward(self, h: Tensor) -> Tensor:
        return vocab_parallel_logits(h, self.weight, self.ctx)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group: ProcessGroup | None, ignore_index: int):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        vocab_start = group_rank(group) * logits.shape[-1]
        logits_max = logits.max(dim=-1).values
        if group_size(group) > 1:
            logits_max = all_reduce(logits_max, group, dist.ReduceOp.MAX)
        exp = torch.exp(logits - logits_max[..., None])
        local_target = target - vocab_start
        mine = (local_target >= 0) & (local_target < logits.shape[-1])
        local_target = local_target.masked_fill(~mine, 0)
        target_logit = torch.gather(logits, -1, local_target[..., None])[..., 0].masked_fill(~mine, 0.0)
        sums = torch.stack([exp.sum(-1), target_logit])  # one all-reduce for both
        if group_size(group) > 1:
            sums = all_reduce(sums, group)
        sum_exp, target_logit = sums
        valid = target != ignore_index
        loss = (torch.log(sum_exp) + logits_max - target_logit).masked_fill(~valid, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp[..., None]), local_target, mine & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        softmax, local_target, hit, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_target[..., None], -hit[..., None].to(grad.dtype))
        grad.mul_((grad_loss * valid)[..., None])
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, group: ProcessGroup | None, ignore_index: int = -100) -> Tensor:
    """Per-token cross-entropy (0 where target == ignore_index) from vocab-split logits, never
    gathering them: max, sum of exponentials and the target's logit are reduced over TP."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)


def _chunk_logits(h: Tensor, weight: Tensor, compute_dtype: torch.dtype, reduce_dtype: torch.dtype) -> Tensor:
    """One chunk's logits (n, V/tp), multiplied in compute_dtype (as autocast would) and upcast for the reductions."""
    return (h.to(compute_dtype) @ weight.T).to(reduce_dtype)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The LM head and the loss fused, over chunks of tokens: only one chunk's logits exist at a time,
    and backward recomputes them instead of keeping the softmax of every token."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, group: ProcessGroup | None, chunk_tokens: int, ignore_index: int):
        device = h.device.type
        autocast = torch.is_autocast_enabled(device)  # custom Functions are not autocast: do what it would
        compute_dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(h.dtype, weight.dtype)
        reduce_dtype = torch.promote_types(compute_dtype, torch.float32)
        tokens, vocab = h.reshape(-1, h.shape[-1]), weight.shape[0]
        local_target = target.reshape(-1) - group_rank(group) * vocab
        mine = (local_target >= 0) & (local_target < vocab)
        local_target = local_target.masked_fill(~mine, 0)
        local_max, sum_exp, target_logit = (torch.empty(len(tokens), dtype=reduce_dtype, device=h.device) for _ in range(3))
        with torch.autocast(device, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, len(tokens), chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                logits = _chunk_logits(tokens[rows], w, compute_dtype, reduce_dtype)
                target_logit[rows] = logits.gather(-1, local_target[rows, None])[:, 0]
                local_max[rows] = logits.max(-1).values
                sum_exp[rows] = logits.sub_(local_max[rows, None]).exp_().sum(-1)
        # Reduced over TP once for all chunks: each rank's sum rescaled to the global max, as logsumexp does.
        logits_max = all_reduce(local_max.clone(), group, dist.ReduceOp.MAX) if group_size(group) > 1 else local_max
        sums = torch.stack([sum_exp * torch.exp(local_max - logits_max), target_logit.masked_fill(~mine, 0.0)])
        if group_size(group) > 1:
            sums = all_reduce(sums, group)  # one all-reduce for both
        sum_exp, target_logit = sums
        lse = torch.log(sum_exp) + logits_max
        valid = target.reshape(-1) != ignore_index
        ctx.save_for_backward(h, weight, local_target, mine & valid, valid, lse)
        ctx.compute_dtype, ctx.chunk_tokens = compute_dtype, chunk_tokens
        return (lse - target_logit).masked_fill(~valid, 0.0).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        h, weight, local_target, hit, valid, lse = ctx.saved_tensors
        compute_dtype, reduce_dtype = ctx.compute_dtype, lse.dtype
        tokens = h.reshape(-1, h.shape[-1])
        scale = (grad_loss.reshape(-1) * valid).to(reduce_dtype)
        grad_h = torch.empty_like(tokens)
        grad_weight = torch.zeros(weight.shape, dtype=reduce_dtype, device=weight.device)  # accumulated in fp32
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, len(tokens), ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                grad = _chunk_logits(tokens[rows], w, compute_dtype, reduce_dtype).sub_(lse[rows, None]).exp_()  # softmax
                grad.scatter_add_(-1, local_target[rows, None], -hit[rows, None].to(reduce_dtype))
                grad = grad.mul_(scale[rows, None]).to(compute_dtype)
                grad_h[rows] = grad @ w
                grad_weight += (grad.T @ tokens[rows].to(compute_dtype)).to(reduce_dtype)
        return grad_h.view(h.shape), grad_weight.to(weight.dtype), None, None, None, None


def vocab_parallel_linear_cross_entropy(
    h: Tensor, weight: Tensor, target: Tensor, ctx: ParallelContext, chunk_tokens: int = LOSS_CHUNK_TOKENS, ignore_index: int = -100
) -> Tensor:
    """Per-token cross-entropy (b, l) of the logits h @ weight.T (vocab-split `weight`), 0 where
    target == ignore_index, as vocab_parallel_cross_entropy(vocab_parallel_logits(h, weight, ctx), target)
    computes it, but without ever holding the logits of more than `chunk_tokens` tokens: at a 50k
    vocabulary those (and their fp32 softmax) would otherwise dominate a small model's memory."""
    return _VocabParallelLinearCrossEntropy.apply(layer_input(h, ctx), weight, target, ctx.tp_group, chunk_tokens, ignore_index)
