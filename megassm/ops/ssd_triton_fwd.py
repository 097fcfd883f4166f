"""The forward kernels of megassm's Triton SSD (the math and the plan: megassm/ops/ssd_triton.py).

Three launches: `_dt_kernel` (dt processing and the in-chunk cumsum of dt * A), `_states_kernel` (the
sequential walk over chunks that leaves the state entering each chunk) and `_output_kernel` (each
chunk's output from its own tokens and its entering state, parallel over chunks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DT_BLOCK_HEADS = 16  # heads per program of _dt_kernel


def pow2(n: int) -> int:
    """A tile length covering n (Triton's tiles are powers of two, at least 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(n))


def head_slice(heads_per_group: int, chunk_programs: int, target_programs: int = 256) -> int:
    """How many heads of one group a program handles (sharing B and C, and C B^T, between them): few enough
    to keep about `target_programs` programs (an H200 has 132 SMs) when there are `chunk_programs`
    (batch x chunks x groups) programs per head, and a divisor of the group's heads. 256: at 780m shapes a
    program per chunk with all 48 heads is 1.05x faster per layer than 12 heads (tools/tune_ssd_kernels.py)."""
    wanted = max(1, heads_per_group * chunk_programs // target_programs)
    return max(d for d in range(1, heads_per_group + 1) if heads_per_group % d == 0 and d <= wanted)


@triton.jit
def _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ: tl.constexpr, Q: tl.constexpr, WHOLE: tl.constexpr):
    """Chunk c's first token (int64), its rows from there (int32: tile offsets stay 32-bit), which exist,
    the last existing one, and the documents: of each token, of the state entering the chunk (the previous
    chunk's last token's, or the first token's), and of the last token (the state leaving the chunk).
    WHOLE: L is a multiple of Q, so every row exists and the masks on rows fold away (6-17% of the
    chunk-parallel kernels' instructions: tools/kernel_registers.py)."""
    start = tl.cast(c, tl.int64) * Q
    rows = tl.arange(0, Q)
    if WHOLE:
        valid = tl.full((Q,), 1, tl.int1)
        last = Q - 1
    else:
        valid = rows < L - start
        last = tl.minimum(Q, L - start).to(tl.int32) - 1
    if HAS_SEQ:
        seq = seq_ptr + b * stride_seq_b + start
        doc = tl.load(seq + rows, mask=valid, other=-1)
        doc_in = tl.load(seq + tl.where(c > 0, -1, 0))
        doc_out = tl.load(seq + last)
    else:
        doc = tl.where(valid, 0, -1)
        doc_in = 0
        doc_out = 0
    return start, rows, valid, last, doc, doc_in, doc_out


@triton.jit
def _state_tile(H, heads_per_group, P: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A chunk walk's program: its (batch, head) index bh, b (int64), h, h's group g, and its (BLOCK_P, BLOCK_N)
    tile of a (P, N) state: the offsets within one state and which of them exist."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    return bh, b, h, h // heads_per_group, p, n, p[:, None] * N + n[None, :], (p < P)[:, None] & (n < N)[None, :]


@triton.jit
def _start_state(ptr, bh, P: tl.constexpr, N: tl.constexpr, tile, tile_ok, PRESENT: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The walk's starting tile in fp32: bh's (P, N) state at ptr where PRESENT, else zeros."""
    if PRESENT:
        return tl.load(ptr + bh.to(tl.int64) * P * N + tile, mask=tile_ok, other=0.0).to(tl.float32)
    return tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)


@triton.jit
def _dt_kernel(dt_ptr, bias_ptr, A_ptr, dt_out_ptr, cs_out_ptr, slope_out_ptr, L, H, stride_dt_b, stride_dt_l, dt_min, dt_max,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr, BLOCK_H: tl.constexpr):
    """dt_t = clamp(softplus(dt_t + bias)), cs_t = sum of dt_s * A over the chunk's tokens s <= t, and the slope
    d(dt_t)/d(raw dt_t) (zero where clamped) for the backward, all fp32 in (b, h, l): the layout the other kernels
    read a head's chunk from. The slope here, on a (tokens, heads) tile, costs a few instructions per value where the
    head-gradient kernel, whose per-token vectors are spread over its warps, spent ~700 per program on it."""
    b, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    rows = c * Q + tl.arange(0, Q).to(tl.int64)
    ok = (rows < L)[:, None] & (heads < H)[None, :]
    dt = tl.load(dt_ptr + b * stride_dt_b + rows[:, None] * stride_dt_l + heads[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + heads, mask=heads < H, other=0.0).to(tl.float32)[None, :]
    slope = tl.full(dt.shape, 1.0, tl.float32)
    if SOFTPLUS:
        slope = tl.where(dt <= 20.0, tl.sigmoid(dt), 1.0)
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # torch's softplus: v itself above 20
    slope = tl.where(ok & (dt >= dt_min) & (dt <= dt_max), slope, 0.0)  # clamp's gradient: where not clamped
    dt = tl.where(ok, tl.minimum(tl.maximum(dt, dt_min), dt_max), 0.0)
    A = tl.load(A_ptr + heads, mask=heads < H, other=0.0).to(tl.float32)
    cs = tl.cumsum(dt * A[None, :], axis=0)
    out = (b * H + heads[None, :]) * L + rows[:, None]
    tl.store(dt_out_ptr + out, dt, mask=ok)
    tl.store(cs_out_ptr + out, cs, mask=ok)
    tl.store(slope_out_ptr + out, slope, mask=ok)


def state_configs() -> list[triton.Config]:
    """(BLOCK_P, BLOCK_N, stages) at 4 warps of the chunk walks (states, state gradients): a wide (64, 128) tile for many
    (batch, head) walks, a small one for a long sequence of few heads (enough programs: one per (batch, head, tile));
    stages > 1 prefetch the next chunks' operands while the state is updated (the one serial step is state * decay +
    dot). Two candidates only: timed alone, the autotuner preferred tiles 1.2-1.45x slower within the training step
    (tools/tune_ssd_kernels.py on an H200, which also picked these two)."""
    return [triton.Config({"BLOCK_P": bp, "BLOCK_N": bn}, num_warps=4, num_stages=s) for bp, bn, s in ((64, 128, 2), (16, 64, 3))]


@triton.autotune(configs=state_configs(), key=["batch_heads", "P", "N", "Q"])
@triton.jit
def _states_kernel(x_ptr, B_ptr, dt_ptr, cs_ptr, seq_ptr, init_ptr, states_ptr, final_ptr, L, nchunks, H, heads_per_group, batch_heads,
                   stride_x_b, stride_x_l, stride_x_h, stride_B_b, stride_B_l, stride_B_g, stride_seq_b,
                   P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                   WHOLE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one (batch, head) and a (BLOCK_P, BLOCK_N) tile of the state, chunk after chunk:
        states[c] = S (the state entering chunk c; final states: the last one),
        S <- [doc_out == doc_in] exp(cs_last) S + sum_j [doc_j == doc_out] exp(cs_last - cs_j) dt_j x_j B_j^T,
    S in fp32 registers, stored in states' dtype (final states: fp32). batch_heads only keys the autotuning
    (the best tile depends on how many (batch, head) programs there are)."""
    bh, b, h, g, p, n, tile, tile_ok = _state_tile(H, heads_per_group, P, N, BLOCK_P, BLOCK_N)
    state = _start_state(init_ptr, bh, P, N, tile, tile_ok, HAS_INIT, BLOCK_P, BLOCK_N)
    x_base = x_ptr + b * stride_x_b + h * stride_x_h
    B_base = B_ptr + b * stride_B_b + g * stride_B_g
    head_time = bh.to(tl.int64) * L  # (b, h) row of dt and cs
    for c in range(nchunks):
        tl.store(states_ptr + ((b * nchunks + c) * H + h) * P * N + tile, state.to(states_ptr.dtype.element_ty), mask=tile_ok)
        start, rows, valid, last, doc, doc_in, doc_out = _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ, Q, WHOLE)
        cs = tl.load(cs_ptr + head_time + start + rows, mask=valid, other=0.0)
        cs_last = tl.load(cs_ptr + head_time + start + last)
        dt = tl.load(dt_ptr + head_time + start + rows, mask=valid, other=0.0)
        weight = tl.where(valid & (doc == doc_out), tl.exp(cs_last - cs) * dt, 0.0)
        x = tl.load(x_base + start * stride_x_l + (rows[:, None] * stride_x_l + p[None, :]), mask=valid[:, None] & (p < P)[None, :],
                    other=0.0)
        Bc = tl.load(B_base + start * stride_B_l + (rows[:, None] * stride_B_l + n[None, :]), mask=valid[:, None] & (n < N)[None, :],
                     other=0.0)
        carry = tl.where(doc_out == doc_in, tl.exp(cs_last), 0.0)
        state = state * carry + tl.dot(tl.trans((x * weight[:, None]).to(x.dtype)), Bc)
    tl.store(final_ptr + bh.to(tl.int64) * P * N + tile, state, mask=tile_ok)


def _output_configs() -> list[triton.Config]:
    """d_state in blocks of BLOCK_N (one block of 128 was the fastest on an H200; the register-capped 64 next)."""
    return [triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=s, maxnreg=r) for bn, s, r in ((128, 2, None), (64, 1, 128))]


