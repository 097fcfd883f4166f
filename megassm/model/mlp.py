"""The MLP block's mixer: up-projection, activation, down-projection; it keeps no state in generation.

"swiglu" (Llama, Bamba): down(silu(gate) * up), up_proj holding the gate and up segments; "relu2"
(Nemotron-H): down(relu(up)^2). TP: up_proj column-parallel, down_proj row-parallel, each rank owning
mlp_hidden/tp channels: the block's one collective. Init: up_proj uniform_fan_in, down_proj residual_output
(model/init.py), as the other mixers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megassm.model.config import MLP_SEGMENTS, ModelConfig
from megassm.model.init import residual_output, uniform_fan_in
from parallel import ColumnParallelLinear, ParallelContext, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = ParallelContext()):
        super().__init__()
        cfg.check_tensor_parallel(ctx.tp)
        self.activation, hidden = cfg.mlp_activation, cfg.mlp_hidden
        self.up_proj = ColumnParallelLinear({name: uniform_fan_in((hidden, cfg.d_model), cfg.d_model)
                                             for name in MLP_SEGMENTS[cfg.mlp_activation]}, ctx)
        self.down_proj = RowParallelLinear(residual_output(cfg.d_model, hidden, cfg.n_layer), ctx)

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
