"""Initial values of the model's weights that more than one layer draws the same way."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_fan_in(shape: tuple[int, ...], fan_in: int) -> Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Linear/Conv1d init, which mamba-ssm keeps."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)
