"""The middle of the Mamba-2 mixer as one autograd step on CUDA: in_proj's output [z | xBC | dt] ->
conv + silu -> SSD (+ D x) -> norm(y * silu(z)), with the kernels of the composed path
(megassm/model/mixer.py): megassm's Triton conv, the SSD's kernels (megassm's or mamba-ssm's), mamba-ssm's
gated RMSNorm forward and megassm's backward of it (megassm/ops/gated_norm_triton.py).

Why: composed, autograd splits in_proj's output into z, xBC and dt (and the conv's output into x, B
and C) and in backward concatenates their separate gradients again: two copies of the layer's widest
activations per layer (~10 ms of a 340 ms 780m step on the H100). Here each kernel's backward writes
straight into its slice of one gradient buffer, as mamba-ssm's mem-eff path does. Without CP only: a
CP rank adds the incoming state between the SSD and the norm, which the composed path does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megassm.ops.conv_triton import conv1d_silu_backward, conv1d_silu_forward, last_dim_contiguous
from megassm.ops.gated_norm_triton import gated_norm_backward
from megassm.ops.layout import Mamba2Layout
from megassm.ops.mamba_triton import load_triton_kernels
from megassm.ops.ssd_triton import SSDSaved, ssd_backward, ssd_forward


def _rows(t: Tensor, layout: Mamba2Layout) -> Tensor:
    """(b, l, ...) -> (b * l, d_inner): the norm kernels' layout (a view: rows keep their stride)."""
    return t.reshape(-1, layout.d_inner)


def _scan_forward(kernels: str, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor, dt_bias: Tensor,
                  seq_idx: Tensor | None, dt_limit: tuple[float, float]) -> tuple[Tensor, SSDSaved | None]:
    """y of the SSD (dt through bias and softplus) by `kernels`, "megassm" or "mamba-ssm", and what megassm's
    backward could reuse (None for mamba-ssm's, whose backward recomputes it)."""
    options = dict(D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit)
    if kernels == "megassm":
        y, _, saved = ssd_forward(x, dt, A, B, C, chunk_size, **options)
        return y, saved
    return load_triton_kernels().scan_forward(x, dt, A, B, C, chunk_size, **options)[0], None


def _scan_backward(kernels: str, dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, y: Tensor, chunk_size: int,
                   D: Tensor, dt_bias: Tensor, seq_idx: Tensor | None, dt_limit: tuple[float, float], saved: SSDSaved | None,
                   handed: Tensor | None, dx: Tensor, ddt: Tensor, dB: Tensor, dC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dA, dD, d(dt_bias)); dx, ddt, dB, dC written into the given buffers. The forward's states are recomputed
    (from the states `handed` to their walk's segments, where given) unless `saved` holds them."""
    options = dict(D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit, dx=dx, ddt=ddt, dB=dB, dC=dC)
    if kernels == "megassm":
        _, _, dA, _, _, dD, ddt_bias, _ = ssd_backward(dy, x, dt, A, B, C, chunk_size, saved=saved, handed=handed, **options)
    else:
        _, _, dA, _, _, dD, _, ddt_bias, _ = load_triton_kernels().scan_backward(dy, x, dt, A, B, C, y, chunk_size, **options)
    return dA, dD, ddt_bias


class _ConvScanNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
                norm_weight: Tensor, seq_idx: Tensor | None, layout: Mamba2Layout, chunk_size: int, dt_limit: tuple[float, float],
                eps: float, ssd_kernels: str, keep_ssd_states: bool) -> Tensor:
        kernels = load_triton_kernels()
        zxbcdt, conv_weight = last_dim_contiguous(zxbcdt), conv_weight.contiguous()
        z, xBC, dt = layout.split_in_proj(zxbcdt)
        xBC_conv = conv1d_silu_forward(xBC, conv_weight, conv_bias, seq_idx)
        x, B, C = layout.split_conv(xBC_conv)
        y, saved = _scan_forward(ssd_kernels, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit)
        out, _, rstd = kernels.norm_forward(_rows(y, layout), norm_weight, None, eps, _rows(z, layout), group_size=layout.group_size,
                                            norm_before_gate=False, is_rms_norm=True)
        # The states, or where they are not kept the state handed to each segment of their walk: to recompute them from.
        kept = saved._replace(handed=None) if keep_ssd_states and saved is not None else None
        handed = saved.handed if saved is not None and kept is None else None
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, xBC_conv, y, rstd, dt_bias, A, D, norm_weight, seq_idx, handed,
                              *(kept[:-1] if kept else ()))  # SSDSaved's tensors: all its fields but kernel_chunk, the last
        ctx.layout, ctx.chunk_size, ctx.dt_limit, ctx.ssd_kernels = layout, chunk_size, dt_limit, ssd_kernels
        ctx.kernel_chunk = kept.kernel_chunk if kept else None
        return out.view(*zxbcdt.shape[:2], layout.d_inner)

    @staticmethod
    def backward(ctx, dout: Tensor):
        layout = ctx.layout
        zxbcdt, conv_weight, conv_bias, xBC_conv, y, rstd, dt_bias, A, D, norm_weight, seq_idx, handed, *kept = ctx.saved_tensors
        saved = SSDSaved(*kept, ctx.kernel_chunk) if kept else None
        z, xBC, dt = layout.split_in_proj(zxbcdt)
        grad = torch.empty_like(zxbcdt)  # d(in_proj output): the kernels below each write their slice
        dz, dxBC, ddt = layout.split_in_proj(grad)
        dxBC_conv = torch.empty_like(xBC_conv)
        dx, dB, dC = layout.split_conv(dxBC_conv)
        dy, dnorm_weight = gated_norm_backward(_rows(last_dim_contiguous(dout), layout), _rows(y, layout), _rows(z, layout), norm_weight,
                                               rstd, layout.group_size, dz=_rows(dz, layout))
        x, B, C = layout.split_conv(xBC_conv)
        dA, dD, ddt_bias = _scan_backward(ctx.ssd_kernels, dy.view_as(y), x, dt, A, B, C, y, ctx.chunk_size, D, dt_bias, seq_idx,
                                          ctx.dt_limit, saved, handed, dx, ddt, dB, dC)
        _, dconv_weight, dconv_bias, _ = conv1d_silu_backward(xBC, conv_weight, conv_bias, seq_idx, dxBC_conv, dx=dxBC)
        return grad, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight, None, None, None, None, None, None, None


def conv_ssd_gated_norm(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
                        norm_weight: Tensor, layout: Mamba2Layout, chunk_size: int, dt_limit: tuple[float, float], eps: float,
                        seq_idx: Tensor | None = None, ssd_kernels: str = "megassm", keep_ssd_states: bool = False) -> Tensor:
    """norm(ssd(silu(conv(xBC))) * silu(z)) of in_proj's output zxbcdt (b, l, layout.in_proj_width), as
    the mixer composes it: (b, l, d_inner), zxbcdt's dtype. seq_idx: int32 document ids starting at 0.
    The norm groups are the B/C groups (layout.group_size channels each); the SSD runs `ssd_kernels`.
    keep_ssd_states: megassm's SSD keeps its per-chunk states (about in_proj's output in size) for the backward
    instead of recomputing them."""
    return _ConvScanNorm.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx, layout, chunk_size,
                               tuple(dt_limit), eps, ssd_kernels, keep_ssd_states)
