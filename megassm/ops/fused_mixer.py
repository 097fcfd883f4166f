"""The middle of the Mamba-2 mixer as one autograd step on CUDA: in_proj's output [z | xBC | dt] ->
conv + silu -> SSD (+ D x) -> norm(y * silu(z)), with the kernels of the composed path
(megassm/model/mixer.py): megassm's Triton conv, the SSD's kernels (megassm's or mamba-ssm's), mamba-ssm's
gated RMSNorm forward and megassm's backward of it (megassm/ops/gated_norm_triton.py).

Why: composed, autograd splits in_proj's output into z, xBC and dt (and the conv's output into x, B
and C) and in backward concatenates their separate gradients again: two copies of the layer's widest
activations per layer (~10 ms of a 340 ms 780m step on the H100). Here each kernel's backward writes
straight into its slice of one gradient buffer, as mamba-ssm's mem-eff path does.

Under context parallelism (megassm's SSD kernels) the step also does the rank's communication: the conv's halo
from the previous rank, and the state entering the slice, with which the SSD then walks its chunks
(ssd_forward_continued); in backward the state's gradient goes back to the earlier ranks and the halo's to the
previous one. The composed path instead adds the incoming state's contribution to y afterwards.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megassm.ops.conv_triton import conv1d_silu_backward, conv1d_silu_forward, last_dim_contiguous
from megassm.ops.gated_norm_triton import gated_norm_backward
from megassm.ops.layout import Mamba2Layout
from megassm.ops.mamba_triton import load_triton_kernels
from megassm.ops.ssd import slice_documents
from megassm.ops.ssd_triton import SSDSaved, ssd_backward, ssd_forward, ssd_forward_continued
from parallel.collectives import shift
from parallel.context_parallel import StateExchange, exchange_states, exchanged_state_grads


def _rows(t: Tensor, layout: Mamba2Layout) -> Tensor:
    """(b, l, ...) -> (b * l, d_inner): the norm kernels' layout (a view: rows keep their stride)."""
    return t.reshape(-1, layout.d_inner)


class RankSlice(NamedTuple):
    """Context parallelism: this rank holds one slice of every sequence, the ranks of `group` hold them in order."""

    group: ProcessGroup
    halo_seq_idx: Tensor | None  # the document ids of the previous rank's last d_conv - 1 tokens (where there are documents)


class _EnteringState:
    """The state entering a rank's slice, as ssd_forward_continued asks for it (exchanged with the other ranks: zero
    where a slice starts a new document), and the way back of its gradient (ssd_backward's dfinal_from)."""

    def __init__(self, A: Tensor, seq_idx: Tensor | None, rank_slice: RankSlice):
        self.A, self.group = A, rank_slice.group
        self.continues, self.passes = (None, None) if seq_idx is None else slice_documents(seq_idx, rank_slice.halo_seq_idx)
        self.exchange: StateExchange | None = None

    def _masked(self, state: Tensor) -> Tensor:
        return state if self.continues is None else state * self.continues[:, None, None, None]

    def __call__(self, final_states: Tensor, dt: Tensor) -> Tensor:
        log_decay = dt.sum(-1) * self.A  # the slice's: dt processed (b, h, l)
        if self.passes is not None:
            log_decay = log_decay.masked_fill(~self.passes[:, None], -math.inf)
        entering, self.exchange = exchange_states(final_states, log_decay, self.group)
        return self._masked(entering)

    def final_grad(self, dentering: Tensor) -> Tensor:
        return exchanged_state_grads(self._masked(dentering), self.exchange)[0].reshape(dentering.shape)


def _scan_forward(kernels: str, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor, dt_bias: Tensor,
                  seq_idx: Tensor | None, dt_limit: tuple[float, float],
                  entering: _EnteringState | None) -> tuple[Tensor, SSDSaved | None, Tensor | None]:
    """y of the SSD (dt through bias and softplus) by `kernels`, "megassm" or "mamba-ssm", what megassm's
    backward could reuse (None for mamba-ssm's, whose backward recomputes it), and the states `entering` gave."""
    options = dict(D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit)
    if entering is not None:
        y, initial_states, saved = ssd_forward_continued(x, dt, A, B, C, entering, **options)
        return y, saved, initial_states
    if kernels == "megassm":
        y, _, saved = ssd_forward(x, dt, A, B, C, chunk_size, **options)
        return y, saved, None
    return load_triton_kernels().scan_forward(x, dt, A, B, C, chunk_size, **options)[0], None, None


