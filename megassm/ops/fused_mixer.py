"""The middle of the Mamba-2 mixer as one autograd step on CUDA: in_proj's output [z | xBC | dt] ->
conv + silu -> SSD (+ D x) -> norm(y * silu(z)), with the kernels of the composed path
(megassm/model/mixer.py): megassm's Triton conv, mamba-ssm's SSD and gated RMSNorm.

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
from megassm.ops.mamba_triton import load_triton_kernels


class _Dims:
    """Channel counts of one rank's mixer, read off its parameters."""

    def __init__(self, conv_weight: Tensor, D: Tensor, norm_weight: Tensor, ngroups: int):
        self.nheads, self.d_inner, self.ngroups = D.shape[0], norm_weight.shape[0], ngroups
        self.dstate = (conv_weight.shape[0] - self.d_inner) // (2 * ngroups)

    def split_in_proj(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (b, l, d_inner), xBC (b, l, d_inner + 2 G N), dt (b, l, H): views of t."""
        return t.split([self.d_inner, self.d_inner + 2 * self.ngroups * self.dstate, self.nheads], dim=-1)

    def split_conv(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, l, H, P), B and C (b, l, G, N): views of t."""
        gn = self.ngroups * self.dstate
        x, B, C = t.split([self.d_inner, gn, gn], dim=-1)
        return (x.unflatten(-1, (self.nheads, -1)), B.unflatten(-1, (self.ngroups, -1)), C.unflatten(-1, (self.ngroups, -1)))

    def rows(self, t: Tensor) -> Tensor:
        """(b, l, ...) -> (b * l, d_inner): the norm kernels' layout (a view: rows keep their stride)."""
        return t.reshape(-1, self.d_inner)


class _ConvScanNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
                norm_weight: Tensor, seq_idx: Tensor | None, ngroups: int, chunk_size: int, dt_limit: tuple[float, float],
                eps: float) -> Tensor:
        kernels, dims = load_triton_kernels(), _Dims(conv_weight, D, norm_weight, ngroups)
        zxbcdt, conv_weight = last_dim_contiguous(zxbcdt), conv_weight.contiguous()
        z, xBC, dt = dims.split_in_proj(zxbcdt)
        xBC_conv = conv1d_silu_forward(xBC, conv_weight, conv_bias, seq_idx)
        x, B, C = dims.split_conv(xBC_conv)
        y, *_ = kernels.scan_forward(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
                                      dt_limit=dt_limit)
        out, _, rstd = kernels.norm_forward(dims.rows(y), norm_weight, None, eps, dims.rows(z), group_size=dims.d_inner // ngroups,
                                            norm_before_gate=False, is_rms_norm=True)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, xBC_conv, y, rstd, dt_bias, A, D, norm_weight, seq_idx)
        ctx.dims, ctx.chunk_size, ctx.dt_limit, ctx.eps = dims, chunk_size, dt_limit, eps
        return out.view(*zxbcdt.shape[:2], dims.d_inner)

    @staticmethod
    def backward(ctx, dout: Tensor):
        kernels, dims = load_triton_kernels(), ctx.dims
        zxbcdt, conv_weight, conv_bias, xBC_conv, y, rstd, dt_bias, A, D, norm_weight, seq_idx = ctx.saved_tensors
        z, xBC, dt = dims.split_in_proj(zxbcdt)
        grad = torch.empty_like(zxbcdt)  # d(in_proj output): the kernels below each write their slice
        dz, dxBC, ddt = dims.split_in_proj(grad)
        dxBC_conv = torch.empty_like(xBC_conv)
        dx, dB, dC = dims.split_conv(dxBC_conv)
        dy, dnorm_weight, _, _ = kernels.norm_backward(
            dims.rows(last_dim_contiguous(dout)), dims.rows(y), norm_weight, None, ctx.eps, None, rstd, dims.rows(z),
            group_size=dims.d_inner // dims.ngroups, norm_before_gate=False, is_rms_norm=True, dz=dims.rows(dz),
        )
        x, B, C = dims.split_conv(xBC_conv)
        _, _, dA, _, _, dD, _, ddt_bias, _ = kernels.scan_backward(
            dy.view_as(y), x, dt, A, B, C, y, ctx.chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=ctx.dt_limit, dx=dx, ddt=ddt, dB=dB, dC=dC,
        )
        _, dconv_weight, dconv_bias, _ = conv1d_silu_backward(xBC, conv_weight, conv_bias, seq_idx, dxBC_conv, dx=dxBC)
        return grad, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight, None, None, None, None, None


def conv_ssd_gated_norm(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
                        norm_weight: Tensor, ngroups: int, chunk_size: int, dt_limit: tuple[float, float], eps: float,
                        seq_idx: Tensor | None = None) -> Tensor:
    """norm(ssd(silu(conv(xBC))) * silu(z)) of in_proj's output zxbcdt (b, l, 2 d_inner + 2 G N + H), as
    the mixer composes it: (b, l, d_inner), zxbcdt's dtype. seq_idx: int32 document ids starting at 0.
    The norm groups are the B/C groups (d_inner / ngroups channels each)."""
    return _ConvScanNorm.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, seq_idx, ngroups, chunk_size,
                               tuple(dt_limit), eps)
