"""Causal conv1d and the (gated, grouped) RMSNorm against direct float64 definitions."""

import pytest
import torch
import torch.nn.functional as F

from megassm.ops import causal_conv1d, rms_norm
from megassm.ops.norm import gated_rms_norm


def naive_conv(x, weight, bias, halo, seq_idx, halo_seq_idx):
    """y[t] = silu(bias + sum_k w[:, k] x[t - (width-1) + k]) over inputs of the same document."""
    width = weight.shape[1]
    full = torch.cat([halo, x], dim=1)
    ids = torch.cat([halo_seq_idx, seq_idx], dim=1)
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            acc = bias.clone()
            for k in range(width):
                source = t + k  # index into `full`; the output token is at t + width - 1
                if ids[b, source] == ids[b, t + width - 1]:
                    acc = acc + weight[:, k] * full[b, source]
            y[b, t] = F.silu(acc)
    return y


@pytest.mark.parametrize("with_halo", [False, True])
def test_causal_conv1d_with_halo_and_documents(with_halo):
    batch, seqlen, channels, width = 2, 11, 5, 4
    f64 = dict(dtype=torch.float64)
    x = torch.randn(batch, seqlen, channels, **f64)
    weight, bias = torch.randn(channels, width, **f64), torch.randn(channels, **f64)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6]])
    if with_halo:
        halo = torch.randn(batch, width - 1, channels, **f64)
        halo_seq_idx = torch.tensor([[-1, 0, 0], [4, 4, 5]])  # row 0: one halo row of another document
    else:
        halo, halo_seq_idx = torch.zeros(batch, width - 1, channels, **f64), seq_idx[:, :1].expand(batch, width - 1)
    y = causal_conv1d(x, weight, bias, halo=halo if with_halo else None, seq_idx=seq_idx,
                      halo_seq_idx=halo_seq_idx if with_halo else None, activation="silu")
    torch.testing.assert_close(y, naive_conv(x, weight, bias, halo, seq_idx, halo_seq_idx))


def test_causal_conv1d_without_documents_is_torch_conv1d():
    x, weight, bias = torch.randn(2, 9, 6), torch.randn(6, 4), torch.randn(6)
    want = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=3, groups=6)[..., :9].transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, weight, bias), want)


def test_rms_norm():
    x, w = torch.randn(3, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-5), want)


@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_gated_rms_norm_normalises_each_group(ngroups):
    dim = 12
    x, z = torch.randn(2, 2, 3, dim, dtype=torch.float64)
    w = torch.randn(dim, dtype=torch.float64)
    size = dim // ngroups
    groups = (x * z * torch.sigmoid(z)).split(size, dim=-1)
    want = torch.cat([g / torch.sqrt((g**2).mean(-1, keepdim=True) + 1e-5) for g in groups], dim=-1) * w
    torch.testing.assert_close(gated_rms_norm(x, z, w, size, 1e-5), want)
