"""The mixer's causal depthwise conv1d + silu as Triton kernels, in the (batch, seqlen, channels) layout.

Why: the PyTorch version (megassm/ops/conv.py), even fused by torch.compile, took ~1.4 ms per
780m layer (forward + backward, 8 x 2048 tokens) where reading and writing its tensors takes ~0.3 ms;
mamba-ssm's peer pads, transposes and slices around cuDNN. Here a program owns BLOCK_D channels of a
span of consecutive rows and slides down it: each row is loaded once and kept in registers for the
width-1 rows after it, so every tap is a register. (Tiles of rows x channels loading each tap's shifted
rows again were issue-bound at 60% of the bandwidth on an H200: four loads and conversions per value.)
Rows are loaded ROWS at a time before any is used, so that their loads are in flight together (a store
between two loads would hold the second back), the next block while this one is computed. Document
boundaries (seq_idx) mask taps that reach into another document, as the reference does; a block whose
rows and window hold one document (nearly all of them) runs without the masks.
The backward is one pass: at row t it recomputes the pre-activation, forms d(pre-activation) and adds
it to the dx of the width rows whose taps read it, finishing row t-(width-1); a span reads width-1 rows
past its end to finish its last rows. The weight and bias gradients are summed in registers over the
span, then over spans. Sums are fp32; y and dx have x's dtype. A halo (context parallelism: the previous
rank's last width-1 rows; a decoding step's conv state) holds the rows before row 0, read from its own
tensor: putting it in front of x would copy x, and give back a gradient to slice, each time (three
copies of the layer's widest activation per CP layer and step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from megassm.ops.column_sums import column_sums


class Launch(NamedTuple):
    """A kernel's launch parameters: its program's channels (4 or 8 per thread: 8- or 16-byte loads of bf16), warps,
    and how many rows it loads at once."""

    block_d: int
    warps: int
    rows: int


# The fastest of a sweep on an H200 at 780m (bench/raw/h200_run16_call4_conv_sweep.txt): the forward at 8 values per
# thread, the backward (more registers per value) at 4. About how many programs a launch aims at (spans of rows x
# blocks of channels).
FORWARD, BACKWARD = Launch(block_d=256, warps=1, rows=8), Launch(block_d=128, warps=1, rows=8)
PROGRAMS = 2048


@triton.jit
def _span(spans, blocks, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch row, its span's first row (spans of `blocks` x ROWS rows, `spans` per batch row), its
    channels and which exist."""
    batch = tl.program_id(0) // spans
    first = (tl.program_id(0) % spans) * blocks * ROWS
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return batch, first, cols, cols < D


@triton.jit
def _x_row(x_ptr, seq_ptr, batch, row, cols, col_ok, L, stride_xb, stride_xl, stride_sb, HAS_SEQ: tl.constexpr):
    """Row `row` of x in x's dtype (zeros where it does not exist) and its document (int32)."""
    in_x = (row >= 0) & (row < L)
    x = tl.load(x_ptr + batch.to(tl.int64) * stride_xb + row.to(tl.int64) * stride_xl + cols, mask=in_x & col_ok, other=0.0)
    doc = tl.zeros((), tl.int32)
    if HAS_SEQ:
        doc = tl.load(seq_ptr + batch.to(tl.int64) * stride_sb + row, mask=in_x, other=-1)
    return x, doc


@triton.jit
def _row(x_ptr, h_ptr, seq_ptr, hseq_ptr, batch, row, cols, col_ok, L, stride_xb, stride_xl, stride_hb, stride_hl, stride_sb,
         stride_hsb, HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr, WIDTH: tl.constexpr):
    """Row `row` of x as _x_row, the halo's before row 0."""
    x, doc = _x_row(x_ptr, seq_ptr, batch, row, cols, col_ok, L, stride_xb, stride_xl, stride_sb, HAS_SEQ)
    if HAS_HALO:
        in_halo = (row < 0) & (row >= 1 - WIDTH)
        halo = tl.load(h_ptr + batch * stride_hb + (row + WIDTH - 1) * stride_hl + cols, mask=in_halo & col_ok, other=0.0)
        x = tl.where(in_halo, halo, x)
        if HAS_SEQ:
            doc = tl.where(in_halo, tl.load(hseq_ptr + batch * stride_hsb + row + WIDTH - 1, mask=in_halo, other=-1), doc)
    return x, doc


