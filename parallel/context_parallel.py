"""Context parallelism for linear recurrences: the state entering each rank's slice of a sequence.

A layer whose state obeys h_t = exp(a_t) h_{t-1} + (input_t) can run each rank's slice from a zero
state and fix the result up afterwards: rank r needs only h_r = sum_{j<r} exp(a_{j+1} + ... + a_{r-1}) S_j,
where S_j is the final state of slice j from zero and a_j the slice's total log-decay (-inf where
nothing may pass, e.g. a document boundary). One all-gather of (S_j, a_j) per layer: its bytes do not
depend on the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from parallel.collectives import all_gather, reduce_scatter
from parallel.context import group_rank, group_size


def prefix_states(states: Tensor, decays: Tensor, rank: int) -> list[Tensor]:
    """[h_0, ..., h_rank] of h_0 = 0, h_{j+1} = decay_j * h_j + S_j, from the stacked slices'
    states (cp, ..., k) and decays = exp(a) (cp, ...) broadcast over the last dim."""
    hs = [torch.zeros_like(states[0])]
    for j in range(rank):
        hs.append(decays[j][..., None] * hs[-1] + states[j])
    return hs


class _IncomingState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed: Tensor, group: ProcessGroup):
        gathered = all_gather(packed[None], group, 0)  # (cp, b, h, k + 1)
        states, decays = gathered[..., :-1], torch.exp(gathered[..., -1])
        rank = group_rank(group)
        ctx.save_for_backward(states, decays)
        ctx.group, ctx.rank = group, rank
        return prefix_states(states, decays, rank)[rank]

    @staticmethod
    def backward(ctx, grad: Tensor):
        states, decays = ctx.saved_tensors
        hs = prefix_states(states, decays, ctx.rank)
        d_gathered = torch.zeros(*states.shape[:-1], states.shape[-1] + 1, dtype=grad.dtype, device=grad.device)
        for j in reversed(range(ctx.rank)):  # grad is dL/dh_{j+1}
            d_gathered[j, ..., :-1] = grad
            d_gathered[j, ..., -1] = (grad * hs[j]).sum(-1) * decays[j]  # d/da_j of exp(a_j) h_j
            grad = decays[j][..., None] * grad
        return reduce_scatter(d_gathered, ctx.group, 0)[0], None


def incoming_state(final_state: Tensor, log_decay: Tensor, group: ProcessGroup | None) -> Tensor:
    """The state entering this rank's slice (fp32, or fp64), shaped like final_state (zeros on rank 0).

    final_state: (b, h, ...) this slice's final state from a zero start; log_decay: (b, h) its total
    log-decay per head. Differentiable: the gradient of every rank's (S, a) is reduce-scattered back.
    """
    dtype = torch.promote_types(final_state.dtype, torch.float32)
    if group_size(group) == 1:
        return torch.zeros_like(final_state, dtype=dtype)
    b, h = log_decay.shape
    packed = torch.cat([final_state.to(dtype).reshape(b, h, -1), log_decay.to(dtype)[..., None]], dim=-1)
    return _IncomingState.apply(packed, group).reshape(final_state.shape)
