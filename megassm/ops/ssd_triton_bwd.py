"""The backward kernels of megassm's Triton SSD (the derivation: megassm/ops/ssd_triton.py).

Three launches after the forward's dt kernel (and, when the forward's states were not kept, its states
kernel; two more for a walk in segments, as in the forward): `_state_grads_kernel` walks the chunks in
reverse and leaves G[c], the gradient of the state leaving each chunk; `_head_grads_kernel` then gives
each head's dx, ddt (and partial sums of dA, d(dt_bias), dD) of a chunk from its tokens, its entering
state and G[c], and `_group_grads_kernel` the dB and dC of a chunk summed over a group's heads; both
parallel over chunks. The head kernel hands the group kernel each head's (Q, Q) W dt (bf16, as big as x
at Q = headdim), which the group kernel would otherwise recompute (dy x^T and the decays): at 780m on an
H200 the pair took 1.19x less time that way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megassm.ops.column_sums import column_sums
from megassm.ops.ssd_triton_fwd import (_chunk_rows, _chunk_tokens, _decay, _segment_chunks, _skip_weight, _state_tile, _store_tile, _tile,
                                        _walk_start, hand_over, head_slice, pow2, segment_configs, state_configs, walk_grid)


@triton.autotune(configs=state_configs(), key=["batch_heads", "segments", "P", "N", "Q"],
                 prune_configs_by={"early_config_prune": segment_configs})
@triton.jit
def _state_grads_kernel(dy_ptr, C_ptr, cs_ptr, seq_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, ends_ptr, L, nchunks, H,
                        heads_per_group, batch_heads, segments, segment_chunks,
                        stride_dy_b, stride_dy_l, stride_dy_h, stride_C_b, stride_C_l, stride_C_g, stride_seq_b,
                        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr,
                        SEGMENTED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one (batch, head), a (BLOCK_P, BLOCK_N) tile and one segment of `segment_chunks` chunks, chunk after chunk
    from its last:
        dstates[c] = G (the gradient of the state leaving chunk c; at first d(final states)),
        G <- [doc_out == doc_in] exp(cs_last) G + sum_i [doc_i == doc_in] exp(cs_i) dy_i C_i^T,
    and d(initial states) = G at the end of the first segment; G in fp32 registers, dstates in its dtype. G starts as
    d(final states), or, before the last segment, as _carry_kernel left it from the later segments' ends (as in
    _states_kernel)."""
    segment, _, bh, b, h, g, p, n, tile, tile_ok = _state_tile(H, heads_per_group, 0, P, N, SEGMENTED, BLOCK_P, BLOCK_N)
    grad = _walk_start(dfinal_ptr, ends_ptr, segment, segments, bh, batch_heads, P, N, tile, tile_ok, HAS_DFINAL, SEGMENTED, True,
                       BLOCK_P, BLOCK_N)
    dy_base = dy_ptr + b * stride_dy_b + h * stride_dy_h
    C_base = C_ptr + b * stride_C_b + g * stride_C_g
    head_time = bh.to(tl.int64) * L
    first, stop = _segment_chunks(segment, segment_chunks, nchunks, SEGMENTED)
    for k in range(stop - first):
        c = stop - 1 - k
        tl.store(dstates_ptr + ((b * nchunks + c) * H + h) * P * N + tile, grad.to(dstates_ptr.dtype.element_ty), mask=tile_ok)
        # Row masks kept (WHOLE False): folding them away costs this kernel registers and, at 780m, its third program per SM.
        start, rows, valid, last, doc, doc_in, doc_out = _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ, Q, False)
        cs = tl.load(cs_ptr + head_time + start + rows, mask=valid, other=0.0)
        cs_last = tl.load(cs_ptr + head_time + start + last)
        weight = tl.where(valid & (doc == doc_in), tl.exp(cs), 0.0)
        dy = _chunk_rows(dy_base, stride_dy_l, start, rows, valid, p, P)
        Cc = _chunk_rows(C_base, stride_C_l, start, rows, valid, n, N)
        carry = tl.where(doc_out == doc_in, tl.exp(cs_last), 0.0)
        grad = grad * carry + tl.dot(tl.trans((dy * weight[:, None]).to(dy.dtype)), Cc)
    tl.store(dinit_ptr + bh.to(tl.int64) * P * N + tile, grad, mask=tile_ok & (segment == 0 or not SEGMENTED))


