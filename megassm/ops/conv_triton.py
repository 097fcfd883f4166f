"""The mixer's causal depthwise conv1d + silu as Triton kernels, in the (batch, seqlen, channels) layout.

Why: the PyTorch version (megassm/ops/conv.py), even fused by torch.compile, took ~1.4 ms per
780m layer (forward + backward, 8 x 2048 tokens) where reading and writing its tensors takes ~0.3 ms;
mamba-ssm's peer pads, transposes and slices around cuDNN. Here a program owns a tile of tokens x
channels and reads the `width` shifted rows it needs straight from the input (neighbouring tiles'
rows come from cache), so the forward reads x once and writes y once. Document boundaries (seq_idx)
mask taps that reach into another document, as the reference does. The backward recomputes the
pre-activation (cheaper than storing it), writes d(pre-activation) in x's dtype (bf16 in training, as
PyTorch's autograd of a bf16 silu keeps it; fp32 would move 1.5x the backward's bytes), and takes dx from that;
the weight and bias gradients are summed per tile, then over tiles.
Sums are fp32; y and dx have x's dtype. A halo (context parallelism: the previous rank's last
width-1 rows; a decoding step's conv state) is read by the taps that reach before row 0, from its own
tensor: putting it in front of x would copy x, and give back a gradient to slice, each time (three
copies of the layer's widest activation per CP layer and step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L, BLOCK_D = 32, 128  # a program's tile of tokens x channels
# dx and dw's kernel: its tiles, about how many programs share them, and its warps (on an H200 at 780m, 8 x 64 tiles at
# 2 warps took 0.87x the time of 16 x 64 at 4: bench/raw/h200_run14_call1_sweep_mem.txt)
GRAD_BLOCK_L, GRAD_BLOCK_D, GRAD_PROGRAMS, GRAD_WARPS = 8, 64, 2048, 2


@triton.jit
def _tile(L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch row, token rows and channels."""
    n_blocks = tl.cdiv(L, BLOCK_L)
    batch = tl.program_id(0) // n_blocks
    rows = (tl.program_id(0) % n_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return batch, rows, cols


@triton.jit
def _tap_mask(seq_ptr, hseq_ptr, batch, stride_sb, stride_hsb, rows, other, row_ok, L,
              HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr, WIDTH: tl.constexpr):
    """Rows `other` (any shape broadcasting with `rows`) that exist, in x or, before row 0, in the halo,
    and hold the same document as `rows` when seq_idx is given."""
    in_x = row_ok & (other >= 0) & (other < L)
    in_halo = row_ok & (other < 0) & (other >= 1 - WIDTH)
    ok = in_x
    if HAS_HALO:
        ok = ok | in_halo
    if HAS_SEQ:
        mine = tl.load(seq_ptr + batch * stride_sb + rows, mask=row_ok, other=-1)
        theirs = tl.load(seq_ptr + batch * stride_sb + other, mask=in_x, other=-2)
        if HAS_HALO:
            theirs = tl.where(in_halo, tl.load(hseq_ptr + batch * stride_hsb + other + WIDTH - 1, mask=in_halo, other=-2), theirs)
        ok = ok & (mine == theirs)
    return ok


@triton.jit
def _load_rows(x_ptr, h_ptr, batch, source, offsets, ok, stride_xb, stride_xl, stride_hb, stride_hl,
               HAS_HALO: tl.constexpr, WIDTH: tl.constexpr):
    """x's rows `source` (zeros where not ok) at column `offsets`, the halo's before row 0; fp32."""
    x_rows = x_ptr + batch * stride_xb + source * stride_xl + offsets
    if not HAS_HALO:  # ok already excludes rows before 0
        return tl.load(x_rows, mask=ok, other=0.0).to(tl.float32)
    halo_rows = h_ptr + batch * stride_hb + (source + WIDTH - 1) * stride_hl + offsets
    return (tl.load(x_rows, mask=ok & (source >= 0), other=0.0).to(tl.float32)
            + tl.load(halo_rows, mask=ok & (source < 0), other=0.0).to(tl.float32))


@triton.jit
def _pre_activation(x_ptr, h_ptr, w_ptr, b_ptr, seq_ptr, hseq_ptr, batch, rows, cols, L, D, stride_xb, stride_xl, stride_hb, stride_hl,
                    stride_sb, stride_hsb, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr, WIDTH: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    row_ok, col_ok = rows < L, cols < D
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        source = rows - (WIDTH - 1) + k
        ok = _tap_mask(seq_ptr, hseq_ptr, batch, stride_sb, stride_hsb, rows, source, row_ok, L, HAS_SEQ, HAS_HALO, WIDTH)
        x = _load_rows(x_ptr, h_ptr, batch, source[:, None], cols[None, :], ok[:, None] & col_ok[None, :], stride_xb, stride_xl,
                       stride_hb, stride_hl, HAS_HALO, WIDTH)
        w = tl.load(w_ptr + cols * WIDTH + k, mask=col_ok, other=0.0)
        acc += x * w.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _forward_kernel(x_ptr, h_ptr, w_ptr, b_ptr, seq_ptr, hseq_ptr, y_ptr, L, D, stride_xb, stride_xl, stride_hb, stride_hl,
                    stride_sb, stride_hsb, stride_yb, stride_yl, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr,
                    WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    batch, rows, cols = _tile(L, D, BLOCK_L, BLOCK_D)
    pre = _pre_activation(x_ptr, h_ptr, w_ptr, b_ptr, seq_ptr, hseq_ptr, batch, rows, cols, L, D, stride_xb, stride_xl, stride_hb,
                          stride_hl, stride_sb, stride_hsb, HAS_BIAS, HAS_SEQ, HAS_HALO, WIDTH, BLOCK_L, BLOCK_D)
    y = pre * tl.sigmoid(pre)
    mask = (rows < L)[:, None] & (cols < D)[None, :]
    tl.store(y_ptr + batch * stride_yb + rows[:, None] * stride_yl + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre_kernel(x_ptr, h_ptr, w_ptr, b_ptr, seq_ptr, hseq_ptr, dy_ptr, dpre_ptr, L, D, stride_xb, stride_xl, stride_hb, stride_hl,
                     stride_sb, stride_hsb, stride_dyb, stride_dyl, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_HALO: tl.constexpr,
                     WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """d(pre-activation) of the tile, in dpre's dtype, contiguous (b, l, d)."""
    batch, rows, cols = _tile(L, D, BLOCK_L, BLOCK_D)
    mask = (rows < L)[:, None] & (cols < D)[None, :]
    pre = _pre_activation(x_ptr, h_ptr, w_ptr, b_ptr, seq_ptr, hseq_ptr, batch, rows, cols, L, D, stride_xb, stride_xl, stride_hb,
                          stride_hl, stride_sb, stride_hsb, HAS_BIAS, HAS_SEQ, HAS_HALO, WIDTH, BLOCK_L, BLOCK_D)
    dy = tl.load(dy_ptr + batch * stride_dyb + rows[:, None] * stride_dyl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    dpre = dy * sig * (1 + pre * (1 - sig))  # silu'
    tl.store(dpre_ptr + (batch * L + rows[:, None]) * D + cols[None, :], dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_kernel(dpre_ptr, x_ptr, w_ptr, seq_ptr, dx_ptr, dwb_ptr, L, D, stride_xb, stride_xl, stride_sb, stride_dxb,
                       stride_dxl, tiles, tiles_per_program, HAS_SEQ: tl.constexpr, WIDTH: tl.constexpr, TAPS: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """For a run of `tiles_per_program` token tiles (all batch rows in order): dx[u] = sum over taps k of
    w[:, k] * dpre[u + WIDTH-1 - k], where that output row is in u's document; and this program's share of
    dw and db from the same terms (tap k of output u + WIDTH-1 - k reads input row u: dw[k] = sum_u
    dpre[u + WIDTH-1 - k] x[u], db = sum_u dpre[u]), summed in registers and over tokens once at the end, into
    its row of dwb (programs, (WIDTH + 1) D): dw laid out as the (D, WIDTH) weight, then db, so that their sums
    over programs are gradients in the parameters' own layout (no copy into it). Inputs in the halo (before
    row 0) are not x's rows: their dw terms are added by the caller.
    TAPS: WIDTH rounded up to a power of two (the taps are one axis of a 3-d tile)."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    taps = tl.arange(0, TAPS)
    tap_ok = (taps < WIDTH)[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + cols[None, :] * WIDTH + taps[:, None], mask=tap_ok, other=0.0).to(tl.float32)  # (TAPS, BLOCK_D)
    n_blocks = tl.cdiv(L, BLOCK_L)
    acc_w = tl.zeros((BLOCK_L, TAPS, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for i in range(0, tiles_per_program):
        tile = tl.program_id(0) * tiles_per_program + i
        batch = tile // n_blocks
        rows = (tile % n_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        row_ok = (rows < L) & (tile < tiles)
        target = rows[:, None] + (WIDTH - 1) - taps[None, :]  # never before row 0: no halo
        ok = _tap_mask(seq_ptr, seq_ptr, batch, stride_sb, 0, rows[:, None], target, row_ok[:, None], L, HAS_SEQ, False,
                       WIDTH) & (taps < WIDTH)[None, :]
        g = tl.load(dpre_ptr + (batch * L + target[:, :, None]) * D + cols[None, None, :], mask=ok[:, :, None] & col_ok[None, None, :],
                    other=0.0).to(tl.float32)  # (BLOCK_L, TAPS, BLOCK_D)
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + batch * stride_xb + rows[:, None] * stride_xl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + batch * stride_dxb + rows[:, None] * stride_dxl + cols[None, :],
                 tl.sum(g * w[None, :, :], axis=1).to(dx_ptr.dtype.element_ty), mask=mask)
        acc_w += g * x[:, None, :]
        acc_b += tl.sum(tl.where((taps == WIDTH - 1)[None, :, None], g, 0.0), axis=1)  # tap WIDTH-1: dpre[u] itself
    partial = dwb_ptr + tl.program_id(0) * (WIDTH + 1) * D
    tl.store(partial + cols[None, :] * WIDTH + taps[:, None], tl.sum(acc_w, axis=0), mask=tap_ok)
    tl.store(partial + WIDTH * D + cols, tl.sum(acc_b, axis=0), mask=col_ok)


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Halo:
    """The optional halo (b, width-1, d) and its document ids (b, width-1) as kernel arguments."""

    def __init__(self, x: Tensor, halo: Tensor | None, halo_seq_idx: Tensor | None):
        self.tensor = x if halo is None else halo
        self.strides = (0, 0) if halo is None else (halo.stride(0), halo.stride(1))
        self.ids, self.ids_stride = (x, 0) if halo_seq_idx is None else (halo_seq_idx, halo_seq_idx.stride(0))


def conv1d_silu_forward(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, halo: Tensor | None = None,
                        halo_seq_idx: Tensor | None = None) -> Tensor:
    """y = silu(conv(x)), contiguous, in x's dtype. x: (b, l, d) with channels contiguous (any row stride);
    halo: the width-1 rows before x (channels contiguous) and halo_seq_idx their documents, when seq_idx is given."""
    batch, length, channels = x.shape
    h = _Halo(x, halo, halo_seq_idx)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    grid = (batch * triton.cdiv(length, BLOCK_L), triton.cdiv(channels, BLOCK_D))
    _forward_kernel[grid](x, h.tensor, weight, x if bias is None else bias, x if seq_idx is None else seq_idx, h.ids, y, length, channels,
                          x.stride(0), x.stride(1), *h.strides, 0 if seq_idx is None else seq_idx.stride(0), h.ids_stride,
                          y.stride(0), y.stride(1), HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, HAS_HALO=halo is not None,
                          WIDTH=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    return y


def halo_gradients(dpre: Tensor, halo: Tensor, weight: Tensor, seq_idx: Tensor | None,
                   halo_seq_idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """(d(halo) (b, width-1, d), the halo's terms of dweight (d, width)), fp32: halo row j reaches output t <= j
    through tap j - t (a few rows: PyTorch)."""
    batch, length, channels = dpre.shape
    width = weight.shape[1]
    dhalo = dpre.new_zeros(batch, width - 1, channels, dtype=torch.float32)
    dweight = dpre.new_zeros(channels, width, dtype=torch.float32)
    for j in range(width - 1):
        for t in range(min(j + 1, length)):
            term = dpre[:, t].float()
            if seq_idx is not None:
                term = term * (seq_idx[:, t] == halo_seq_idx[:, j])[:, None]
            dhalo[:, j] += term * weight[:, j - t].float()
            dweight[:, j - t] += (term * halo[:, j].float()).sum(0)
    return dhalo, dweight


def conv1d_silu_backward(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, dy: Tensor,
                         dx: Tensor | None = None, halo: Tensor | None = None,
                         halo_seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias, dhalo) from dy = d(output). dx, if given, is written in place (any row stride,
    channels contiguous): a fused caller's slice of one larger gradient buffer."""
    batch, length, channels = x.shape
    width = weight.shape[1]
    h = _Halo(x, halo, halo_seq_idx)
    grid = (batch * triton.cdiv(length, BLOCK_L), triton.cdiv(channels, BLOCK_D))
    seq, seq_stride = (x, 0) if seq_idx is None else (seq_idx, seq_idx.stride(0))
    dpre = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _grad_pre_kernel[grid](x, h.tensor, weight, x if bias is None else bias, seq, h.ids, dy, dpre, length, channels, x.stride(0),
                           x.stride(1), *h.strides, seq_stride, h.ids_stride, dy.stride(0), dy.stride(1), HAS_BIAS=bias is not None,
                           HAS_SEQ=seq_idx is not None, HAS_HALO=halo is not None, WIDTH=width, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    if dx is None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    column_blocks = triton.cdiv(channels, GRAD_BLOCK_D)
    tiles = batch * triton.cdiv(length, GRAD_BLOCK_L)
    tiles_per_program = triton.cdiv(tiles, max(1, GRAD_PROGRAMS // column_blocks))
    programs = triton.cdiv(tiles, tiles_per_program)
    dwb = torch.empty(programs, (width + 1) * channels, dtype=torch.float32, device=x.device)  # per program: dw (d, width), then db
    _grad_input_kernel[(programs, column_blocks)](dpre, x, weight, seq, dx, dwb, length, channels, x.stride(0), x.stride(1), seq_stride,
                                                  dx.stride(0), dx.stride(1), tiles, tiles_per_program, HAS_SEQ=seq_idx is not None,
                                                  WIDTH=width, TAPS=triton.next_power_of_2(width), BLOCK_L=GRAD_BLOCK_L,
                                                  BLOCK_D=GRAD_BLOCK_D, num_warps=GRAD_WARPS)
    sums = dwb.sum(0)  # one reduction for both
    dweight, dhalo = sums[:width * channels].view(channels, width), None
    if halo is not None:
        dhalo, halo_dweight = halo_gradients(dpre, halo, weight, seq_idx, halo_seq_idx)
        dweight, dhalo = dweight + halo_dweight, dhalo.to(halo.dtype)
    grad_bias = None if bias is None else sums[width * channels:].to(bias.dtype)
    return dx, dweight.to(weight.dtype), grad_bias, dhalo


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
