"""Layers whose weight is several logical segments stored as separate parameters.

The mixer's in_proj output is [z | x | B | C | dt] and its conv runs over [x | B | C]. Keeping each
segment its own parameter (one GEMM / conv still runs over their concatenation) means checkpoints,
Hugging Face export and tensor-parallel resharding only ever see plain, logically shaped tensors.
(nn.ParameterDict sorts plain-dict keys, so the order always comes from `self.segments`.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megassm.ops import causal_conv1d


def _uniform_fan_in(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Linear/Conv1d init, as mamba-ssm uses."""
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _fused(params: nn.ParameterDict | None, segments: dict[str, int]) -> Tensor | None:
    """The segments concatenated along dim 0, in their logical order."""
    return None if params is None else torch.cat([params[name] for name in segments])


class SegmentedLinear(nn.Module):
    """y = x @ cat(segments).T (+ bias); `weight[name]` has shape (segment size, in_features)."""

    def __init__(self, in_features: int, segments: dict[str, int], bias: bool = False):
        super().__init__()
        self.segments = dict(segments)
        self.weight = nn.ParameterDict({name: _uniform_fan_in((size, in_features), in_features) for name, size in segments.items()})
        self.bias = nn.ParameterDict({name: nn.Parameter(torch.zeros(size)) for name, size in segments.items()}) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _fused(self.weight, self.segments), _fused(self.bias, self.segments))


class SegmentedDepthwiseConv1d(nn.Module):
    """Causal depthwise conv1d over the concatenated segments; `weight[name]` is (channels, width)."""

    def __init__(self, segments: dict[str, int], width: int, bias: bool = True):
        super().__init__()
        self.segments = dict(segments)
        self.width = width
        self.weight = nn.ParameterDict({name: _uniform_fan_in((size, width), width) for name, size in segments.items()})
        self.bias = nn.ParameterDict({name: _uniform_fan_in((size,), width) for name, size in segments.items()}) if bias else None

    def forward(self, x: Tensor, seq_idx: Tensor | None = None, activation: str | None = "silu") -> Tensor:
        weight, bias = _fused(self.weight, self.segments), _fused(self.bias, self.segments)
        return causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)