@triton.jit
def _head_chunk(b, h, start, rows, valid, last, p, H, L, x_ptr, dy_ptr, dt_ptr, cs_ptr, stride_x_b, stride_x_l, stride_x_h,
                stride_dy_b, stride_dy_l, stride_dy_h, P: tl.constexpr):
    """Head h's part of the chunk: cs, cs at the last token, dt, x, dy."""
    chunk_time = (b * H + h) * L + start
    cs = tl.load(cs_ptr + chunk_time + rows, mask=valid, other=0.0)
    cs_last = tl.load(cs_ptr + chunk_time + last)
    dt = tl.load(dt_ptr + chunk_time + rows, mask=valid, other=0.0)
    x = _tile(x_ptr + b * stride_x_b + start * stride_x_l + h * stride_x_h, rows, p, stride_x_l, valid, p < P)
    dy = _tile(dy_ptr + b * stride_dy_b + start * stride_dy_l + h * stride_dy_h, rows, p, stride_dy_l, valid, p < P)
    return cs, cs_last, dt, x, dy


@triton.jit
def _W_dt_tile(W_dt_ptr, h, H, rows, Q: tl.constexpr):
    """Pointers to head h's (Q, Q) tile of this program's chunk (program_id(0): batch x chunk) in W_dt, row-major: row
    j, column i holds W_ij dt_j."""
    return W_dt_ptr + (tl.program_id(0).to(tl.int64) * H + h) * Q * Q + rows[:, None] * Q + rows[None, :]


@triton.jit
def _decay_to_later(doc, cs, Q: tl.constexpr):
    """(Q, Q), row j, column i: exp(cs_i - cs_j) where token i is at or after token j in j's document, else 0 (the
    decay from j to i: _decay's tile, transposed)."""
    later = (tl.arange(0, Q)[None, :] >= tl.arange(0, Q)[:, None]) & (doc[None, :] == doc[:, None])
    return _decay(later, -cs)  # exp(-cs_j + cs_i) at [j, i]


def _head_grad_configs() -> list[triton.Config]:
    """d_state in blocks of BLOCK_N, stages prefetching the next block: 1.05x whole (Q, N) tiles on an H200."""
    return [triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=s) for bn, s in ((64, 3), (32, 3))]


