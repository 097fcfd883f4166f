"""megassm's Triton SSD (the Mamba-2 state-space dual), forward and backward: megassm/ops/ssd.py's
`ssd_chunked` in three forward and three backward kernels (two more per chunk walk on one long sequence) where
mamba-ssm's Triton path launches about fifteen.

Why: at the 780m model the SSD took about a third of an H200 training step while running ~4x above
the time its memory traffic needs; much of the gap is launches and intermediates (CB, dA_cumsum,
per-chunk states and their fp32 gradients) written by one kernel and read back by the next.

Notation (per batch row and head; the reference's): dt_t after bias, softplus and clamp; cs_t the
cumsum of dt_s * A over the tokens s <= t of t's chunk (Q tokens; Q need not be `chunk_size`: the
result is the same, so the kernels pick theirs); doc_t the document (seq_idx); per chunk c, doc_in
the document of the state entering it (the previous chunk's last token's; the first token's for
c = 0), doc_out and cs_last those of its last token; S[c] the state (p, n) entering chunk c.

Forward:
  (a) dt, cs, and the slope d(dt)/d(raw dt) for the backward                 _dt_kernel
  (b) S[c+1] = [doc_out == doc_in] exp(cs_last) S[c]
               + sum_j [doc_j == doc_out] exp(cs_last - cs_j) dt_j x_j B_j^T,   S[0] = initial states,
      sequential over chunks, parallel over (batch, head, p-tile, n-tile)         _states_kernel
      Where there are few (batch, head) walks (one long sequence: 48 at 780m), each is split into segments
      walked at once: S is linear in the state a segment is handed, so a first launch sums each segment
      into its end E[k] (the walk from zero, unrolled: each chunk's term times the carries after it) and
      carry K[k] (the product of its chunks' carries), a small one hands on S_in[k+1] = K[k] S_in[k] + E[k],
      and the walk then runs all segments from their S_in. A backward that recomputes the states walks from the S_in
      its forward handed on (SSDSaved.handed), without the first two launches.
  (c) y_i = sum_{j <= i, doc_j == doc_i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
            + [doc_i == doc_in] exp(cs_i) S[c] C_i + D x_i,   parallel over chunks  _output_kernel
  S[nchunks] is the final state (fp32). (b) keeps S in fp32 registers and stores S[c] in x's dtype,
  as mamba-ssm's chunk scan reads them.

Backward. Let G[c] = dL/dS[c+1], the gradient of the state leaving chunk c (G[nchunks-1] = d(final
states)). By (b) and (c), dL/dS[c] = [doc_out == doc_in] exp(cs_last) G[c] + sum_i [doc_i == doc_in]
exp(cs_i) dy_i C_i^T = G[c-1]: a reverse walk like (b) with (dy, C, exp(cs_i)) for (x, B,
exp(cs_last - cs_j)), ending at d(initial states), in segments as (b)              _state_grads_kernel
Every other gradient is local to a chunk given S[c] and G[c]. x_j, B_j, dt_j enter y through the
intra-chunk sum and S[c+1] through its second term, C_i through both terms of y_i; the product rule
gives dx, dB, dC and the direct part of ddt. The decays depend on cs: with the intra-chunk terms
T_ij = (C_i . B_j) exp(cs_i - cs_j) dt_j (dy_i . x_j) (j <= i, same document), U_i the state term of
y_i dotted with dy_i, and V_j = <G[c], [doc_j == doc_out] exp(cs_last - cs_j) dt_j x_j B_j^T>,
    ds_k = dL/dcs_k = sum_j T_kj - sum_i T_ik + U_k - V_k + [k == last] <G[c], S[c+1]>,
    <G[c], S[c+1]> = [doc_out == doc_in] exp(cs_last) <G[c], S[c]> + sum_j V_j,
all fp32 terms (nothing cancels between rounded gradients). cs is a cumsum of a_k = dt_k A, so
da_k = sum_{k' >= k in the chunk} ds_k', ddt_k += A da_k and dA = sum_k dt_k da_k. ddt then goes back
through the clamp (zero where clamped), softplus (times sigmoid) and the bias (d(dt_bias) = the sum of
ddt): times the slope (a) leaves; dD = sum_t dy_t . x_t.  _head_grads_kernel, _group_grads_kernel

Heads of one group share B and C: a program of (c) or of the group gradients takes several of them,
computing C B^T once and summing their dB, dC in registers (fp32 partial sums per slice of a group's
heads, added afterwards, where the heads are split over programs). All sums are deterministic (no
atomics). The chunk-parallel kernels take d_state in blocks of BLOCK_N (whole (Q, N) and (P, N) tiles spill
registers): (c) and the head gradients in a loop, the group gradients a program per block. Offsets from batch
and token indices are int64; offsets within a chunk's tile are int32 (Q x a row stride < 2^31).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from megassm.ops.ssd import NO_DT_LIMIT
from megassm.ops.ssd_triton_bwd import chunk_grads, state_grads
from megassm.ops.ssd_triton_fwd import chunk_outputs, chunk_states, discretize, walk_ends, walk_from

KERNEL_CHUNKS = (64, 128)  # internal chunk lengths tools/bench_ssd_kernels.py compares (any power of two >= 16 works)
DEFAULT_KERNEL_CHUNK = 64  # the fastest on an H200 (tools/tune_ssd_kernels.py: 32 and 128 are 1.3x and 1.7x slower)


class SSDSaved(NamedTuple):
    """What the forward leaves for the backward: dt processed, cs and d(dt processed)/d(dt) (b, h, l) fp32, states
    (b, nchunks, h, p, n), and the state handed to each segment of the states walk (None for one segment; a caller that
    drops the states keeps these, a state per segment, for the backward to recompute the states from)."""

    dt: Tensor
    cumsum: Tensor
    dt_slope: Tensor
    states: Tensor
    handed: Tensor | None
    kernel_chunk: int


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, kernel_chunk: int) -> None:
    batch, length, heads, _ = x.shape
    if heads % B.shape[2] or B.shape != C.shape or B.shape[:2] != (batch, length) or dt.shape != (batch, length, heads):
        raise ValueError(f"shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)} do not fit together")
    if A.shape != (heads,):
        raise ValueError(f"A must be (nheads,), got {tuple(A.shape)}")
    if B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"x, B and C must share a dtype, got {x.dtype}, {B.dtype}, {C.dtype}")
    if any(t.stride(-1) != 1 for t in (x, dt, B, C)):
        raise ValueError("x, dt, B and C need their last dimension contiguous")
    if kernel_chunk < 16 or kernel_chunk & (kernel_chunk - 1):
        raise ValueError(f"kernel_chunk must be a power of two >= 16, got {kernel_chunk}")


def _contiguous(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The small operands (parameters, states, document ids; autograd may hand an expanded d(final states))
    as the kernels index them: contiguous."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _chunk_walk(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, dt_bias: Tensor | None, initial_states: Tensor | None,
                seq_idx: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float], kernel_chunk: int,
                handed: Tensor | None = None) -> tuple[SSDSaved, Tensor]:
    """dt and cs, then the states entering every chunk (what the forward leaves for the backward), and the final states.
    handed: SSDSaved.handed of the forward this recomputes."""
    dt_processed, cumsum, dt_slope = discretize(dt, A, dt_bias, dt_softplus, dt_limit, kernel_chunk)
    states, final_states, handed = chunk_states(x, B, dt_processed, cumsum, seq_idx, initial_states, kernel_chunk, handed)
    return SSDSaved(dt_processed, cumsum, dt_slope, states, handed, kernel_chunk), final_states


def ssd_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
                dt_bias: Tensor | None = None, initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
                dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_DT_LIMIT,
                kernel_chunk: int = DEFAULT_KERNEL_CHUNK) -> tuple[Tensor, Tensor, SSDSaved]:
    """(y (b, l, h, p) contiguous in x's dtype, final states (b, h, p, n) fp32, what ssd_backward needs).
    Shapes and semantics of ssd_chunked; seq_idx: document ids (int32, e.g. as
    megassm.ops.int32_document_ids gives them). x, dt, B, C may be strided views
    (last dimension contiguous): they are read in place. `chunk_size` is the model's, kept for the
    signature: the kernels chunk by `kernel_chunk`, which gives the same result."""
    del chunk_size
    _check(x, dt, A, B, C, kernel_chunk)
    A, D, dt_bias, initial_states, seq_idx = _contiguous(A, D, dt_bias, initial_states, seq_idx)
    saved, final_states = _chunk_walk(x, dt, A, B, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit, kernel_chunk)
    y = chunk_outputs(x, B, C, saved.dt, saved.cumsum, seq_idx, saved.states, D, kernel_chunk)
    return y, final_states, saved


def ssd_forward_continued(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, continue_from: Callable[[Tensor, Tensor], Tensor],
                          D: Tensor | None = None, dt_bias: Tensor | None = None, seq_idx: Tensor | None = None,
                          dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_DT_LIMIT,
                          kernel_chunk: int = DEFAULT_KERNEL_CHUNK) -> tuple[Tensor, Tensor, SSDSaved]:
    """ssd_forward with initial states that depend on the final states from a zero start: (y, the initial states,
    what ssd_backward needs). continue_from(final states from zero (b, h, p, n) fp32, dt processed (b, h, l) fp32) gives
    them: under context parallelism, the state entering a rank's slice from every earlier rank's final state.
    The final states from zero come from the walk's segment ends (walk_ends), which then hand the walk from the
    initial states its segments' states: no second walk."""
    _check(x, dt, A, B, C, kernel_chunk)
    A, D, dt_bias, seq_idx = _contiguous(A, D, dt_bias, seq_idx)
    dt_processed, cumsum, dt_slope = discretize(dt, A, dt_bias, dt_softplus, dt_limit, kernel_chunk)
    ends = walk_ends(x, B, dt_processed, cumsum, seq_idx, kernel_chunk, reverse=False)
    final_from_zero, _ = walk_from(ends, None, reverse=False)
    states_shape = (x.shape[0], x.shape[2], x.shape[3], B.shape[3])  # (b, h, p, n)
    initial_states = continue_from(final_from_zero.view(states_shape), dt_processed).contiguous()
    handed = walk_from(ends, initial_states, reverse=False)[1] if ends.count > 1 else None
    states, _, handed = chunk_states(x, B, dt_processed, cumsum, seq_idx, initial_states, kernel_chunk, handed)
    saved = SSDSaved(dt_processed, cumsum, dt_slope, states, handed, kernel_chunk)
    return chunk_outputs(x, B, C, dt_processed, cumsum, seq_idx, states, D, kernel_chunk), initial_states, saved


def ssd_backward(dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
                 dt_bias: Tensor | None = None, initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
                 dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_DT_LIMIT, dfinal_states: Tensor | None = None,
                 saved: SSDSaved | None = None, dx: Tensor | None = None, ddt: Tensor | None = None, dB: Tensor | None = None,
                 dC: Tensor | None = None, kernel_chunk: int = DEFAULT_KERNEL_CHUNK, handed: Tensor | None = None,
                 dfinal_from: Callable[[Tensor], Tensor] | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, ddt, dA, dB, dC, dD, d(dt_bias), d(initial states)) from dy = dL/dy and, when the final states
    are an output, dfinal_states. ddt is for the raw dt (before bias, softplus and clamp), as mamba-ssm's.
    dx, ddt, dB, dC are written into the given buffers (strided views welcome, last dimension contiguous).
    `saved` is ssd_forward's third result; without it the forward's states are recomputed (the memory of
    mamba-ssm's backward, one more pass over x and B), from `handed` (that result's .handed) where given.

    The backward of ssd_forward_continued: dfinal_from(dL/d(initial states) through y) gives dL/d(final states from
    zero) (context parallelism: from the later ranks); the gradients are then those of y and of the final states
    from the initial ones, with that d(final states). The two differ only by exp(a) h, a the total log-decay and h
    the initial states, whose gradient for a, exp(a) <h, d(final)>, is what the exchange gives a (h_{r+1} =
    S_r + exp(a_r) h_r, parallel/context_parallel.py); d(initial states) is then not returned."""
    del chunk_size
    A, D, dt_bias, initial_states, seq_idx, dfinal_states = _contiguous(A, D, dt_bias, initial_states, seq_idx, dfinal_states)
    if saved is None:
        _check(x, dt, A, B, C, kernel_chunk)
        saved, _ = _chunk_walk(x, dt, A, B, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit, kernel_chunk, handed)
    dy = dy.to(x.dtype) if dy.stride(-1) == 1 else dy.to(x.dtype).contiguous()  # the kernels' dots take one dtype
    handed_grads = None
    if dfinal_from is not None:  # d(initial states) from dy alone by the reverse walk's segment ends, as the forward's final states
        ends = walk_ends(dy, C, saved.cumsum, saved.cumsum, seq_idx, saved.kernel_chunk, reverse=True)
        dinitial_states, _ = walk_from(ends, None, reverse=True)
        dfinal_states = dfinal_from(dinitial_states.view(x.shape[0], x.shape[2], x.shape[3], C.shape[3])).contiguous()
        handed_grads = walk_from(ends, dfinal_states, reverse=True)[1] if ends.count > 1 else None
    dstates, dinitial_states = state_grads(dy, C, saved.cumsum, seq_idx, dfinal_states, x.shape[2], saved.kernel_chunk, handed_grads)
    grads = chunk_grads(dy, x, dt, A, B, C, saved.dt, saved.cumsum, saved.dt_slope, saved.states, dstates, D, dt_bias, seq_idx,
                        saved.kernel_chunk, dx, ddt, dB, dC)
    return (*grads, None if initial_states is None or dfinal_from is not None else dinitial_states.to(initial_states.dtype))


class _SSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, dt_bias: Tensor | None,
                initial_states: Tensor | None, seq_idx: Tensor | None, chunk_size: int, dt_softplus: bool,
                dt_limit: tuple[float, float], kernel_chunk: int) -> tuple[Tensor, Tensor]:
        y, final_states, saved = ssd_forward(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                                             seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit, kernel_chunk=kernel_chunk)
        # The states are recomputed in backward, from the state handed to each segment of their walk.
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, saved.handed)
        ctx.options = (chunk_size, dt_softplus, dt_limit, kernel_chunk)
        ctx.set_materialize_grads(False)  # no d(final states) when they are not used: none to read
        return y, final_states

    @staticmethod
    def backward(ctx, dy: Tensor | None, dfinal_states: Tensor | None):
        x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, handed = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit, kernel_chunk = ctx.options
        dy = torch.zeros_like(x) if dy is None else dy
        dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial_states = ssd_backward(
            dy, x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
            dt_softplus=dt_softplus, dt_limit=dt_limit, dfinal_states=dfinal_states, kernel_chunk=kernel_chunk, handed=handed)
        return dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial_states, None, None, None, None, None


def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
               dt_bias: Tensor | None = None, initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
               dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_DT_LIMIT, return_final_states: bool = False,
               kernel_chunk: int = DEFAULT_KERNEL_CHUNK) -> Tensor | tuple[Tensor, Tensor]:
    """mamba_chunk_scan_combined's semantics (shapes and documents: megassm.ops.ssd.ssd_chunked; seq_idx
    int32 ids, as megassm.ops.int32_document_ids gives), differentiable, also through the final
    states. The per-chunk states (twice x's size at kernel chunk 64 and d_state 128) are recomputed in backward,
    as the fused mixer does: one more pass over x and B, and the memory of mamba-ssm's path."""
    y, final_states = _SSD.apply(x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, tuple(dt_limit),
                                 kernel_chunk)
    return (y, final_states) if return_final_states else y