@triton.jit
def _shift(window, newest, WIDTH: tl.constexpr):
    """A window of the width-1 rows before t, oldest first, moved on by one row."""
    moved = ()
    for k in tl.static_range(1, WIDTH - 1):
        moved = moved + (window[k],)
    return moved + (newest,)


@triton.jit
def _window_before(x_ptr, h_ptr, seq_ptr, hseq_ptr, batch, first, cols, col_ok, L, stride_xb, stride_xl, stride_hb, stride_hl,
                   stride_sb, stride_hsb, HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr, WIDTH: tl.constexpr):
    """The width-1 rows before `first` (fp32) and their documents, oldest first."""
    xs = ()
    docs = ()
    for k in tl.static_range(WIDTH - 1):
        x, doc = _row(x_ptr, h_ptr, seq_ptr, hseq_ptr, batch, first - (WIDTH - 1) + k, cols, col_ok, L, stride_xb, stride_xl,
                      stride_hb, stride_hl, stride_sb, stride_hsb, HAS_SEQ, HAS_HALO, WIDTH)
        xs = xs + (x.to(tl.float32),)
        docs = docs + (doc,)
    return xs, docs


@triton.jit
def _load_block(x_ptr, seq_ptr, batch, base, cols, col_ok, L, stride_xb, stride_xl, stride_sb, HAS_SEQ: tl.constexpr, ROWS: tl.constexpr):
    """Rows base .. base+ROWS-1 of x (base >= 0: none in the halo) and their documents, every load issued before any
    value is used."""
    xs = ()
    docs = ()
    for i in tl.static_range(ROWS):
        x, doc = _x_row(x_ptr, seq_ptr, batch, base + i, cols, col_ok, L, stride_xb, stride_xl, stride_sb, HAS_SEQ)
        xs = xs + (x,)
        docs = docs + (doc,)
    return xs, docs


@triton.jit
def _load_dy(dy_rows, base, stride_dyl, col_ok, L, ROWS: tl.constexpr):
    """Rows base .. base+ROWS-1 of dy (zeros past the end), loads issued together."""
    dys = ()
    for i in tl.static_range(ROWS):
        dys = dys + (tl.load(dy_rows + (base + i).to(tl.int64) * stride_dyl, mask=col_ok & (base + i < L), other=0.0),)
    return dys


