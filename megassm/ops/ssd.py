"""SSD (the Mamba-2 state-space dual), chunked as in the Mamba-2 paper, section 6, in plain PyTorch.

For each head h the recurrence is  state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T  and
y_t = state_t C_t + D_h * x_t. The chunked form computes it with matmuls only:
  1. the output of each chunk from its own tokens (a masked, decayed C B^T "attention"),
  2. the state each chunk leaves behind when it starts from zero,
  3. the states entering every chunk, by a (chunks x chunks) decay matrix over those,
  4. the contribution of each entering state to its chunk's outputs.
One more token continuing a state (generation) is the recurrence itself (`ssd_step`): no chunk to pad.

Documents. `seq_idx` (batch, seqlen) holds a document id per token, a document's tokens in a row (only
equality is read: megassm.ops.int32_document_ids wraps large ids); nothing crosses a change of id.
`initial_states` belong to the document of the first token, and the final state is that of the last
token's document. This is the convention of mamba-ssm's Triton kernels once `seq_idx` starts at 0
(ssd() in this package shifts it so where initial_states are given), which lets context parallelism
hand a rank its incoming state as `initial_states`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.ops.dtypes import upcast

NO_DT_LIMIT = (0.0, math.inf)


def discretize_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]) -> Tensor:
    """dt in fp32 (fp64 stays fp64) as the kernels use it: (dt + bias), softplus, clamp to dt_limit."""
    dt = upcast(dt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def slice_documents(seq_idx: Tensor, halo_seq_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Context parallelism's two facts about a rank's slice of each row, (b,) bool each: whether its first token continues
    the document of the previous rank's last token (halo_seq_idx[:, -1]), so that the state entering the slice reaches
    it; and whether that document also runs through the whole slice, so that the state passes on to the next rank."""
    continues = seq_idx[:, 0] == halo_seq_idx[:, -1]
    return continues, continues & (seq_idx[:, 0] == seq_idx[:, -1])


def _masked_exp(log_decay: Tensor, keep: Tensor) -> Tensor:
    """exp(log_decay) where keep, exactly 0 elsewhere (masking before exp keeps gradients finite)."""
    return torch.exp(log_decay.masked_fill(~keep, -math.inf))


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference SSD. Shapes as mamba-ssm's `mamba_chunk_scan_combined`:
    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,) or (h, p),
    initial_states (b, h, p, n), seq_idx (b, l). Returns y like x (and final states, fp32).
    Computes in fp32 (fp64 if x is fp64)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype

    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit).to(compute)
    xs, Bs, Cs = (t.to(compute) for t in (x, B, C))
    # Heads h of group g are h // (nheads // ngroups) == g, as in mamba-ssm.
    Bs = Bs.repeat_interleave(nheads // ngroups, dim=2)
    Cs = Cs.repeat_interleave(nheads // ngroups, dim=2)

    # Pad to whole chunks with dt = 0: padded tokens neither decay nor feed the state.
    pad = -seqlen % chunk_size
    if pad:
        xs, Bs, Cs = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xs, Bs, Cs))
        dt = F.pad(dt, (0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.long, device=x.device)
    doc = F.pad(seq_idx.long(), (0, pad), mode="replicate") if pad else seq_idx.long()

    def chunked(t: Tensor) -> Tensor:
        return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])

    xs, Bs, Cs, dt, doc = map(chunked, (xs, Bs, Cs, dt, doc))
    dA_cumsum = torch.cumsum(dt * A.to(compute), dim=2)  # (b, c, q, h)

    # 1. Intra-chunk outputs: y_i = sum_{j<=i, same doc} C_i.B_j exp(cs_i - cs_j) dt_j x_j.
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    same_doc = doc[:, :, :, None] == doc[:, :, None, :]  # (b, c, i, j)
    log_decay = dA_cumsum[:, :, :, None, :] - dA_cumsum[:, :, None, :, :]  # (b, c, i, j, h)
    decay = _masked_exp(log_decay, (causal & same_doc)[..., None])
    scores = torch.einsum("bcihn,bcjhn->bcijh", Cs, Bs) * decay * dt[:, :, None, :, :]
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xs)

    # 2. The state each chunk leaves behind, from zero, counting only its last document's tokens.
    in_last_doc = doc == doc[:, :, -1:]
    decay_to_end = _masked_exp(dA_cumsum[:, :, -1:, :] - dA_cumsum, in_last_doc[..., None])
    chunk_states = torch.einsum("bcjhn,bcjh,bcjhp->bchpn", Bs, decay_to_end * dt, xs)

    # 3. States entering each chunk: entering[c] = sum_{k<c} exp(total_{k+1} + ... + total_{c-1}) S_k,
    # with S_{-1} = initial_states, and only while the document does not change.
    if initial_states is None:
        initial_states = torch.zeros(batch, nheads, headdim, dstate, dtype=compute, device=x.device)
    states = torch.cat([initial_states.to(compute)[:, None], chunk_states], dim=1)  # (b, 1 + c, h, p, n)
    totals = F.pad(dA_cumsum[:, :, -1, :], (0, 0, 1, 0))  # (b, 1 + c, h): slot k+1 is chunk k's total
    totals_cumsum = torch.cumsum(totals, dim=1)
    end_doc = torch.cat([doc[:, :1, 0], doc[:, :, -1]], dim=1)  # document of each of those states
    # Entering chunk c (c = 0..nchunks; nchunks is the final state) from state slot k (k = 0..c).
    log_decay = totals_cumsum[:, :, None, :] - totals_cumsum[:, None, :, :]  # (b, c+1 dst, k src, h)
    slots = nchunks + 1
    keep = torch.ones(slots, slots, dtype=torch.bool, device=x.device).tril()
    keep = keep & (end_doc[:, :, None] == end_doc[:, None, :])
    entering = torch.einsum("bckh,bkhpn->bchpn", _masked_exp(log_decay, keep[..., None]), states)

    # 4. Contribution of the entering state to tokens of its document in each chunk.
    from_entering = (doc == end_doc[:, :-1, None])[..., None]
    state_decay = _masked_exp(dA_cumsum, from_entering)
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", Cs, entering[:, :-1], state_decay)

    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    if D is not None:
        D = D.to(compute)
        y = y + x.to(compute) * (D[:, None] if D.dim() == 1 else D)
    y = y.to(out_dtype)
    if return_final_states:
        return y, entering[:, -1].float() if compute == torch.float32 else entering[:, -1]
    return y


def ssd_step(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    state: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
) -> tuple[Tensor, Tensor]:
    """One token by the recurrence, shapes as ssd_chunked's with seqlen 1: x (b, 1, h, p), state (b, h, p, n)
    (its initial_states). Returns y like x and the state after the token, fp32 (fp64 if x is fp64)."""
    nheads, ngroups = x.shape[2], B.shape[2]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt = discretize_dt(dt[:, 0], dt_bias, dt_softplus, dt_limit).to(compute)  # (b, h)
    xs = x[:, 0].to(compute)  # (b, h, p)
    # Heads h of group g are h // (nheads // ngroups) == g, as in the chunked scan.
    Bs, Cs = (t[:, 0].to(compute).repeat_interleave(nheads // ngroups, dim=1) for t in (B, C))  # (b, h, n)
    state = torch.exp(dt * A.to(compute))[..., None, None] * state.to(compute) + (dt[..., None] * xs)[..., None] * Bs[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, Cs)
    if D is not None:
        D = D.to(compute)
        y = y + xs * (D[:, None] if D.dim() == 1 else D)
    return y[:, None].to(x.dtype), state
