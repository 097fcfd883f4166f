"""Context parallelism for linear recurrences: the state entering each rank's slice of a sequence.

A layer whose state obeys h_t = exp(a_t) h_{t-1} + (input_t) can run each rank's slice from a zero
state and fix the result up afterwards: rank r needs only h_r = sum_{j<r} exp(a_{j+1} + ... + a_{r-1}) S_j,
where S_j is the final state of slice j from zero and a_j the slice's total log-decay (-inf where
nothing may pass, e.g. a document boundary). One all-gather of (S_j, a_j) per layer: its bytes do not
depend on the sequence length.
"""

from __future__ import annotations

from typing import NamedTuple

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


class StateExchange(NamedTuple):
    """What the backward of one exchange of slice states needs: every rank's (S_j, exp(a_j)) as gathered."""

    states: Tensor  # (cp, b, h, k)
    decays: Tensor  # (cp, b, h)
    group: ProcessGroup


def _pack(final_state: Tensor, log_decay: Tensor) -> Tensor:
    dtype = torch.promote_types(final_state.dtype, torch.float32)
    b, h = log_decay.shape
    return torch.cat([final_state.to(dtype).reshape(b, h, -1), log_decay.to(dtype)[..., None]], dim=-1)


def exchange_states(final_state: Tensor, log_decay: Tensor, group: ProcessGroup) -> tuple[Tensor, StateExchange]:
    """incoming_state on a group of several ranks, outside autograd: the state entering this rank's slice, and what
    `exchanged_state_grads` takes back. For a kernel that runs the exchange inside its own forward and backward."""
    gathered = all_gather(_pack(final_state, log_decay)[None], group, 0)  # (cp, b, h, k + 1)
    exchange = StateExchange(gathered[..., :-1], torch.exp(gathered[..., -1]), group)
    rank = group_rank(group)
    return prefix_states(exchange.states, exchange.decays, rank)[rank].reshape(final_state.shape), exchange


def exchanged_state_grads(grad: Tensor, exchange: StateExchange) -> tuple[Tensor, Tensor]:
    """(d(final_state), d(log_decay)) of this rank from grad = dL/dh of the state exchange_states returned it: every
    rank's grad reaches the ranks before it, reduce-scattered back."""
    states, decays, group = exchange
    rank = group_rank(group)
    grad = grad.reshape(states.shape[1:]).to(states.dtype)
    hs = prefix_states(states, decays, rank)
    d_gathered = torch.zeros(*states.shape[:-1], states.shape[-1] + 1, dtype=states.dtype, device=states.device)
    for j in reversed(range(rank)):  # grad is dL/dh_{j+1}
        d_gathered[j, ..., :-1] = grad
        d_gathered[j, ..., -1] = (grad * hs[j]).sum(-1) * decays[j]  # d/da_j of exp(a_j) h_j
        grad = decays[j][..., None] * grad
    mine = reduce_scatter(d_gathered, group, 0)[0]
    return mine[..., :-1], mine[..., -1]


class _IncomingState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, final_state: Tensor, log_decay: Tensor, group: ProcessGroup):
        h, ctx.exchange = exchange_states(final_state, log_decay, group)
        ctx.shape = final_state.shape
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        d_state, d_log_decay = exchanged_state_grads(grad, ctx.exchange)
        return d_state.reshape(ctx.shape), d_log_decay, None


def incoming_state(final_state: Tensor, log_decay: Tensor, group: ProcessGroup | None) -> Tensor:
    """The state entering this rank's slice (fp32, or fp64), shaped like final_state (zeros on rank 0).

    final_state: (b, h, ...) this slice's final state from a zero start; log_decay: (b, h) its total
    log-decay per head. Differentiable: the gradient of every rank's (S, a) is reduce-scattered back.
    """
    if group_size(group) == 1:
        return torch.zeros_like(final_state, dtype=torch.promote_types(final_state.dtype, torch.float32))
    return _IncomingState.apply(final_state, log_decay, group)
