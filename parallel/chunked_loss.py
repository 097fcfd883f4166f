"""The LM head and the cross-entropy fused over chunks of tokens, from a vocabulary-split weight:
only one chunk's logits exist at a time, and they are never gathered over TP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from parallel.collectives import all_reduce
from parallel.compiled import maybe_compiled
from parallel.context import ParallelContext, group_rank, group_size
from parallel.linear import add_matmul_
from parallel.tensor_parallel import layer_input

# Tokens per chunk of the fused LM head + loss: 4096 tokens' fp32 logits at a 50k vocabulary are 0.8 GB.
LOSS_CHUNK_TOKENS = 4096
IGNORE_INDEX = -100  # a target counted nowhere (torch's convention)


def _chunk_stats(logits: Tensor, local_target: Tensor, reduce_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per token of a chunk: its target's logit (garbage where the target is on another rank), the
    largest logit and the sum of exp(logit - largest), all over this rank's part of the vocabulary."""
    logits = logits.to(reduce_dtype)
    local_max = logits.max(-1).values
    return logits.gather(-1, local_target[:, None])[:, 0], local_max, (logits - local_max[:, None]).exp().sum(-1)


def _chunk_logit_grad(logits: Tensor, lse: Tensor, local_target: Tensor, hit: Tensor, scale: Tensor, reduce_dtype: torch.dtype) -> Tensor:
    """d loss / d logits = (softmax - onehot(target)) * scale, in the logits' dtype for the matmuls."""
    grad = (logits.to(reduce_dtype) - lse[:, None]).exp()
    grad = grad.scatter_add(-1, local_target[:, None], -hit[:, None].to(reduce_dtype))
    return (grad * scale[:, None]).to(logits.dtype)


