"""The residual block, whatever its kind: RMSNorm, then the block's mixer, its output added to the fp32
residual stream.

A block's kind is one symbol, Megatron's hybrid-pattern convention ("M" Mamba-2, "*" attention, "-" MLP),
and MIXERS maps it to the mixer module. A mixer is built as `Mixer(cfg, ctx)` and called as
`mixer(u, seq_idx, halo_seq_idx)` -> output (u's shape); for generation it also offers
`empty_state(batch)` and, called with `state=`, returns (output, state after u); a kind that keeps no state
(MLP) has the empty state None and is never given one. A new kind is its module, one line in MIXERS, its
symbol in model/config.py's LAYER_KINDS (and its keys' checks there), its parameter count in metrics.BLOCK_PARAMS,
what it keeps for the backward in auto_choices._kept_per_token, and its keys in checkpoint.architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megassm.model.attention import Attention
from megassm.model.config import ModelConfig
from megassm.model.mixer import Mamba2Mixer
from megassm.model.mlp import MLP
from megassm.ops import add_rms_norm, maybe_compiled, rms_norm
from parallel import ParallelContext, ParamRole, declare_roles

MIXERS: dict[str, type[nn.Module]] = {
    "M": Mamba2Mixer,
    "*": Attention,
    "-": MLP,
}


class RMSNorm(nn.Module):
    """Normalises the fp32 residual stream; the output is already in the dtype that the next matmul
    computes in (the autocast dtype, else the weights'), so no separate cast kernel runs."""

    torch_compile = False  # torch.compile the norm (and the add before it) into one kernel on CUDA (apply_kernels sets it)

    def __init__(self, dim: int, eps: float, ctx: ParallelContext):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        declare_roles(self, weight=ParamRole(sequence_parallel=ctx.sequence_parallel))

    def forward(self, x: Tensor) -> Tensor:
        return maybe_compiled(rms_norm, self.torch_compile, x.device)(x, self.weight, self.eps, self._out_dtype(x))

    def add_forward(self, h: Tensor, update: Tensor | None) -> tuple[Tensor, Tensor]:
        """(h + update, its norm), fused into one kernel when compiled; (h, norm(h)) when update is None."""
        if update is None:
            return h, self(h)
        return maybe_compiled(add_rms_norm, self.torch_compile, h.device)(h, update, self.weight, self.eps, self._out_dtype(h))

    def _out_dtype(self, x: Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype


class Block(nn.Module):
    """A pre-norm residual block, carried as (h, update): the residual stream h (fp32) and the previous
    block's output not yet added to it, so that the add and this block's norm are one fused step."""

    recompute = False  # keep only the block's input and recompute the rest in backward (apply_activation_checkpointing)

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, kind: str = "M"):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, ctx)
        self.mixer = MIXERS[kind](cfg, ctx)

    def forward(self, h: Tensor, update: Tensor | None, seq_idx: Tensor | None = None, halo_seq_idx: Tensor | None = None,
                state: Any = None) -> tuple[Tensor, Tensor, Any]:
        """(h + update, mixer(norm(h + update)), the mixer's state after this input: None unless given one)."""
        if self.recompute and torch.is_grad_enabled():
            h = h if update is None else h + update  # added outside: the recomputation keeps one tensor, not two
            return checkpoint(self._forward, h, None, seq_idx, halo_seq_idx, state, use_reentrant=False)
        return self._forward(h, update, seq_idx, halo_seq_idx, state)

    def _forward(self, h: Tensor, update: Tensor | None, seq_idx: Tensor | None, halo_seq_idx: Tensor | None,
                 state: Any) -> tuple[Tensor, Tensor, Any]:
        h, x = self.norm.add_forward(h, update)
        if state is None:
            return h, self.mixer(x, seq_idx, halo_seq_idx), None
        return h, *self.mixer(x, seq_idx, halo_seq_idx, state=state)
