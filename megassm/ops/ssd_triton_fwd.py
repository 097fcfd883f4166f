"""The forward kernels of megassm's Triton SSD (the math and the plan: megassm/ops/ssd_triton.py).

Three launches: `_dt_kernel` (dt processing and the in-chunk cumsum of dt * A), `_states_kernel` (the
sequential walk over chunks that leaves the state entering each chunk) and `_output_kernel` (each
chunk's output from its own tokens and its entering state, parallel over chunks). A walk split into segments
(walk_plan: one long sequence) takes two launches more: its segments' ends and `_carry_kernel`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

DT_BLOCK_HEADS = 16  # heads per program of _dt_kernel
WALKS_PER_SM, MIN_SEGMENT_CHUNKS = 3, 16  # walk_segments
CARRY_BLOCK = 1024  # state values per program of _carry_kernel


def pow2(n: int) -> int:
    """A tile length covering n (Triton's tiles are powers of two, at least 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(n))


# Programs the forward kernels aim for (an H200 has 132 SMs): at 780m shapes a program per chunk with all 48 heads is
# 1.05x faster per layer than 12 heads (tools/tune_ssd_kernels.py).
TARGET_PROGRAMS = 256


def head_slice(heads_per_group: int, chunk_programs: int) -> int:
    """How many heads of one group a program handles (sharing B and C, and C B^T, between them): few enough
    to keep about TARGET_PROGRAMS programs when there are `chunk_programs` (batch x chunks x groups) programs per
    head, and a divisor of the group's heads."""
    wanted = max(1, heads_per_group * chunk_programs // TARGET_PROGRAMS)
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
def _chunk_rows(base, stride_l, start, rows, valid, cols, COLS: tl.constexpr):
    """A chunk's (rows, cols) tile of a (token, column) operand, zero past the sequence and past COLS columns."""
    return tl.load(base + start * stride_l + (rows[:, None] * stride_l + cols[None, :]), mask=valid[:, None] & (cols < COLS)[None, :],
                   other=0.0)


@triton.jit
def _state_tile(H, heads_per_group, first_segment, P: tl.constexpr, N: tl.constexpr, SEGMENTED: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """A chunk walk's program (grid: (batch x heads, p-tiles, segments x n-tiles)): its segment of the chunks (from
    first_segment), its (batch, head) index bh, b (int64), h, h's group g, and its (BLOCK_P, BLOCK_N) tile of a (P, N)
    state: the offsets within one state and which of them exist."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    if SEGMENTED:
        N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        n_tile = tl.program_id(2) % N_TILES
        segment = first_segment + tl.program_id(2) // N_TILES
    else:
        n_tile = tl.program_id(2)
        segment = 0
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    first_tile = (tl.program_id(1) == 0) & (n_tile == 0)
    return segment, first_tile, bh, b, h, h // heads_per_group, p, n, p[:, None] * N + n[None, :], (p < P)[:, None] & (n < N)[None, :]


@triton.jit
def _start_state(ptr, bh, P: tl.constexpr, N: tl.constexpr, tile, tile_ok, PRESENT: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The walk's starting tile in fp32: bh's (P, N) state at ptr where PRESENT, else zeros."""
    if PRESENT:
        return tl.load(ptr + bh.to(tl.int64) * P * N + tile, mask=tile_ok, other=0.0).to(tl.float32)
    return tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)


@triton.jit
def _walk_start(start_ptr, ends_ptr, segment, segments, bh, batch_heads, P: tl.constexpr, N: tl.constexpr, tile, tile_ok,
                HAS_START: tl.constexpr, SEGMENTED: tl.constexpr, REVERSE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """A walk's starting tile, fp32: the state at start_ptr (initial states, d(final states) in REVERSE) for the segment
    walked first; else the state _carry_kernel handed its segment."""
    state = _start_state(start_ptr, bh, P, N, tile, tile_ok, HAS_START, BLOCK_P, BLOCK_N)
    if SEGMENTED:
        handed_from = segment + 1 if REVERSE else segment - 1
        if (handed_from >= 0) & (handed_from < segments):
            state = tl.load(ends_ptr + (handed_from * batch_heads + bh).to(tl.int64) * P * N + tile, mask=tile_ok, other=0.0)
    return state


@triton.jit
def _segment_chunks(segment, segment_chunks, nchunks, SEGMENTED: tl.constexpr):
    """The first chunk of a walk's segment and the one after its last."""
    if SEGMENTED:
        return segment * segment_chunks, tl.minimum(nchunks, (segment + 1) * segment_chunks)
    return 0, nchunks


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
    (tools/tune_ssd_kernels.py on an H200, which also picked these two). The third, the wide tile capped at 168
    registers (three programs per SM, one wave of WALKS_PER_SM walks per SM), is the segmented walks' own
    (segment_configs): 1.1-1.2x the others at 64K tokens (bench/raw/h200_run15_call4_walk_breakdown_64k.txt)."""
    return [triton.Config({"BLOCK_P": bp, "BLOCK_N": bn}, num_warps=4, num_stages=s, maxnreg=r)
            for bp, bn, s, r in ((64, 128, 2, None), (16, 64, 3, None), (64, 128, 2, 168))]


def segment_configs(configs: list[triton.Config], named_args: dict, SEGMENTED: bool, **kwargs) -> list[triton.Config]:
    """The walks' candidates for this launch: the capped wide tile for a segmented walk, the other two for a whole one;
    all of them where the list was replaced by one config (tools/tune_ssd_kernels.py pins one, the interpreter tests too)."""
    return [c for c in configs if (c.maxnreg is not None) == SEGMENTED] or configs


@triton.autotune(configs=state_configs(), key=["batch_heads", "segments", "P", "N", "Q"],
                 prune_configs_by={"early_config_prune": segment_configs})
@triton.jit
def _states_kernel(x_ptr, B_ptr, dt_ptr, cs_ptr, seq_ptr, init_ptr, states_ptr, final_ptr, ends_ptr, L, nchunks, H,
                   heads_per_group, batch_heads, segments, segment_chunks,
                   stride_x_b, stride_x_l, stride_x_h, stride_B_b, stride_B_l, stride_B_g, stride_seq_b,
                   P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                   WHOLE: tl.constexpr, SEGMENTED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one (batch, head), a (BLOCK_P, BLOCK_N) tile of the state and one segment of `segment_chunks` chunks,
    chunk after chunk:
        states[c] = S (the state entering chunk c; final states: the last one),
        S <- [doc_out == doc_in] exp(cs_last) S + sum_j [doc_j == doc_out] exp(cs_last - cs_j) dt_j x_j B_j^T,
    S in fp32 registers, stored in states' dtype (final states: fp32). S starts as the initial states, or, after the
    first segment, as _carry_kernel left it from the segments' ends (_segment_ends_kernel). SEGMENTED: segments > 1 (a
    single walk compiles without their arithmetic, which costs the wide tile its third program per SM). batch_heads and
    segments also key the autotuning (the best tile depends on how many walks there are)."""
    segment, _, bh, b, h, g, p, n, tile, tile_ok = _state_tile(H, heads_per_group, 0, P, N, SEGMENTED, BLOCK_P, BLOCK_N)
    state = _walk_start(init_ptr, ends_ptr, segment, segments, bh, batch_heads, P, N, tile, tile_ok, HAS_INIT, SEGMENTED, False,
                        BLOCK_P, BLOCK_N)
    first, stop = _segment_chunks(segment, segment_chunks, nchunks, SEGMENTED)
    x_base = x_ptr + b * stride_x_b + h * stride_x_h
    B_base = B_ptr + b * stride_B_b + g * stride_B_g
    head_time = bh.to(tl.int64) * L  # (b, h) row of dt and cs
    for c in range(first, stop):
        tl.store(states_ptr + ((b * nchunks + c) * H + h) * P * N + tile, state.to(states_ptr.dtype.element_ty), mask=tile_ok)
        start, rows, valid, last, doc, doc_in, doc_out = _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ, Q, WHOLE)
        cs = tl.load(cs_ptr + head_time + start + rows, mask=valid, other=0.0)
        cs_last = tl.load(cs_ptr + head_time + start + last)
        dt = tl.load(dt_ptr + head_time + start + rows, mask=valid, other=0.0)
        weight = tl.where(valid & (doc == doc_out), tl.exp(cs_last - cs) * dt, 0.0)
        x = _chunk_rows(x_base, stride_x_l, start, rows, valid, p, P)
        Bc = _chunk_rows(B_base, stride_B_l, start, rows, valid, n, N)
        carry = tl.where(doc_out == doc_in, tl.exp(cs_last), 0.0)
        state = state * carry + tl.dot(tl.trans((x * weight[:, None]).to(x.dtype)), Bc)
    tl.store(final_ptr + bh.to(tl.int64) * P * N + tile, state, mask=tile_ok & (segment == segments - 1 or not SEGMENTED))


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
        # The state's term C_i S^T, then weighted by row: C's tile goes from memory to the dot as it is (weighting it first
        # cost 1.15x this kernel's time on an H200 at 780m).
        state = states_ptr + ((b * nchunks + c) * H + h) * P * N
        state_term = tl.zeros((Q, BLOCK_P), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            S = _tile(state, p, n, N, p < P, n < N)
            state_term = tl.dot(_tile(C_chunk, rows, n, stride_C_l, valid, n < N), tl.trans(S), state_term)
        in_w = tl.where(from_state, tl.exp(cs), 0.0)[:, None]
        y = tl.dot((CB * decay * dt[None, :]).to(x.dtype), x, in_w * state_term)
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


def ends_configs() -> list[triton.Config]:
    """The segments' ends: the wide tile, operands of the next chunks prefetched (a matmul's K loop)."""
    return [triton.Config({"BLOCK_P": 64, "BLOCK_N": 128}, num_warps=4, num_stages=s) for s in (3, 2)]


@triton.autotune(configs=ends_configs(), key=["batch_heads", "segments", "P", "N", "Q", "REVERSE"])
@triton.jit
def _segment_ends_kernel(v_ptr, k_ptr, dt_ptr, cs_ptr, seq_ptr, ends_ptr, carries_ptr, L, nchunks, H, heads_per_group, batch_heads,
                         segments, segment_chunks, first_segment, stride_v_b, stride_v_l, stride_v_h, stride_k_b, stride_k_l,
                         stride_k_g, stride_seq_b, P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, HAS_SEQ: tl.constexpr,
                         WHOLE: tl.constexpr, REVERSE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one (batch, head), a (BLOCK_P, BLOCK_N) tile and one segment: its end E, what the segment walked from zero
    hands on, and its carry K, the product of its chunks' carries (what it keeps of the state it is handed). Unrolled,
    the walk from zero is a sum over the segment's chunks with the carries of the chunks walked after each as weights:
        states (v, k = x, B):          E = sum_c K_after(c) sum_j [doc_j == doc_out] exp(cs_last - cs_j) dt_j x_j B_j^T,
        state gradients (REVERSE; dy, C): E = sum_c K_before(c) sum_i [doc_i == doc_in] exp(cs_i) dy_i C_i^T,
    so the chunks are taken against the walk's direction, K growing as a scalar, and E accumulates dot after dot as a
    matmul does, never rescaled (the walk waits on each dot to rescale its state)."""
    segment, first_tile, bh, b, h, g, p, n, tile, tile_ok = _state_tile(H, heads_per_group, first_segment, P, N, True, BLOCK_P, BLOCK_N)
    first, stop = _segment_chunks(segment, segment_chunks, nchunks, True)
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    k_base = k_ptr + b * stride_k_b + g * stride_k_g
    head_time = bh.to(tl.int64) * L
    end = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    kept = 1.0
    for i in range(stop - first):
        c = first + i if REVERSE else stop - 1 - i
        start, rows, valid, last, doc, doc_in, doc_out = _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ, Q, WHOLE)
        cs = tl.load(cs_ptr + head_time + start + rows, mask=valid, other=0.0)
        cs_last = tl.load(cs_ptr + head_time + start + last)
        if REVERSE:
            weight = tl.where(valid & (doc == doc_in), tl.exp(cs), 0.0)
        else:
            dt = tl.load(dt_ptr + head_time + start + rows, mask=valid, other=0.0)
            weight = tl.where(valid & (doc == doc_out), tl.exp(cs_last - cs) * dt, 0.0)
        v = _chunk_rows(v_base, stride_v_l, start, rows, valid, p, P)
        k = _chunk_rows(k_base, stride_k_l, start, rows, valid, n, N)
        end = tl.dot(tl.trans((v * (weight * kept)[:, None]).to(v.dtype)), k, end)
        kept *= tl.where(doc_out == doc_in, tl.exp(cs_last), 0.0)
    slot = segment * batch_heads + bh
    tl.store(ends_ptr + slot.to(tl.int64) * P * N + tile, end, mask=tile_ok)
    tl.store(carries_ptr + slot, kept, mask=first_tile)


def segment_ends(v: Tensor, k: Tensor, dt: Tensor, cs: Tensor, seq_idx: Tensor | None, segments: Segments, reverse: bool,
                 every: bool = False) -> None:
    """Each segment's end and carry into `segments` (_segment_ends_kernel): of all segments but the one walked last, or
    `every` one."""
    batch, length, heads, headdim = v.shape
    groups, dstate = k.shape[2:]
    chunk = segments.chunk
    count = segments.count if every else segments.count - 1
    grid = lambda meta: (batch * heads, triton.cdiv(headdim, meta["BLOCK_P"]), count * triton.cdiv(dstate, meta["BLOCK_N"]))  # noqa: E731
    _segment_ends_kernel[grid](v, k, dt, cs, v if seq_idx is None else seq_idx, segments.ends, segments.carries, length,
                               triton.cdiv(length, chunk), heads, heads // groups, batch * heads, segments.count, segments.chunks,
                               1 if reverse and not every else 0, v.stride(0), v.stride(1), v.stride(2), k.stride(0), k.stride(1),
                               k.stride(2),
                               0 if seq_idx is None else seq_idx.stride(0), P=headdim, N=dstate, Q=chunk, HAS_SEQ=seq_idx is not None,
                               WHOLE=length % chunk == 0, REVERSE=reverse)


@triton.jit
def _carry_kernel(start_ptr, ends_ptr, carries_ptr, out_ptr, batch_heads, segments, steps, SIZE: tl.constexpr, HAS_START: tl.constexpr,
                  REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """For one (batch, head) and BLOCK of its state's SIZE = P x N values, the first `steps` segments' ends in walk order
    (segments 0, 1, .. forward; S-1, S-2, .. in reverse): S <- carry[k] S + end[k], stored in out[k] (out may be ends):
    the state handed to the next segment walked, or after the last, the whole walk's. S starts as start (initial
    states, d(final states)) or zeros."""
    bh = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < SIZE
    if HAS_START:
        state = tl.load(start_ptr + bh.to(tl.int64) * SIZE + offsets, mask=ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(steps):
        k = segments - 1 - i if REVERSE else i
        slot = (k * batch_heads + bh).to(tl.int64) * SIZE + offsets
        state = state * tl.load(carries_ptr + k * batch_heads + bh) + tl.load(ends_ptr + slot, mask=ok, other=0.0)
        tl.store(out_ptr + slot, state, mask=ok)


class Segments(NamedTuple):
    """How the chunk walks split each (batch, head)'s chunks: `count` segments of `chunks` chunks walked at once, each
    handed its entering state by _carry_kernel from the ends (count, batch_heads, P, N) and carries (count, batch_heads),
    fp32, that _segment_ends_kernel leaves; `chunk`: tokens per chunk."""

    count: int
    chunks: int
    chunk: int
    ends: Tensor
    carries: Tensor


def walk_segments(batch_heads: int, nchunks: int, device: torch.device) -> int:
    """Into how many segments to split each walk: none where there are at least as many walks as SMs (a walk is
    latency-bound: e.g. one 64K-token sequence of 48 heads leaves most of the GPU's bandwidth unused), else into about
    WALKS_PER_SM walks per SM of at least MIN_SEGMENT_CHUNKS chunks. 1 on the CPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if batch_heads >= sms:
        return 1
    return max(1, min(WALKS_PER_SM * sms // batch_heads, nchunks // MIN_SEGMENT_CHUNKS))


def walk_plan(batch_heads: int, length: int, chunk: int, headdim: int, dstate: int, device: torch.device,
              ends: Tensor | None = None) -> Segments:
    """The segments of each walk over the chunks of `chunk` tokens (none of them empty) and their buffers (empty for one;
    `ends`: the states a hand-over left, for a walk that reuses them)."""
    nchunks = triton.cdiv(length, chunk)
    chunks = triton.cdiv(nchunks, walk_segments(batch_heads, nchunks, device))
    count = triton.cdiv(nchunks, chunks)
    slots = count if count > 1 else 0
    if ends is None:
        ends = torch.empty(slots, batch_heads, headdim, dstate, dtype=torch.float32, device=device)
    return Segments(count, chunks, chunk, ends, torch.empty(slots, batch_heads, dtype=torch.float32, device=device))


def carry_through(segments: Segments, start: Tensor | None, batch_heads: int, reverse: bool, out: Tensor | None = None,
                  through_last: bool = False) -> None:
    """The state handed to each segment from the ends and carries, in the ends' place or into `out` (_carry_kernel);
    through_last: also the state the whole walk leaves, in the last segment's slot (the first's in reverse)."""
    size = segments.ends[0, 0].numel()  # P x N
    grid = (batch_heads, triton.cdiv(size, CARRY_BLOCK))
    _carry_kernel[grid](segments.ends if start is None else start, segments.ends, segments.carries, segments.ends if out is None else out,
                        batch_heads, segments.count, segments.count - (0 if through_last else 1), SIZE=size, HAS_START=start is not None,
                        REVERSE=reverse, BLOCK=CARRY_BLOCK)


def walk_ends(v: Tensor, k: Tensor, dt: Tensor, cs: Tensor, seq_idx: Tensor | None, chunk: int, reverse: bool) -> Segments:
    """The segments of a walk over v's chunks (walk_plan; one where it makes one) with every segment's end and carry,
    from which carry_through hands each segment its state from any start, and gives the state the whole walk leaves
    without walking it: the walks' end from zero is a sum of dots (_segment_ends_kernel), writes no states."""
    batch, length, heads, headdim = v.shape
    plan = walk_plan(batch * heads, length, chunk, headdim, k.shape[-1], v.device)
    if plan.count == 1:
        plan = plan._replace(ends=torch.empty(1, batch * heads, headdim, k.shape[-1], dtype=torch.float32, device=v.device),
                             carries=torch.empty(1, batch * heads, dtype=torch.float32, device=v.device))
    segment_ends(v, k, dt, cs, seq_idx, plan, reverse, every=True)
    return plan


def walk_from(ends: Segments, start: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor | None]:
    """From walk_ends' segments: the state the walk from `start` (None: zero) leaves, fp32 (b x h, p, n), and the state
    it hands each segment (None for one segment), as chunk_states and state_grads take them."""
    batch_heads = ends.carries.shape[1]
    through = torch.empty_like(ends.ends)
    carry_through(ends, start, batch_heads, reverse, out=through, through_last=True)
    left = through[0 if reverse else ends.count - 1]
    return left, through if ends.count > 1 else None


def hand_over(v: Tensor, k: Tensor, dt: Tensor, cs: Tensor, seq_idx: Tensor | None, start: Tensor | None, chunk: int,
              reverse: bool, handed: Tensor | None = None) -> Segments:
    """The segments of a walk over v's chunks (walk_plan) and, where there are several, the state each is handed
    (segment_ends, then carry_through from `start`: initial states, d(final states) in reverse). `handed`: the states
    an earlier hand-over over the same operands left (its Segments.ends), taken as they are."""
    batch, length, heads, headdim = v.shape
    segments = walk_plan(batch * heads, length, chunk, headdim, k.shape[-1], v.device, ends=handed)
    if segments.count > 1 and handed is None:
        segment_ends(v, k, dt, cs, seq_idx, segments, reverse)
        carry_through(segments, start, batch * heads, reverse)
    return segments


def walk_grid(segments: Segments, batch_heads: int, headdim: int, dstate: int) -> Callable[[dict], tuple[int, int, int]]:
    """A walk kernel's grid: (batch x heads, p-tiles, segments x n-tiles)."""
    return lambda meta: (batch_heads, triton.cdiv(headdim, meta["BLOCK_P"]), segments.count * triton.cdiv(dstate, meta["BLOCK_N"]))


def chunk_states(x: Tensor, B: Tensor, dt: Tensor, cs: Tensor, seq_idx: Tensor | None, initial_states: Tensor | None,
                 chunk: int, handed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(states (b, nchunks, h, p, n) in x's dtype: the state entering each chunk; final states (b, h, p, n) fp32; the
    state handed to each segment, None for one segment). In segments (walk_plan): their ends, the states handed from one
    to the next, then all segments' walks at once. `handed`: what an earlier walk over the same operands returned (a
    recomputation): its segments are walked at once, without the two launches that hand their states over."""
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2:]
    states = torch.empty(states_shape(batch, length, heads, headdim, dstate, chunk), dtype=x.dtype, device=x.device)
    nchunks = states.shape[1]
    final = torch.empty(batch, heads, headdim, dstate, dtype=torch.float32, device=x.device)
    segments = hand_over(x, B, dt, cs, seq_idx, initial_states, chunk, reverse=False, handed=handed)
    grid = walk_grid(segments, batch * heads, headdim, dstate)
    _states_kernel[grid](x, B, dt, cs, x if seq_idx is None else seq_idx, x if initial_states is None else initial_states, states, final,
                         segments.ends, length, nchunks, heads, heads // groups, batch * heads, segments.count, segments.chunks,
                         x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
                         0 if seq_idx is None else seq_idx.stride(0), P=headdim, N=dstate, Q=chunk, HAS_INIT=initial_states is not None,
                         HAS_SEQ=seq_idx is not None, WHOLE=length % chunk == 0, SEGMENTED=segments.count > 1)
    return states, final, segments.ends if segments.count > 1 else None


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