@triton.autotune(configs=_head_grad_configs(), key=["P", "N", "Q"])
@triton.jit
def _head_grads_kernel(x_ptr, B_ptr, C_ptr, dy_ptr, dt_ptr, cs_ptr, slope_ptr, A_ptr, D_ptr, seq_ptr, states_ptr, dstates_ptr,
                       dx_ptr, ddt_ptr, W_dt_ptr, part_ptr, L, nchunks, H, heads_per_group,
                       stride_x_b, stride_x_l, stride_x_h, stride_B_b, stride_B_l, stride_B_g, stride_C_b, stride_C_l, stride_C_g,
                       stride_dy_b, stride_dy_l, stride_dy_h, stride_seq_b, stride_dx_b, stride_dx_l,
                       stride_dx_h, stride_ddt_b, stride_ddt_l, P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEQ: tl.constexpr, WHOLE: tl.constexpr, HAS_D: tl.constexpr,
                       D_PER_CHANNEL: tl.constexpr):
    """Chunk c's dx and ddt of head h, and its partial sums of dD, dA and d(dt_bias) (column h of the chunk's rows of
    `part`: dD's P rows per channel or one per head, then dA, d(dt_bias)). With
    decay_ij = [j <= i, doc_j == doc_i] exp(cs_i - cs_j), W_ij = (dy_i . x_j) decay_ij, T_ij = W_ij dt_j (C_i . B_j),
    out_j = [doc_j == doc_out] exp(cs_last - cs_j), in_i = [doc_i == doc_in] exp(cs_i), S = states[c], G = dstates[c],
    U_i = in_i dy_i . S C_i, V_j = out_j dt_j x_j . G B_j:
        dx_j  = sum_i (C_i . B_j) decay_ij dt_j dy_i + out_j dt_j G B_j + D dy_j
        ddt_j = sum_i W_ij (C_i . B_j) + out_j x_j . G B_j + A d(dA)_j,   d(dA)_j = sum_{k >= j} ds_k,
        ds_k  = sum_j T_kj - sum_i T_ik + U_k - V_k + [k == last] (sum_j V_j + [doc_out == doc_in] exp(cs_last) <G, S>),
    then ddt times the slope of dt's processing (the dt kernel's: clamp, softplus). Leaves W_ij dt_j in W_dt (row j,
    column i) for the group gradients."""
    b, c = (tl.program_id(0) // nchunks).to(tl.int64), tl.program_id(0) % nchunks
    h = tl.program_id(1)
    start, rows, valid, last, doc, doc_in, doc_out = _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ, Q, WHOLE)
    p = tl.arange(0, BLOCK_P)
    cs, cs_last, dt, x, dy = _head_chunk(b, h, start, rows, valid, last, p, H, L, x_ptr, dy_ptr, dt_ptr, cs_ptr, stride_x_b, stride_x_l,
                                         stride_x_h, stride_dy_b, stride_dy_l, stride_dy_h, P)
    # The products over d_state first, a block at a time (registers are this kernel's limit).
    C_chunk = C_ptr + b * stride_C_b + start * stride_C_l + (h // heads_per_group) * stride_C_g
    B_chunk = B_ptr + b * stride_B_b + start * stride_B_l + (h // heads_per_group) * stride_B_g
    state = ((b * nchunks + c) * H + h) * P * N
    BC = tl.zeros((Q, Q), dtype=tl.float32)  # B_j . C_i, row j
    SC = tl.zeros((Q, BLOCK_P), dtype=tl.float32)  # S C_i
    GB = tl.zeros((Q, BLOCK_P), dtype=tl.float32)  # G B_j
    G_dot_S = 0.0
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        Cc = _tile(C_chunk, rows, n, stride_C_l, valid, n < N)
        Bc = _tile(B_chunk, rows, n, stride_B_l, valid, n < N)
        S = _tile(states_ptr + state, p, n, N, p < P, n < N)
        G = _tile(dstates_ptr + state, p, n, N, p < P, n < N)
        BC = tl.dot(Bc, tl.trans(Cc), BC)
        SC = tl.dot(Cc, tl.trans(S), SC)
        GB = tl.dot(Bc, tl.trans(G), GB)
        G_dot_S += tl.sum(G.to(tl.float32) * S.to(tl.float32))
    in_w = tl.where(valid & (doc == doc_in), tl.exp(cs), 0.0)
    out_w = tl.where(valid & (doc == doc_out), tl.exp(cs_last - cs), 0.0)
    U = in_w * tl.sum(dy.to(tl.float32) * SC, axis=1)
    x_GB = tl.sum(x.to(tl.float32) * GB, axis=1)
    V = out_w * dt * x_GB
    # The (Q, Q) tiles indexed [j, i]: dx's operand needs no transpose, and ddt_j sums along rows (as a sum along
    # columns it cost 1.09x this kernel's time on an H200; T's sums, along columns here, cost less).
    decay = _decay_to_later(doc, cs, Q)
    dx = tl.dot((BC * decay * dt[:, None]).to(x.dtype), dy, (out_w * dt)[:, None] * GB)
    W = tl.dot(x, tl.trans(dy)) * decay  # [j, i]: W_ij
    tl.store(_W_dt_tile(W_dt_ptr, h, H, rows, Q), (W * dt[:, None]).to(W_dt_ptr.dtype.element_ty))
    W_CB = W * BC  # [j, i]: W_ij (C_i . B_j), and T_ij = W_CB[j, i] dt_j
    ddt = tl.sum(W_CB, axis=1)
    T_rows = tl.sum(W_CB * dt[:, None], axis=0)
    D_ROWS: tl.constexpr = P if D_PER_CHANNEL else 1
    part = part_ptr + tl.program_id(0) * (D_ROWS + 2) * H + h  # column h of this chunk's [dD | dA | d(dt_bias)] rows
    if HAS_D:
        dx += _skip_weight(D_ptr, h, p, P, D_PER_CHANNEL) * dy.to(tl.float32)
        dD = tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=0)
        if D_PER_CHANNEL:
            tl.store(part + p * H, dD, mask=p < P)
        else:
            tl.store(part, tl.sum(dD))
    _store_tile(dx_ptr + b * stride_dx_b + start * stride_dx_l + h * stride_dx_h, rows, p, stride_dx_l, valid, p < P, dx)

    carried = tl.where(doc_out == doc_in, tl.exp(cs_last), 0.0) * G_dot_S
    ds = T_rows - dt * ddt + U - V + tl.where(rows == last, tl.sum(V) + carried, 0.0)  # sum_i T_ij = dt_j ddt_j so far
    d_dA = tl.cumsum(ds, axis=0, reverse=True)
    tl.store(part + D_ROWS * H, tl.sum(dt * d_dA))
    ddt += out_w * x_GB + tl.load(A_ptr + h).to(tl.float32) * d_dA
    ddt *= tl.load(slope_ptr + (b * H + h) * L + start + rows, mask=valid, other=0.0)  # to the raw dt
    tl.store(ddt_ptr + b * stride_ddt_b + start * stride_ddt_l + h + rows * stride_ddt_l, ddt.to(ddt_ptr.dtype.element_ty), mask=valid)
    tl.store(part + (D_ROWS + 1) * H, tl.sum(ddt))


def _group_grad_configs() -> list[triton.Config]:
    """A program per block of BLOCK_N state columns, stages prefetching the next head's operands: one block of 128 at
    two stages was the fastest at 780m on an H200, one stage at 1.3b; three on an H100 at 780m and 32K, 1.08x one
    (bench/raw/h100_run38_call1_tune_ssd_kernels.txt). Not 32: Triton 3.6 miscompiled it for an H200 (wrong dB, dC;
    faults at 780m shapes)."""
    return [triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=s) for bn, s in ((128, 2), (128, 1), (128, 3), (64, 3))]


