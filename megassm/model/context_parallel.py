"""Context parallelism for SSD by passing chunk states (docs/architecture.md section 5; Mamba-2 paper, 8.2).

Each CP rank has run SSD on its slice from a zero state, giving y0 and its final state S_r. Here it
learns the state h_r entering its slice (one all-gather of (S_r, a_r) over the CP group, in
parallel.incoming_state) and adds that state's contribution to its outputs:
    y[t] += exp(cumsum(dt * A)[t]) * C_t . h_r     for the tokens of the slice's first document,
and nothing when the slice starts a new document. a_r, the slice's total log-decay, is -inf when a
document starts inside (or at the start of) the slice: no state passes through a reset.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megassm.ops.dtypes import upcast
from megassm.ops.ssd import discretize_dt, slice_documents
from parallel import incoming_state


def slice_decays(
    dt: Tensor,
    A: Tensor,
    dt_bias: Tensor,
    dt_limit: tuple[float, float],
    seq_idx: Tensor | None,
    halo_seq_idx: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(a, decay): the slice's total log-decay a (b, h), -inf where a document starts in the slice, and
    the factor exp(cumsum(dt * A)) (b, l, h) by which the incoming state reaches each token (0 where it
    does not: after the slice's first document, or everywhere if the slice starts a new document)."""
    dA = discretize_dt(dt, dt_bias, True, dt_limit) * A  # fp32
    log_decay = dA.sum(dim=1)
    # The scan along the last dim: torch's cumsum over dim 1 of (b, l, h) runs one thread per head
    # through all l tokens, and was a third of a CP step at 32K tokens (bench/RESULTS.md).
    decay = torch.exp(dA.transpose(1, 2).cumsum(-1).transpose(1, 2))
    if seq_idx is not None:
        continues, passes = slice_documents(seq_idx, halo_seq_idx)
        log_decay = log_decay.masked_fill(~passes[:, None], -math.inf)
        receives = (seq_idx == seq_idx[:, :1]) & continues[:, None]
        decay = decay * receives[..., None]
    return log_decay, decay


def apply_incoming_state(y: Tensor, h: Tensor, C: Tensor, decay: Tensor) -> Tensor:
    """y (b, l, h, p) + decay[t] * C_t . h for every token; h (b, h, p, n) fp32."""
    batch, seqlen, nheads, headdim = y.shape
    ngroups, dstate = C.shape[2], C.shape[3]
    heads_per_group = nheads // ngroups
    contribution = torch.einsum(
        "blgn,bgkpn,blgk->blgkp",
        upcast(C),
        h.reshape(batch, ngroups, heads_per_group, headdim, dstate),
        decay.reshape(batch, seqlen, ngroups, heads_per_group),
    )
    return (upcast(y) + contribution.reshape(y.shape)).to(y.dtype)


def add_incoming_state(
    y: Tensor,
    final_state: Tensor,
    dt: Tensor,
    A: Tensor,
    C: Tensor,
    dt_bias: Tensor,
    dt_limit: tuple[float, float],
    seq_idx: Tensor | None,
    halo_seq_idx: Tensor | None,
    cp_group: ProcessGroup | None,
) -> Tensor:
    """y (b, l, h, p) computed from a zero state -> y with the state entering this rank's slice."""
    log_decay, decay = slice_decays(dt, A, dt_bias, dt_limit, seq_idx, halo_seq_idx)
    return apply_incoming_state(y, incoming_state(final_state, log_decay, cp_group), C, decay)
