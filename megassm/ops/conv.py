"""Causal depthwise conv1d over (batch, seqlen, channels), in plain PyTorch.

Computed as `width` shifted multiply-adds in the (b, l, d) layout the mixer already has, so there is
no transpose, no pad-and-slice of the output, and a document mask costs one comparison per tap.
The sums are fp32 (at least); the output has x's dtype, like a bf16 conv under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.ops.dtypes import upcast


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    halo: Tensor | None = None,
    seq_idx: Tensor | None = None,
    halo_seq_idx: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """y[t] = bias + sum_k weight[:, k] * x[t - (width-1) + k], then the activation ("silu" or None).

    x: (b, l, d); weight: (d, width); bias: (d,).
    halo: (b, width-1, d), the inputs just before x (context parallelism); zeros if None.
    seq_idx: (b, l) document ids; an input of another document than the output token is ignored.
    halo_seq_idx: (b, width-1) document ids of the halo rows (default: the first token's document).
    """
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    if weight.shape[0] != channels:
        raise ValueError(f"conv weight has {weight.shape[0]} channels, input has {channels}")
    if halo is None:
        padded = F.pad(upcast(x), (0, 0, width - 1, 0))
    else:
        padded = upcast(torch.cat([halo.to(x.dtype), x], dim=1))
    if seq_idx is not None:
        if halo_seq_idx is None:
            halo_seq_idx = seq_idx[:, :1].expand(batch, width - 1)
        padded_idx = torch.cat([halo_seq_idx, seq_idx], dim=1)

    y = padded[:, width - 1 :] * weight[:, width - 1]
    for k in range(width - 1):
        tap = padded[:, k : k + seqlen] * weight[:, k]
        if seq_idx is not None:
            tap = tap * (padded_idx[:, k : k + seqlen] == seq_idx).unsqueeze(-1)
        y = y + tap
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}: use 'silu' or None")
    return y.to(x.dtype)