@triton.autotune(configs=_group_grad_configs(), key=["P", "N", "Q"])
@triton.jit
def _group_grads_kernel(x_ptr, B_ptr, C_ptr, dy_ptr, dt_ptr, cs_ptr, seq_ptr, states_ptr, dstates_ptr, W_dt_ptr, dB_ptr, dC_ptr, L,
                        nchunks, H, heads_per_group, heads_per_program, stride_x_b, stride_x_l, stride_x_h, stride_B_b, stride_B_l,
                        stride_B_g, stride_C_b, stride_C_l, stride_C_g, stride_dy_b, stride_dy_l, stride_dy_h, stride_seq_b,
                        stride_dB_s, stride_dB_b, stride_dB_l, stride_dB_g, stride_dC_s, stride_dC_b, stride_dC_l, stride_dC_g,
                        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_SEQ: tl.constexpr, WHOLE: tl.constexpr):
    """Chunk c's dB and dC, columns n of one block, summed over `heads_per_program` heads of one group (in, out, S, G
    as in _head_grads_kernel; W dt as it left them):
        dC_i = sum_h (sum_j W_ij dt_j B_j + in_i S^T dy_i),   dB_j = sum_h (sum_i W_ij dt_j C_i + out_j dt_j G^T x_j)."""
    b, c = (tl.program_id(0) // nchunks).to(tl.int64), tl.program_id(0) % nchunks
    first_head = tl.program_id(1) * heads_per_program
    g = first_head // heads_per_group
    head_slice = (first_head % heads_per_group) // heads_per_program
    start, rows, valid, last, doc, doc_in, doc_out = _chunk_tokens(b, c, L, seq_ptr, stride_seq_b, HAS_SEQ, Q, WHOLE)
    p, n = tl.arange(0, BLOCK_P), tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    Cc = _tile(C_ptr + b * stride_C_b + start * stride_C_l + g * stride_C_g, rows, n, stride_C_l, valid, n < N)
    Bc = _tile(B_ptr + b * stride_B_b + start * stride_B_l + g * stride_B_g, rows, n, stride_B_l, valid, n < N)
    from_state, to_end = valid & (doc == doc_in), valid & (doc == doc_out)
    dB = tl.zeros((Q, BLOCK_N), dtype=tl.float32)
    dC = tl.zeros((Q, BLOCK_N), dtype=tl.float32)
    for k in range(heads_per_program):
        h = first_head + k
        cs, cs_last, dt, x, dy = _head_chunk(b, h, start, rows, valid, last, p, H, L, x_ptr, dy_ptr, dt_ptr, cs_ptr, stride_x_b,
                                             stride_x_l, stride_x_h, stride_dy_b, stride_dy_l, stride_dy_h, P)
        state = ((b * nchunks + c) * H + h) * P * N
        W_dt = tl.load(_W_dt_tile(W_dt_ptr, h, H, rows, Q))  # [j, i]: W_ij dt_j
        dC = tl.dot(tl.trans(W_dt), Bc, dC)
        dB = tl.dot(W_dt, Cc, dB)
        dC = tl.dot((dy * tl.where(from_state, tl.exp(cs), 0.0)[:, None]).to(x.dtype), _tile(states_ptr + state, p, n, N, p < P, n < N), dC)
        dB = tl.dot((x * (tl.where(to_end, tl.exp(cs_last - cs), 0.0) * dt)[:, None]).to(x.dtype),
                    _tile(dstates_ptr + state, p, n, N, p < P, n < N), dB)
    _store_tile(dB_ptr + head_slice * stride_dB_s + b * stride_dB_b + start * stride_dB_l + g * stride_dB_g, rows, n, stride_dB_l, valid,
                n < N, dB)
    _store_tile(dC_ptr + head_slice * stride_dC_s + b * stride_dC_b + start * stride_dC_l + g * stride_dC_g, rows, n, stride_dC_l, valid,
                n < N, dC)


def state_grads(dy: Tensor, C: Tensor, cs: Tensor, seq_idx: Tensor | None, dfinal_states: Tensor | None, heads: int,
                chunk: int, handed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dstates (b, nchunks, h, p, n) in dy's dtype: the gradient of the state leaving each chunk;
    d(initial states) (b, h, p, n) fp32). In segments as chunk_states, walked from the last; `handed`: the state each
    segment is handed, where already known (walk_from)."""
    batch, length, _, headdim = dy.shape
    groups, dstate = C.shape[2:]
    nchunks = triton.cdiv(length, chunk)
    dstates = torch.empty(batch, nchunks, heads, headdim, dstate, dtype=dy.dtype, device=dy.device)
    dinit = torch.empty(batch, heads, headdim, dstate, dtype=torch.float32, device=dy.device)
    segments = hand_over(dy, C, cs, cs, seq_idx, dfinal_states, chunk, reverse=True, handed=handed)  # cs for the dt it does not read
    grid = walk_grid(segments, batch * heads, headdim, dstate)
    _state_grads_kernel[grid](dy, C, cs, dy if seq_idx is None else seq_idx, dy if dfinal_states is None else dfinal_states, dstates,
                              dinit, segments.ends, length, nchunks, heads, heads // groups, batch * heads, segments.count, segments.chunks,
                              dy.stride(0), dy.stride(1), dy.stride(2), C.stride(0), C.stride(1), C.stride(2),
                              0 if seq_idx is None else seq_idx.stride(0), P=headdim, N=dstate, Q=chunk,
                              HAS_DFINAL=dfinal_states is not None, HAS_SEQ=seq_idx is not None, SEGMENTED=segments.count > 1)
    return dstates, dinit


def _group_grad_target(buffer: Tensor | None, like: Tensor, slices: int) -> tuple[Tensor, int]:
    """Where the kernel writes dB (or dC) and its stride between head slices: the caller's buffer (or a
    new one) when one slice holds a group's heads, else fp32 partial sums (slices, b, l, g, n) to add."""
    if slices == 1:
        return (torch.empty(like.shape, dtype=like.dtype, device=like.device) if buffer is None else buffer), 0
    partial = torch.empty(slices, *like.shape, dtype=torch.float32, device=like.device)
    return partial, partial.stride(0)