def _scan_backward(kernels: str, dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, y: Tensor, chunk_size: int,
                   D: Tensor, dt_bias: Tensor, seq_idx: Tensor | None, dt_limit: tuple[float, float], saved: SSDSaved | None,
                   handed: Tensor | None, initial_states: Tensor | None, dfinal_from: Callable[[Tensor], Tensor] | None,
                   dx: Tensor, ddt: Tensor, dB: Tensor, dC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dA, dD, d(dt_bias)); dx, ddt, dB, dC written into the given buffers. The forward's states are recomputed
    (from the states `handed` to their walk's segments, where given) unless `saved` holds them."""
    options = dict(D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit, dx=dx, ddt=ddt, dB=dB, dC=dC)
    if kernels == "megassm":
        _, _, dA, _, _, dD, ddt_bias, _ = ssd_backward(dy, x, dt, A, B, C, chunk_size, saved=saved, handed=handed,
                                                       initial_states=initial_states, dfinal_from=dfinal_from, **options)
    else:
        _, _, dA, _, _, dD, _, ddt_bias, _ = load_triton_kernels().scan_backward(dy, x, dt, A, B, C, y, chunk_size, **options)
    return dA, dD, ddt_bias


def _halo_rows(xBC: Tensor, width: int) -> Tensor:
    """The last width - 1 rows of xBC (b, l, channels): the next rank's halo."""
    return xBC[:, xBC.shape[1] - (width - 1):]


class _ConvScanNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
                norm_weight: Tensor, seq_idx: Tensor | None, layout: Mamba2Layout, chunk_size: int, dt_limit: tuple[float, float],
                eps: float, ssd_kernels: str, keep_ssd_states: bool, rank_slice: RankSlice | None) -> Tensor:
        kernels = load_triton_kernels()
        zxbcdt, conv_weight = last_dim_contiguous(zxbcdt), conv_weight.contiguous()
        z, xBC, dt = layout.split_in_proj(zxbcdt)
        halo = None if rank_slice is None else shift(_halo_rows(xBC, conv_weight.shape[1]), rank_slice.group, +1)
        halo_seq_idx = None if rank_slice is None else rank_slice.halo_seq_idx
        xBC_conv = conv1d_silu_forward(xBC, conv_weight, conv_bias, seq_idx, halo, halo_seq_idx)
        x, B, C = layout.split_conv(xBC_conv)
        entering = None if rank_slice is None else _EnteringState(A, seq_idx, rank_slice)
        y, saved, initial_states = _scan_forward(ssd_kernels, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit, entering)
        out, _, rstd = kernels.norm_forward(_rows(y, layout), norm_weight, None, eps, _rows(z, layout), group_size=layout.group_size,
                                            norm_before_gate=False, is_rms_norm=True)
        # The states, or where they are not kept the state handed to each segment of their walk: to recompute them from.
        kept = saved._replace(handed=None) if keep_ssd_states and saved is not None else None
        handed = saved.handed if saved is not None and kept is None else None
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, xBC_conv, y, rstd, dt_bias, A, D, norm_weight, seq_idx, handed,
                              halo, halo_seq_idx, initial_states, *(kept[:-1] if kept else ()))  # SSDSaved's fields but the last
        ctx.layout, ctx.chunk_size, ctx.dt_limit, ctx.ssd_kernels = layout, chunk_size, dt_limit, ssd_kernels
        ctx.kernel_chunk = kept.kernel_chunk if kept else None
        ctx.entering, ctx.rank_slice = entering, rank_slice
        return out.view(*zxbcdt.shape[:2], layout.d_inner)

    @staticmethod
    def backward(ctx, dout: Tensor):
        layout = ctx.layout
        (zxbcdt, conv_weight, conv_bias, xBC_conv, y, rstd, dt_bias, A, D, norm_weight, seq_idx, handed, halo, halo_seq_idx,
         initial_states, *kept) = ctx.saved_tensors
        saved = SSDSaved(*kept, ctx.kernel_chunk) if kept else None
        z, xBC, dt = layout.split_in_proj(zxbcdt)
        grad = torch.empty_like(zxbcdt)  # d(in_proj output): the kernels below each write their slice
        dz, dxBC, ddt = layout.split_in_proj(grad)
        dxBC_conv = torch.empty_like(xBC_conv)
        dx, dB, dC = layout.split_conv(dxBC_conv)
        dy, dnorm_weight = gated_norm_backward(_rows(last_dim_contiguous(dout), layout), _rows(y, layout), _rows(z, layout), norm_weight,
                                               rstd, layout.group_size, dz=_rows(dz, layout))
        x, B, C = layout.split_conv(xBC_conv)
        dfinal_from = None if ctx.entering is None else ctx.entering.final_grad
        dA, dD, ddt_bias = _scan_backward(ctx.ssd_kernels, dy.view_as(y), x, dt, A, B, C, y, ctx.chunk_size, D, dt_bias, seq_idx,
                                          ctx.dt_limit, saved, handed, initial_states, dfinal_from, dx, ddt, dB, dC)
        _, dconv_weight, dconv_bias, dhalo = conv1d_silu_backward(xBC, conv_weight, conv_bias, seq_idx, dxBC_conv, dx=dxBC, halo=halo,
                                                                  halo_seq_idx=halo_seq_idx)
        if ctx.rank_slice is not None:  # the next rank's gradient of this rank's last rows
            _halo_rows(dxBC, conv_weight.shape[1]).add_(shift(dhalo, ctx.rank_slice.group, -1))
        return grad, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight, None, None, None, None, None, None, None, None


def conv_ssd_gated_norm(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
                        norm_weight: Tensor, layout: Mamba2Layout, chunk_size: int, dt_limit: tuple[float, float], eps: float,
                        seq_idx: Tensor | None = None, ssd_kernels: str = "megassm", keep_ssd_states: bool = False,
                        rank_slice: RankSlice | None = None) -> Tensor:
    """norm(ssd(silu(conv(xBC))) * silu(z)) of in_proj's output zxbcdt (b, l, layout.in_proj_width), as
    the mixer composes it: (b, l, d_inner), zxbcdt's dtype. seq_idx: int32 document ids (megassm.ops.int32_document_ids).
    The norm groups are the B/C groups (layout.group_size channels each); the SSD runs `ssd_kernels`.
    keep_ssd_states: megassm's SSD keeps its per-chunk states (about in_proj's output in size) for the backward
    instead of recomputing them. rank_slice: zxbcdt is this rank's slice of the sequences (context parallelism,
    megassm's SSD kernels; its halo_seq_idx int32 ids converted as seq_idx)."""
    if rank_slice is not None and ssd_kernels != "megassm":
        raise ValueError("context parallelism in the fused mixer needs megassm's SSD kernels")
    return _ConvScanNorm.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx, layout, chunk_size,
                               tuple(dt_limit), eps, ssd_kernels, keep_ssd_states, rank_slice)
