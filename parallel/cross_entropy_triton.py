"""One chunk's cross-entropy and its gradient w.r.t. the logits as one Triton kernel, the gradient written over the
logits (the chunked loss's one-rank path, parallel/chunked_loss.py).

Why: torch.compile made two kernels of it that went over the chunk's logits several times, an fp32 gradient among
them. Here a program takes one row: a first pass keeps a running max and sum of exponentials, a second (the row
is still in L2) writes (softmax - onehot(target)) * scale in the logits' place. A 780m step of 8 x 2048 tokens on
an H200: 1.6 ms instead of 3.4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_V, NUM_WARPS = 2048, 8  # vocabulary columns per loop step, and warps per program (one row)
FAR_BELOW = -1e30  # the running max's start: finite, so that exp(max - new max) of a lane that saw nothing is 1, not nan


@triton.jit
def _loss_and_grad_kernel(logits_ptr, target_ptr, hit_ptr, scale_ptr, lse_ptr, target_logit_ptr, V, stride_row,
                          BLOCK_V: tl.constexpr, FAR_BELOW: tl.constexpr):
    """Row r: lse = log sum_v exp(l_v), the target's logit, and l_v <- (exp(l_v - lse) - [v == target and hit]) * scale."""
    row = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full((BLOCK_V,), FAR_BELOW, tl.float32)
    running_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        value = tl.load(logits + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, value)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(value - new_max)
        running_max = new_max
    largest = tl.max(running_max, axis=0)
    lse = tl.log(tl.sum(running_sum * tl.exp(running_max - largest), axis=0)) + largest
    target = tl.load(target_ptr + row)
    tl.store(lse_ptr + row, lse)
    tl.store(target_logit_ptr + row, tl.load(logits + target).to(tl.float32))
    scale = tl.load(scale_ptr + row)
    hit_scale = tl.where(tl.load(hit_ptr + row), scale, 0.0)
    for start in range(0, V, BLOCK_V):
        index = start + cols
        value = tl.load(logits + index, mask=index < V, other=0.0).to(tl.float32)
        grad = tl.exp(value - lse) * scale - tl.where(index == target, hit_scale, 0.0)
        tl.store(logits + index, grad.to(logits_ptr.dtype.element_ty), mask=index < V)


def loss_and_grad_in_place(logits: Tensor, local_target: Tensor, hit: Tensor, scale: Tensor,
                           reduce_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """chunked_loss._chunk_loss_and_grad's (log-sum-exp, target logit, d loss / d logits) for a chunk's logits (n, V),
    the gradient written over `logits` (which it returns); lse and the target's logit in fp32 (reduce_dtype's)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("the logits need their vocabulary dimension contiguous")
    lse, target_logit = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(2))
    _loss_and_grad_kernel[(rows,)](logits, local_target, hit, scale.to(torch.float32), lse, target_logit, vocab, logits.stride(0),
                                   BLOCK_V=BLOCK_V, FAR_BELOW=FAR_BELOW, num_warps=NUM_WARPS)
    return lse.to(reduce_dtype), target_logit.to(reduce_dtype), logits
