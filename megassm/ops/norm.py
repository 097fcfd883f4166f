"""RMSNorm and the gated, grouped RMSNorm of the Mamba-2 mixer, in plain PyTorch (fp32 inside)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.ops.dtypes import upcast


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """x / rms(x) * weight over the last dimension, computed in fp32, returned in out_dtype (default x's)."""
    xf = upcast(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * upcast(weight)).to(out_dtype or x.dtype)


def add_rms_norm(h: Tensor, update: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(h + update, rms_norm(h + update)): a residual add and the next pre-norm, which torch.compile
    turns into one kernel each way (the sum is not written and read back, nor its gradient added apart)."""
    h = h + update
    return h, rms_norm(h, weight, eps, out_dtype)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """norm(x * silu(z)) * weight, normalised separately over each group of `group_size` channels
    (mamba-ssm's RMSNormGated with norm_before_gate=False). Returned in x's dtype."""
    *lead, dim = x.shape
    if dim % group_size:
        raise ValueError(f"gated norm: {dim} channels are not whole groups of {group_size}")
    h = (upcast(x) * F.silu(upcast(z))).reshape(*lead, dim // group_size, group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.reshape(*lead, dim) * upcast(weight)).to(x.dtype)