@triton.jit
def _weights(w_ptr, b_ptr, cols, col_ok, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr):
    """The taps' weights of these channels (tap k reads row t-(width-1)+k) and the bias, fp32."""
    w = ()
    for k in tl.static_range(WIDTH):
        w = w + (tl.load(w_ptr + cols * WIDTH + k, mask=col_ok, other=0.0).to(tl.float32),)
    bias = tl.zeros(cols.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return w, bias


@triton.jit
def _taps(window, docs, doc, HAS_SEQ: tl.constexpr, WIDTH: tl.constexpr):
    """The window's rows as row t's taps read them: zero where a row holds another document than t's."""
    taps = ()
    for k in tl.static_range(WIDTH - 1):
        tap = window[k]
        if HAS_SEQ:
            tap = tl.where(docs[k] == doc, tap, 0.0)
        taps = taps + (tap,)
    return taps


@triton.jit
def _pre_activation(taps, x, w, bias, WIDTH: tl.constexpr):
    """conv(x) + bias of row t, fp32, from its taps before it and its own row x."""
    pre = bias + w[WIDTH - 1] * x
    for k in tl.static_range(WIDTH - 1):
        pre += w[k] * taps[k]
    return pre


@triton.jit
def _one_document(docs, row_docs, WIDTH: tl.constexpr, ROWS: tl.constexpr):
    """Whether the window and a block of rows hold one document (no tap masked: the common case, taken without
    masks)."""
    doc = row_docs[0]
    same = docs[0] == doc
    for k in tl.static_range(1, WIDTH - 1):
        same = same & (docs[k] == doc)
    for i in tl.static_range(1, ROWS):
        same = same & (row_docs[i] == doc)
    return same


@triton.jit
def _forward_block(xs, row_docs, window, docs, w, bias, base, y_rows, stride_yl, col_ok, L, HAS_SEQ: tl.constexpr, WIDTH: tl.constexpr,
                   ROWS: tl.constexpr):
    """y of a block of loaded rows; the window moved on past them."""
    for i in tl.static_range(ROWS):
        x = xs[i].to(tl.float32)
        pre = _pre_activation(_taps(window, docs, row_docs[i], HAS_SEQ, WIDTH), x, w, bias, WIDTH)
        row = base + i
        tl.store(y_rows + row.to(tl.int64) * stride_yl, (pre * tl.sigmoid(pre)).to(y_rows.dtype.element_ty), mask=col_ok & (row < L))
        window, docs = _shift(window, x, WIDTH), _shift(docs, row_docs[i], WIDTH)
    return window, docs


@triton.jit
def _conv_forward_kernel(x_ptr, h_ptr, w_ptr, b_ptr, seq_ptr, hseq_ptr, y_ptr, L, D, spans, blocks, stride_xb, stride_xl, stride_hb,
                         stride_hl, stride_sb, stride_hsb, stride_yb, stride_yl, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
                         HAS_HALO: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = silu(conv(x)) of a span of rows and BLOCK_D channels; each block of rows loaded while the one before is
    computed."""
    batch, first, cols, col_ok = _span(spans, blocks, D, ROWS, BLOCK_D)
    end = tl.minimum(first + blocks * ROWS, L)
    w, bias = _weights(w_ptr, b_ptr, cols, col_ok, HAS_BIAS, WIDTH)
    window, docs = _window_before(x_ptr, h_ptr, seq_ptr, hseq_ptr, batch, first, cols, col_ok, L, stride_xb, stride_xl, stride_hb,
                                  stride_hl, stride_sb, stride_hsb, HAS_SEQ, HAS_HALO, WIDTH)
    y_rows = y_ptr + batch.to(tl.int64) * stride_yb + cols
    xs, row_docs = _load_block(x_ptr, seq_ptr, batch, first, cols, col_ok, end, stride_xb, stride_xl, stride_sb, HAS_SEQ, ROWS)
    for block in range(blocks):
        base = first + block * ROWS
        next_xs, next_docs = _load_block(x_ptr, seq_ptr, batch, base + ROWS, cols, col_ok, end, stride_xb, stride_xl, stride_sb, HAS_SEQ,
                                         ROWS)
        if HAS_SEQ and not _one_document(docs, row_docs, WIDTH, ROWS):
            window, docs = _forward_block(xs, row_docs, window, docs, w, bias, base, y_rows, stride_yl, col_ok, L, True, WIDTH, ROWS)
        else:
            window, docs = _forward_block(xs, row_docs, window, docs, w, bias, base, y_rows, stride_yl, col_ok, L, False, WIDTH, ROWS)
        xs, row_docs = next_xs, next_docs


@triton.jit
def _backward_row(row, x, doc, dy, window, docs, partials, dw, db, w, bias, first, dx_rows, stride_dxl, head_rows, D, col_ok, L,
                  HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr, WIDTH: tl.constexpr, SUMS: tl.constexpr):
    """One row t of the backward: d(pre-activation) of t; its share of dx of rows t-(width-1) .. t (partials: those
    rows but t, oldest first), the first of which is then complete and stored when it is the span's; dw, db when t is
    the span's (SUMS); d(pre-activation) of rows before width-1 into head_rows (the halo's gradient, HAS_HALO)."""
    x, dy = x.to(tl.float32), dy.to(tl.float32)
    taps = _taps(window, docs, doc, HAS_SEQ, WIDTH)
    pre = _pre_activation(taps, x, w, bias, WIDTH)
    sig = tl.sigmoid(pre)
    dpre = dy * sig * (1 + pre * (1 - sig))  # silu'
    if HAS_HALO:
        tl.store(head_rows + row * D, dpre, mask=col_ok & (row < WIDTH - 1))
    if SUMS:
        grown = ()
        for k in tl.static_range(WIDTH - 1):
            grown = grown + (dw[k] + dpre * taps[k],)
        dw = grown + (dw[WIDTH - 1] + dpre * x,)
        db += dpre
    added = ()
    for k in tl.static_range(WIDTH - 1):
        reach = dpre
        if HAS_SEQ:
            reach = tl.where(docs[k] == doc, dpre, 0.0)
        added = added + (partials[k] + w[k] * reach,)
    done = row - (WIDTH - 1)
    tl.store(dx_rows + done.to(tl.int64) * stride_dxl, added[0].to(dx_rows.dtype.element_ty), mask=col_ok & (done >= first) & (done < L))
    return _shift(window, x, WIDTH), _shift(docs, doc, WIDTH), _shift(added, w[WIDTH - 1] * dpre, WIDTH), dw, db


@triton.jit
def _backward_block(xs, row_docs, dys, window, docs, partials, dw, db, w, bias, base, first, dx_rows, stride_dxl, head_rows, D, col_ok, L,
                    HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr, SUMS: tl.constexpr):
    """_backward_row over a block of loaded rows."""
    for i in tl.static_range(ROWS):
        window, docs, partials, dw, db = _backward_row(base + i, xs[i], row_docs[i], dys[i], window, docs, partials, dw, db, w, bias, first,
                                                       dx_rows, stride_dxl, head_rows, D, col_ok, L, HAS_SEQ, HAS_HALO, WIDTH, SUMS)
    return window, docs, partials, dw, db


@triton.jit
def _conv_backward_kernel(x_ptr, h_ptr, w_ptr, b_ptr, seq_ptr, hseq_ptr, dy_ptr, dx_ptr, dwb_ptr, head_ptr, L, D, spans, blocks,
                          stride_xb, stride_xl, stride_hb, stride_hl, stride_sb, stride_hsb, stride_dyb, stride_dyl, stride_dxb,
                          stride_dxl, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr, WIDTH: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx of a span of rows and BLOCK_D channels, and the span's sums of dw and db into its row of dwb (programs along
    the rows, (WIDTH + 1) D): dw laid out as the (D, WIDTH) weight, then db, so that their sums over spans are
    gradients in the parameters' own layout (no copy into it). With d(pre-activation) p_t = dy_t silu'(pre_t):
        dx_u = sum_k w[k] p_{u+(width-1)-k},   dw[k] = sum_t p_t x_{t-(width-1)+k},   db = sum_t p_t,
    each term where both rows hold the same document; dw includes the halo's rows. Each block of rows is loaded
    while the one before is computed; the block after the span finishes its last rows' dx (ROWS >= width-1)."""
    batch, first, cols, col_ok = _span(spans, blocks, D, ROWS, BLOCK_D)
    w, bias = _weights(w_ptr, b_ptr, cols, col_ok, HAS_BIAS, WIDTH)
    window, docs = _window_before(x_ptr, h_ptr, seq_ptr, hseq_ptr, batch, first, cols, col_ok, L, stride_xb, stride_xl, stride_hb,
                                  stride_hl, stride_sb, stride_hsb, HAS_SEQ, HAS_HALO, WIDTH)
    partials = ()
    dw = ()
    for k in tl.static_range(WIDTH - 1):
        partials = partials + (tl.zeros((BLOCK_D,), tl.float32),)
    for k in tl.static_range(WIDTH):
        dw = dw + (tl.zeros((BLOCK_D,), tl.float32),)
    db = tl.zeros((BLOCK_D,), tl.float32)
    dx_rows = dx_ptr + batch.to(tl.int64) * stride_dxb + cols
    dy_rows = dy_ptr + batch.to(tl.int64) * stride_dyb + cols
    head_rows = head_ptr + batch * (WIDTH - 1) * D + cols
    xs, row_docs = _load_block(x_ptr, seq_ptr, batch, first, cols, col_ok, L, stride_xb, stride_xl, stride_sb, HAS_SEQ, ROWS)
    dys = _load_dy(dy_rows, first, stride_dyl, col_ok, L, ROWS)
    for block in range(blocks):
        base = first + block * ROWS
        next_xs, next_docs = _load_block(x_ptr, seq_ptr, batch, base + ROWS, cols, col_ok, L, stride_xb, stride_xl, stride_sb, HAS_SEQ,
                                         ROWS)
        next_dys = _load_dy(dy_rows, base + ROWS, stride_dyl, col_ok, L, ROWS)
        if HAS_SEQ and not _one_document(docs, row_docs, WIDTH, ROWS):
            window, docs, partials, dw, db = _backward_block(xs, row_docs, dys, window, docs, partials, dw, db, w, bias, base, first,
                                                             dx_rows, stride_dxl, head_rows, D, col_ok, L, True, HAS_HALO, WIDTH, ROWS,
                                                             True)
        else:
            window, docs, partials, dw, db = _backward_block(xs, row_docs, dys, window, docs, partials, dw, db, w, bias, base, first,
                                                             dx_rows, stride_dxl, head_rows, D, col_ok, L, False, HAS_HALO, WIDTH, ROWS,
                                                             True)
        xs, row_docs, dys = next_xs, next_docs, next_dys
    window, docs, partials, dw, db = _backward_block(xs, row_docs, dys, window, docs, partials, dw, db, w, bias, first + blocks * ROWS,
                                                     first, dx_rows, stride_dxl, head_rows, D, col_ok, L, HAS_SEQ, HAS_HALO, WIDTH,
                                                     WIDTH - 1, False)
    partial = dwb_ptr + tl.program_id(0).to(tl.int64) * (WIDTH + 1) * D
    for k in tl.static_range(WIDTH):
        tl.store(partial + cols * WIDTH + k, dw[k], mask=col_ok)
    tl.store(partial + WIDTH * D + cols, db, mask=col_ok)


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Halo:
    """The optional halo (b, width-1, d) and its document ids (b, width-1) as kernel arguments."""

    def __init__(self, x: Tensor, halo: Tensor | None, halo_seq_idx: Tensor | None):
        self.tensor = x if halo is None else halo
        self.strides = (0, 0) if halo is None else (halo.stride(0), halo.stride(1))
        self.ids, self.ids_stride = (x, 0) if halo_seq_idx is None else (halo_seq_idx, halo_seq_idx.stride(0))


def spans(batch: int, length: int, channels: int, rows: int, block_d: int) -> tuple[int, int]:
    """How a launch splits each batch row: (spans per batch row, blocks of `rows` rows per span), about PROGRAMS
    programs in all and no span empty."""
    blocks = triton.cdiv(length, rows)
    per_row = max(1, min(blocks, PROGRAMS // (batch * triton.cdiv(channels, block_d))))
    per_span = triton.cdiv(blocks, per_row)
    return triton.cdiv(blocks, per_span), per_span


def conv1d_silu_forward(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, halo: Tensor | None = None,
                        halo_seq_idx: Tensor | None = None) -> Tensor:
    """y = silu(conv(x)), contiguous, in x's dtype. x: (b, l, d) with channels contiguous (any row stride);
    halo: the width-1 rows before x (channels contiguous) and halo_seq_idx their documents, when seq_idx is given."""
    batch, length, channels = x.shape
    h = _Halo(x, halo, halo_seq_idx)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    per_row, blocks = spans(batch, length, channels, FORWARD.rows, FORWARD.block_d)
    grid = (batch * per_row, triton.cdiv(channels, FORWARD.block_d))
    _conv_forward_kernel[grid](x, h.tensor, weight, x if bias is None else bias, x if seq_idx is None else seq_idx, h.ids, y, length,
                               channels, per_row, blocks, x.stride(0), x.stride(1), *h.strides, 0 if seq_idx is None else seq_idx.stride(0),
                               h.ids_stride, y.stride(0), y.stride(1), HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
                               HAS_HALO=halo is not None, WIDTH=weight.shape[1], ROWS=FORWARD.rows, BLOCK_D=FORWARD.block_d,
                               num_warps=FORWARD.warps)
    return y


def halo_gradient(dpre_head: Tensor, weight: Tensor, seq_idx: Tensor | None, halo_seq_idx: Tensor | None, length: int) -> Tensor:
    """d(halo) (b, width-1, d), fp32, from d(pre-activation) of x's first width-1 rows: halo row j reaches output
    t <= j through tap j - t (a few rows: PyTorch)."""
    dhalo = torch.zeros_like(dpre_head)
    for j in range(weight.shape[1] - 1):
        for t in range(min(j + 1, length)):
            term = dpre_head[:, t]
            if seq_idx is not None:
                term = term * (seq_idx[:, t] == halo_seq_idx[:, j])[:, None]
            dhalo[:, j] += term * weight[:, j - t].float()
    return dhalo


def conv1d_silu_backward(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, dy: Tensor,
                         dx: Tensor | None = None, halo: Tensor | None = None,
                         halo_seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias, dhalo) from dy = d(output). dx, if given, is written in place (any row stride,
    channels contiguous): a fused caller's slice of one larger gradient buffer."""
    batch, length, channels = x.shape
    width = weight.shape[1]
    h = _Halo(x, halo, halo_seq_idx)
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = max(BACKWARD.rows, width - 1)
    per_row, blocks = spans(batch, length, channels, rows, BACKWARD.block_d)
    grid = (batch * per_row, triton.cdiv(channels, BACKWARD.block_d))
    dwb = torch.empty(grid[0], (width + 1) * channels, dtype=torch.float32, device=x.device)  # per span: dw (d, width), then db
    dpre_head = torch.zeros(batch, width - 1, channels, dtype=torch.float32, device=x.device) if halo is not None else dwb
    _conv_backward_kernel[grid](x, h.tensor, weight, x if bias is None else bias, x if seq_idx is None else seq_idx, h.ids, dy, dx, dwb,
                                dpre_head, length, channels, per_row, blocks, x.stride(0), x.stride(1), *h.strides,
                                0 if seq_idx is None else seq_idx.stride(0), h.ids_stride, dy.stride(0), dy.stride(1), dx.stride(0),
                                dx.stride(1), HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, HAS_HALO=halo is not None,
                                WIDTH=width, ROWS=rows, BLOCK_D=BACKWARD.block_d, num_warps=BACKWARD.warps)
    sums = column_sums(dwb)  # one reduction for both
    dhalo = None if halo is None else halo_gradient(dpre_head, weight, seq_idx, halo_seq_idx, length).to(halo.dtype)
    grad_bias = None if bias is None else sums[width * channels:].to(bias.dtype)
    return dx, sums[:width * channels].view(channels, width).to(weight.dtype), grad_bias, dhalo


class _CausalConv1dSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, halo: Tensor | None,
                halo_seq_idx: Tensor | None) -> Tensor:
        x, weight = last_dim_contiguous(x), weight.contiguous()
        seq_idx = None if seq_idx is None else seq_idx.contiguous()
        halo = None if halo is None else last_dim_contiguous(halo)
        ctx.save_for_backward(x, weight, bias, seq_idx, halo, halo_seq_idx)
        return conv1d_silu_forward(x, weight, bias, seq_idx, halo, halo_seq_idx)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, seq_idx, halo, halo_seq_idx = ctx.saved_tensors
        dx, dweight, dbias, dhalo = conv1d_silu_backward(x, weight, bias, seq_idx, last_dim_contiguous(dy), halo=halo,
                                                         halo_seq_idx=halo_seq_idx)
        return dx, dweight, dbias, None, dhalo, None


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None, seq_idx: Tensor | None = None,
                       halo: Tensor | None = None, halo_seq_idx: Tensor | None = None) -> Tensor:
    """silu(causal_conv1d(x, weight, bias, halo, seq_idx, halo_seq_idx)) of megassm/ops/conv.py.
    x: (b, l, d) with channels contiguous; weight: (d, width); bias: (d,); seq_idx: (b, l);
    halo: (b, width-1, d); halo_seq_idx: (b, width-1), by default the first token's document."""
    if halo is None or seq_idx is None:
        halo_seq_idx = None
    elif halo_seq_idx is None:
        halo_seq_idx = seq_idx[:, :1].expand(-1, weight.shape[1] - 1).contiguous()
    else:
        halo_seq_idx = halo_seq_idx.to(seq_idx.dtype).contiguous()
    halo = None if halo is None else halo.to(x.dtype)
    return _CausalConv1dSilu.apply(x, weight, bias, seq_idx, halo, halo_seq_idx)
