"""The MLP block's mixer: up-projection, activation, down-projection; it keeps no state in generation.

"swiglu" (Llama, Bamba): down(silu(gate) * up), up_proj holding the gate and up segments; "relu2"
(Nemotron-H): down(relu(up)^2). TP: up_proj column-parallel, down_proj row-parallel, each rank owning
mlp_hidden/tp channels: the block's one collective. Init: both U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
Linear default, as the Mamba-2 mixer's projections), down_proj scaled by 1/sqrt(n_layer) like every block's
output projection.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from megassm.model.config import ModelConfig
from megassm.model.init import uniform_fan_in
from parallel import ColumnParallelLinear, ParallelContext, RowParallelLinear

SEGMENTS = {"swiglu": ("gate", "up"), "relu2": ("up",)}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = ParallelContext()):
        super().__init__()
        cfg.check_tensor_parallel(ctx.tp)
        self.activation, hidden = cfg.mlp_activation, cfg.mlp_hidden
        self.up_proj = ColumnParallelLinear({name: uniform_fan_in((hidden, cfg.d_model), cfg.d_model)
                                             for name in SEGMENTS[cfg.mlp_activation]}, ctx)
        self.down_proj = RowParallelLinear(uniform_fan_in((cfg.d_model, hidden), hidden) / math.sqrt(cfg.n_layer), ctx)

    def forward(self, u: Tensor, seq_idx: Tensor | None = None, halo_seq_idx: Tensor | None = None) -> Tensor:
        """u: (b, l, d_model), or (b, l/tp, d_model) under sequence parallelism; each token on its own (seq_idx unused)."""
        h = self.up_proj(u)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.relu(h).square())

    def empty_state(self, batch: int) -> None:
        """No state: each token's output depends on that token alone."""
        return None