def chunk_grads(dy: Tensor, x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor, dt: Tensor, cs: Tensor, dt_slope: Tensor,
                states: Tensor, dstates: Tensor, D: Tensor | None, dt_bias: Tensor | None, seq_idx: Tensor | None, chunk: int,
                dx: Tensor | None, ddt: Tensor | None, dB: Tensor | None,
                dC: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dx, ddt, dA, dB, dC, dD, d(dt_bias)), written into dx, ddt, dB, dC where given; ddt for the raw dt (dt_raw's
    shape and dtype) through dt_slope, discretize's."""
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2:]
    nchunks = triton.cdiv(length, chunk)
    heads_per_program = head_slice(heads // groups, batch * nchunks * groups)
    slices = heads // groups // heads_per_program
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
    ddt = torch.empty(dt_raw.shape, dtype=dt_raw.dtype, device=x.device) if ddt is None else ddt
    dB_target, dB_slice_stride = _group_grad_target(dB, B, slices)
    dC_target, dC_slice_stride = _group_grad_target(dC, C, slices)
    D_per_channel = D is not None and D.dim() == 2
    d_rows = headdim if D_per_channel else 1
    parts = torch.empty(batch * nchunks, d_rows + 2, heads, dtype=torch.float32, device=x.device)  # per chunk: [dD | dA | d(dt_bias)]
    W_dt = torch.empty(batch * nchunks, heads, chunk, chunk, dtype=x.dtype, device=x.device)
    seq, seq_stride = (x, 0) if seq_idx is None else (seq_idx, seq_idx.stride(0))
    shape = dict(P=headdim, N=dstate, Q=chunk, BLOCK_P=pow2(headdim), HAS_SEQ=seq_idx is not None, WHOLE=length % chunk == 0)
    _head_grads_kernel[(batch * nchunks, heads)](
        x, B, C, dy, dt, cs, dt_slope, A, x if D is None else D, seq, states, dstates, dx, ddt, W_dt, parts, length,
        nchunks, heads, heads // groups, *x.stride()[:3], *B.stride()[:3], *C.stride()[:3], *dy.stride()[:3], seq_stride,
        *dx.stride()[:3], ddt.stride(0), ddt.stride(1), HAS_D=D is not None, D_PER_CHANNEL=D_per_channel, **shape,
    )
    group_grid = lambda meta: (batch * nchunks, heads // heads_per_program, triton.cdiv(dstate, meta["BLOCK_N"]))  # noqa: E731
    _group_grads_kernel[group_grid](
        x, B, C, dy, dt, cs, seq, states, dstates, W_dt, dB_target, dC_target, length, nchunks, heads, heads // groups, heads_per_program,
        *x.stride()[:3], *B.stride()[:3], *C.stride()[:3], *dy.stride()[:3], seq_stride,
        dB_slice_stride, *dB_target.stride()[-4:-1], dC_slice_stride, *dC_target.stride()[-4:-1], **shape,
    )
    if slices > 1:
        dB = dB_target.sum(0).to(B.dtype) if dB is None else dB.copy_(dB_target.sum(0))
        dC = dC_target.sum(0).to(C.dtype) if dC is None else dC.copy_(dC_target.sum(0))
    else:
        dB, dC = dB_target, dC_target
    sums = column_sums(parts)  # one reduction for the three, each row a contiguous gradient (dD's row holds garbage without D: not read)
    dD = None if D is None else (sums[:d_rows].T if D_per_channel else sums[0]).to(D.dtype)
    ddt_bias = None if dt_bias is None else sums[d_rows + 1].to(dt_bias.dtype)
    return dx, ddt, sums[d_rows].to(A.dtype), dB, dC, dD, ddt_bias
