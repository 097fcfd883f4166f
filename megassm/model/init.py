"""Initial values of the model's weights that more than one layer draws the same way."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_fan_in(shape: tuple[int, ...], fan_in: int) -> Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Linear/Conv1d init, which mamba-ssm keeps."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


def residual_output(d_model: int, fan_in: int, n_layer: int) -> Tensor:
    """A block's output projection (d_model, fan_in): uniform_fan_in scaled by 1/sqrt(n_layer), as mamba-ssm and
    GPT-2 scale every residual branch's output, so the residual stream's variance does not grow with depth."""
    return uniform_fan_in((d_model, fan_in), fan_in) / math.sqrt(n_layer)
