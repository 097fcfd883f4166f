"""The Mamba-2 language model: embedding, pre-norm residual blocks (residual stream in fp32), final
RMSNorm, LM head (tied to the embedding by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megassm.model.config import ModelConfig
from megassm.model.mixer import Mamba2Mixer
from megassm.ops import rms_norm
from megassm.ops.dtypes import upcast


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Block(nn.Module):
    """h = h + mixer(norm(h)); h stays fp32 (type promotion) whatever precision the mixer computes in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, h: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        return h + self.mixer(self.norm(h), seq_idx=seq_idx)


class Mamba2LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embedding.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def hidden_states(self, input_ids: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (b, l, d_model)."""
        h = upcast(self.embedding(input_ids))  # the residual stream is fp32
        for layer in self.layers:
            h = layer(h, seq_idx=seq_idx)
        return self.norm_f(h)

    def head_weight(self) -> Tensor:
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        """Logits (b, l, vocab_size). `seq_idx` (b, l): document id per token for packed sequences."""
        return F.linear(self.hidden_states(input_ids, seq_idx), self.head_weight())