def _chunk_loss_and_grad(logits: Tensor, local_target: Tensor, hit: Tensor, scale: Tensor,
                         reduce_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """One rank holding the whole vocabulary: log-sum-exp, target logit and d loss / d logits in one go."""
    target_logit, local_max, sum_exp = _chunk_stats(logits, local_target, reduce_dtype)
    lse = sum_exp.log() + local_max
    return lse, target_logit, _chunk_logit_grad(logits, lse, local_target, hit, scale, reduce_dtype)


def _is_broadcast_scalar(t: Tensor) -> bool:
    """One value expanded to a shape (what the backward of .sum() hands on)."""
    return t.numel() == 1 or all(stride == 0 for stride in t.stride())


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The LM head and the loss fused, over chunks of tokens: only one chunk's logits exist at a time.

    On one TP rank, when gradients are wanted, the forward pass also computes the gradients of every
    token's loss with respect to h and the weight (the loss is the last operation, so nothing is lost):
    the backward then only scales them, provided every token receives the same upstream gradient,
    as from `losses.sum() / n`. Any other upstream gradient, or TP > 1 (the log-sum-exp needs the
    whole vocabulary first), takes the general path: backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, group: ProcessGroup | None, chunk_tokens: int,
                ignore_index: int, compile: bool, unit_gradients: bool, triton: bool):
        device = h.device.type
        autocast = torch.is_autocast_enabled(device)  # custom Functions are not autocast: do what it would
        compute_dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(h.dtype, weight.dtype)
        reduce_dtype = torch.promote_types(compute_dtype, torch.float32)
        tokens, vocab = h.reshape(-1, h.shape[-1]), weight.shape[0]
        local_target = target.reshape(-1) - group_rank(group) * vocab
        mine = (local_target >= 0) & (local_target < vocab)
        local_target = local_target.masked_fill(~mine, 0)
        valid = target.reshape(-1) != ignore_index
        hit = mine & valid
        ctx.compute_dtype, ctx.chunk_tokens, ctx.compile, ctx.triton = compute_dtype, chunk_tokens, compile, triton
        with torch.autocast(device, enabled=False):
            w = weight.to(compute_dtype)
            if unit_gradients:
                lse, target_logit, grad_h, grad_weight = _loss_and_unit_gradients(tokens, w, local_target, hit, valid, reduce_dtype, ctx)
                ctx.save_for_backward(h, weight, local_target, hit, valid, lse, grad_h, grad_weight)
                return (lse - target_logit).masked_fill(~valid, 0.0).view(target.shape)
            chunk_stats = maybe_compiled(_chunk_stats, compile, h.device)
            local_max, sum_exp, target_logit = (torch.empty(len(tokens), dtype=reduce_dtype, device=h.device) for _ in range(3))
            for start in range(0, len(tokens), chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                target_logit[rows], local_max[rows], sum_exp[rows] = chunk_stats(tokens[rows].to(compute_dtype) @ w.T, local_target[rows],
                                                                                 reduce_dtype)
        # Reduced over TP once for all chunks: each rank's sum rescaled to the global max, as logsumexp does.
        logits_max = all_reduce(local_max.clone(), group, dist.ReduceOp.MAX) if group_size(group) > 1 else local_max
        sums = torch.stack([sum_exp * torch.exp(local_max - logits_max), target_logit.masked_fill(~mine, 0.0)])
        if group_size(group) > 1:
            sums = all_reduce(sums, group)  # one all-reduce for both
        sum_exp, target_logit = sums
        lse = torch.log(sum_exp) + logits_max
        ctx.save_for_backward(h, weight, local_target, hit, valid, lse)
        return (lse - target_logit).masked_fill(~valid, 0.0).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        h, weight, local_target, hit, valid, lse, *unit_gradients = ctx.saved_tensors
        if unit_gradients and _is_broadcast_scalar(grad_loss):
            scale = grad_loss[(0,) * grad_loss.dim()]
            grad_h, grad_weight = unit_gradients
            return (grad_h * scale).to(h.dtype).view(h.shape), (grad_weight * scale).to(weight.dtype), *(None,) * 7
        compute_dtype, reduce_dtype = ctx.compute_dtype, lse.dtype
        tokens = h.reshape(-1, h.shape[-1])
        scale = (grad_loss.reshape(-1) * valid).to(reduce_dtype)
        grad_h = torch.empty_like(tokens)
        grad_weight = torch.zeros(weight.shape, dtype=reduce_dtype, device=weight.device)  # accumulated in fp32
        logit_grad = maybe_compiled(_chunk_logit_grad, ctx.compile, h.device)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, len(tokens), ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                x = tokens[rows].to(compute_dtype)
                grad = logit_grad(x @ w.T, lse[rows], local_target[rows], hit[rows], scale[rows], reduce_dtype)
                grad_h[rows] = grad @ w
                add_matmul_(grad_weight, grad.T, x)
        return grad_h.view(h.shape), grad_weight.to(weight.dtype), *(None,) * 7


def _loss_and_unit_gradients(tokens: Tensor, w: Tensor, local_target: Tensor, hit: Tensor, valid: Tensor, reduce_dtype: torch.dtype,
                             ctx) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every token's log-sum-exp and target logit, and the gradients of the sum of the losses w.r.t.
    the tokens (n, d) and the weight (V, d, fp32), one chunk of logits at a time; the whole vocabulary
    is on this rank."""
    lse, target_logit = (torch.empty(len(tokens), dtype=reduce_dtype, device=tokens.device) for _ in range(2))
    grad_h = torch.empty_like(tokens)
    grad_weight = torch.zeros(w.shape, dtype=reduce_dtype, device=w.device)
    scale = valid.to(reduce_dtype)
    if ctx.triton:
        from parallel.cross_entropy_triton import loss_and_grad_in_place  # imports triton: only where it runs
        loss_and_grad = loss_and_grad_in_place
    else:
        loss_and_grad = maybe_compiled(_chunk_loss_and_grad, ctx.compile, tokens.device)
    for start in range(0, len(tokens), ctx.chunk_tokens):
        rows = slice(start, start + ctx.chunk_tokens)
        x = tokens[rows].to(ctx.compute_dtype)
        lse[rows], target_logit[rows], grad = loss_and_grad(x @ w.T, local_target[rows], hit[rows], scale[rows], reduce_dtype)
        grad_h[rows] = grad @ w
        add_matmul_(grad_weight, grad.T, x)
    return lse, target_logit, grad_h, grad_weight


def vocab_parallel_linear_cross_entropy(
    h: Tensor, weight: Tensor, target: Tensor, ctx: ParallelContext, chunk_tokens: int = LOSS_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX, compile: bool = False, triton: bool = False,
) -> Tensor:
    """Per-token cross-entropy (b, l) of the logits h @ weight.T (vocab-split `weight`), 0 where
    target == ignore_index, computed from vocabulary-split logits without gathering them (max,
    sum of exponentials and the target's logit are reduced over TP) and without ever holding the logits
    of more than `chunk_tokens` tokens: at a 50k vocabulary those (and their fp32 softmax) would
    otherwise dominate a small model's memory. triton: on one TP rank, each chunk's loss and gradient by
    parallel/cross_entropy_triton.py (CUDA tensors) instead of PyTorch's ops (through torch.compile with `compile`)."""
    # Gradients computed in the forward pass: only where they will be wanted (not under no_grad, which a
    # custom Function's needs_input_grad does not tell) and the whole vocabulary is on this rank.
    unit_gradients = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad) and ctx.tp == 1
    return _VocabParallelLinearCrossEntropy.apply(layer_input(h, ctx), weight, target, ctx.tp_group, chunk_tokens, ignore_index, compile,
                                                  unit_gradients, triton)
