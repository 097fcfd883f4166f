"""x @ cat(weights).T + bias as one autograd step, with the weights' gradients in their own dtype straight out
of the matmul.

Why: under torch.autocast, F.linear casts an fp32 weight to bf16 and its backward hands autograd a bf16 weight
gradient, which autograd then casts to fp32: a pass over every weight gradient, and, for a weight kept as
segments (ColumnParallelLinear's), a concatenation of the fp32 segments before the cast. Here the segments are
cast into one compute-dtype weight in a single pass, and cuBLAS writes the weight gradient in fp32 (torch.mm's
out_dtype; its sums were fp32 accumulators anyway, not rounded to bf16 on the way). With the loss head's
fp32 accumulation below, a 780m step on an H200 spends 3.8 ms on copies and casts instead of 6.8.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a linear layer multiplies in: autocast's where it is on, else the promotion of both."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


def matmul(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b in out_dtype: written by cuBLAS in fp32 from fp16/bf16 operands on CUDA, else cast afterwards."""
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


def add_matmul_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc += a @ b (acc in fp32, a and b in a compute dtype), accumulated by cuBLAS where it can."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    return acc.add_(a @ b)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, dtype: torch.dtype, *weights: Tensor) -> Tensor:
        rows = [w.shape[0] for w in weights]
        if len(weights) == 1:
            weight = weights[0].to(dtype)  # one vectorized copy: on one tensor foreach's kernel took 1.8x as long (H200)
        else:
            weight = torch.empty(sum(rows), weights[0].shape[1], dtype=dtype, device=x.device)
            torch._foreach_copy_(weight.split(rows), weights)  # cast and concatenation in one pass
        inputs = x.to(dtype)
        ctx.save_for_backward(inputs, weight)
        ctx.x_dtype, ctx.rows, ctx.weight_dtypes = x.dtype, rows, [w.dtype for w in weights]
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(inputs, weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy: Tensor):
        inputs, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype).reshape(-1, weight.shape[0])
        dx = (dy @ weight).view(inputs.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dbias = dy.sum(0, dtype=ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[1] else None
        dweights = [None] * len(ctx.rows)
        if any(ctx.needs_input_grad[3:]):
            # One matmul for all segments, in the first's dtype (the segments of one layer share theirs).
            dweight = matmul(dy.T, inputs.reshape(-1, weight.shape[1]), ctx.weight_dtypes[0])
            dweights = [d if wanted else None for d, wanted in zip(dweight.split(ctx.rows), ctx.needs_input_grad[3:])]
        return dx, dbias, None, *dweights


def linear(x: Tensor, weights: list[Tensor], bias: Tensor | None = None) -> Tensor:
    """x @ cat(weights).T + bias (weights: segments along the output dim, e.g. a fused projection's parameters),
    in autocast's dtype where it is on, like F.linear; each weight's gradient in its own dtype."""
    return _Linear.apply(x, bias, compute_dtype(x, weights[0]), *weights)