@triton.jit
def _tile(ptr, rows, cols, row_stride, rows_ok, cols_ok):
    """The (rows, cols) tile of a row-major matrix at ptr (row stride row_stride, columns contiguous), zero where absent."""
    return tl.load(ptr + (rows[:, None] * row_stride + cols[None, :]), mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, rows, cols, row_stride, rows_ok, cols_ok, value):
    """`value` into the (rows, cols) tile of a row-major matrix at ptr, in its dtype, where rows and columns exist."""
    tl.store(ptr + (rows[:, None] * row_stride + cols[None, :]), value.to(ptr.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


@triton.jit
def _same_document_causal(doc, Q: tl.constexpr):
    """(Q, Q): token j <= token i of the chunk, in i's document."""
    return (tl.arange(0, Q)[:, None] >= tl.arange(0, Q)[None, :]) & (doc[:, None] == doc[None, :])


@triton.jit
def _decay(causal, cs):
    """(Q, Q): exp(cs_i - cs_j) where `causal`, else 0 (the decay from token j to token i within the chunk)."""
    return tl.exp(tl.where(causal, cs[:, None] - cs[None, :], -float("inf")))


@triton.jit
def _skip_weight(D_ptr, h, p, P: tl.constexpr, D_PER_CHANNEL: tl.constexpr):
    """Head h's D, fp32: a (1, BLOCK_P) row per channel, or one scalar."""
    if D_PER_CHANNEL:
        return tl.load(D_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)[None, :]
    return tl.load(D_ptr + h).to(tl.float32)


@triton.jit
def _chunk_CB(C_chunk, B_chunk, stride_C_l, stride_B_l, rows, valid, N: tl.constexpr, Q: tl.constexpr, BLOCK_N: tl.constexpr):
    """C B^T of one chunk and group, (Q, Q) fp32, summed over d_state in blocks of BLOCK_N."""
    CB = tl.zeros((Q, Q), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        CB = tl.dot(_tile(C_chunk, rows, n, stride_C_l, valid, n < N), tl.trans(_tile(B_chunk, rows, n, stride_B_l, valid, n < N)), CB)
    return CB


@triton.autotune(configs=_output_configs(), key=["P", "N", "Q"])
@triton.jit
def _output_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, cs_ptr, seq_ptr, states_ptr, D_ptr, y_ptr, L, nchunks, H, heads_per_group,
                   heads_per_program,
                   stride_x_b, stride_x_l, stride_x_h, stride_B_b, stride_B_l, stride_B_g, stride_C_b, stride_C_l, stride_C_g,
                   stride_seq_b, stride_y_b, stride_y_l, stride_y_h,
                   P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_SEQ: tl.constexpr, WHOLE: tl.constexpr, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr):
    """Chunk c's outputs for `heads_per_program` heads of one group (sharing C B^T):
        y_i = sum_{j <= i, doc_j == doc_i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
              + [doc_i == doc_in] exp(cs_i) states[c] C_i + D x_i."""
    b, c = (tl.program_id(0) // nchunks).to(tl.int64), tl.program_id(0) % nchunks
    first_head = tl.program_id(1) * heads_per_program
    g = first_head // heads_per_group
    start, rows, valid, _, doc, doc_in, _ = _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ, Q, WHOLE)
    p = tl.arange(0, BLOCK_P)
    C_chunk = C_ptr + b * stride_C_b + start * stride_C_l + g * stride_C_g
    CB = _chunk_CB(C_chunk, B_ptr + b * stride_B_b + start * stride_B_l + g * stride_B_g, stride_C_l, stride_B_l, rows, valid, N, Q,
                   BLOCK_N)
    causal = _same_document_causal(doc, Q)
    from_state = doc == doc_in
    for k in range(heads_per_program):
        h = first_head + k
        chunk_time = (b * H + h) * L + start
        cs = tl.load(cs_ptr + chunk_time + rows, mask=valid, other=0.0)
        dt = tl.load(dt_ptr + chunk_time + rows, mask=valid, other=0.0)
        decay = _decay(causal, cs)
        x = _tile(x_ptr + b * stride_x_b + start * stride_x_l + h * stride_x_h, rows, p, stride_x_l, valid, p < P)
        y = tl.dot((CB * decay * dt[None, :]).to(x.dtype), x)
        in_w = tl.where(from_state, tl.exp(cs), 0.0)[:, None]
        state = states_ptr + ((b * nchunks + c) * H + h) * P * N
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            S = _tile(state, p, n, N, p < P, n < N)
            y = tl.dot((_tile(C_chunk, rows, n, stride_C_l, valid, n < N) * in_w).to(S.dtype), tl.trans(S), y)
        if HAS_D:
            y += _skip_weight(D_ptr, h, p, P, D_PER_CHANNEL) * x.to(tl.float32)
        _store_tile(y_ptr + b * stride_y_b + start * stride_y_l + h * stride_y_h, rows, p, stride_y_l, valid, p < P, y)


def discretize(dt: Tensor, A: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float],
               chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dt processed, in-chunk cumsum of dt * A, d(dt processed)/d(dt)), fp32, (b, h, l)."""
    batch, length, heads = dt.shape
    dt_out = torch.empty(batch, heads, length, dtype=torch.float32, device=dt.device)
    cs = torch.empty_like(dt_out)
    slope = torch.empty_like(dt_out)
    grid = (batch, triton.cdiv(length, chunk), triton.cdiv(heads, DT_BLOCK_HEADS))
    _dt_kernel[grid](dt, dt if dt_bias is None else dt_bias, A, dt_out, cs, slope, length, heads, dt.stride(0), dt.stride(1),
                     float(dt_limit[0]), float(dt_limit[1]), HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, Q=chunk,
                     BLOCK_H=DT_BLOCK_HEADS)
    return dt_out, cs, slope


def states_shape(batch: int, length: int, heads: int, headdim: int, dstate: int, chunk: int) -> tuple[int, ...]:
    """The per-chunk states' shape (b, nchunks, h, p, n): the state entering each chunk of `chunk` tokens."""
    return batch, triton.cdiv(length, chunk), heads, headdim, dstate


def chunk_states(x: Tensor, B: Tensor, dt: Tensor, cs: Tensor, seq_idx: Tensor | None, initial_states: Tensor | None,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """(states (b, nchunks, h, p, n) in x's dtype: the state entering each chunk; final states (b, h, p, n) fp32)."""
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2:]
    states = torch.empty(states_shape(batch, length, heads, headdim, dstate, chunk), dtype=x.dtype, device=x.device)
    nchunks = states.shape[1]
    final = torch.empty(batch, heads, headdim, dstate, dtype=torch.float32, device=x.device)
    grid = lambda meta: (batch * heads, triton.cdiv(headdim, meta["BLOCK_P"]), triton.cdiv(dstate, meta["BLOCK_N"]))  # noqa: E731
    _states_kernel[grid](x, B, dt, cs, x if seq_idx is None else seq_idx, x if initial_states is None else initial_states, states, final,
                         length, nchunks, heads, heads // groups, batch * heads, x.stride(0), x.stride(1), x.stride(2),
                         B.stride(0), B.stride(1), B.stride(2), 0 if seq_idx is None else seq_idx.stride(0),
                         P=headdim, N=dstate, Q=chunk, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
                         WHOLE=length % chunk == 0)
    return states, final


def chunk_outputs(x: Tensor, B: Tensor, C: Tensor, dt: Tensor, cs: Tensor, seq_idx: Tensor | None, states: Tensor, D: Tensor | None,
                  chunk: int) -> Tensor:
    """y (b, l, h, p), contiguous, in x's dtype."""
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2:]
    nchunks = triton.cdiv(length, chunk)
    heads_per_program = head_slice(heads // groups, batch * nchunks * groups)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = (batch * nchunks, heads // heads_per_program)
    _output_kernel[grid](x, B, C, dt, cs, x if seq_idx is None else seq_idx, states, x if D is None else D, y, length, nchunks, heads,
                         heads // groups, heads_per_program, x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
                         C.stride(0), C.stride(1), C.stride(2), 0 if seq_idx is None else seq_idx.stride(0),
                         y.stride(0), y.stride(1), y.stride(2), P=headdim, N=dstate, Q=chunk, BLOCK_P=pow2(headdim),
                         HAS_SEQ=seq_idx is not None, WHOLE=length % chunk == 0, HAS_D=D is not None,
                         D_PER_CHANNEL=D is not None and D.dim() == 2)
    return y

