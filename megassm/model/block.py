"""The residual block, whatever its kind: RMSNorm, then the block's mixer, its output added to the fp32
residual stream.

A block's kind is one symbol, Megatron's hybrid-pattern convention ("M" Mamba-2, "*" attention, "-" MLP),
and MIXERS maps it to the mixer module. A mixer is built as `Mixer(cfg, ctx)` and called as
`mixer(u, seq_idx, halo_seq_idx)` -> output (u's shape); for generation it also offers
`empty_state(batch)` and, called with `state=`, returns (output, state after u); a kind that keeps no state
(MLP) has the empty state None and is never given one. A new kind is its module, one line in MIXERS and its
symbol in megassm/model/config.py's LAYER_KINDS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from megassm.model.attention import Attention
from megassm.model.config import ModelConfig
from megassm.model.mixer import Mamba2Mixer
from megassm.model.mlp import MLP
from megassm.ops import add_rms_norm, maybe_compiled, rms_norm
from parallel import ParallelContext, mark_sequence_parallel

MIXERS: dict[str, type[nn.Module]] = {
    "M": Mamba2Mixer,
    "*": Attention,
    "-": MLP,
}


class RMSNorm(nn.Module):
    """Normalises the fp32 residual stream; the output is already in the dtype that the next matmul
    computes in (the autocast dtype, else the weights'), so no separate cast kernel runs."""

    def __init__(self, dim: int, eps: float, ctx: ParallelContext, compile: bool = False):
        super().__init__()
        self.eps, self.compile = eps, compile
        self.weight = nn.Parameter(torch.ones(dim))
        if ctx.sequence_parallel:
            mark_sequence_parallel(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return maybe_compiled(rms_norm, self.compile, x.device)(x, self.weight, self.eps, self._out_dtype(x))

    def add_forward(self, h: Tensor, update: Tensor | None) -> tuple[Tensor, Tensor]:
        """(h + update, its norm), fused into one kernel when compiled; (h, norm(h)) when update is None."""
        if update is None:
            return h, self(h)
        return maybe_compiled(add_rms_norm, self.compile, h.device)(h, update, self.weight, self.eps, self._out_dtype(h))

    def _out_dtype(self, x: Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype


class Block(nn.Module):
    """A pre-norm residual block, carried as (h, update): the residual stream h (fp32) and the previous
    block's output not yet added to it, so that the add and this block's norm are one fused step."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, kind: str = "M"):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, ctx, cfg.compile)
        self.mixer = MIXERS[kind](cfg, ctx)

    def forward(self, h: Tensor, update: Tensor | None, seq_idx: Tensor | None = None, halo_seq_idx: Tensor | None = None,
                state: Any = None) -> tuple[Tensor, Tensor, Any]:
        """(h + update, mixer(norm(h + update)), the mixer's state after this input: None unless given one)."""
        h, x = self.norm.add_forward(h, update)
        if state is None:
            return h, self.mixer(x, seq_idx, halo_seq_idx), None
        return h, *self.mixer(x, seq_idx, halo_seq_idx, state=state)
