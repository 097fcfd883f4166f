"""The vocabulary-parallel embedding and LM head: their rows (the vocabulary) split over TP, so
that neither the weight nor the logits of the whole vocabulary are on any one rank."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from parallel.context import ParallelContext
from parallel.roles import ParamRole, declare_roles
from parallel.tensor_parallel import layer_input, layer_output, shard_parameter

VOCABULARY_SPLIT = ParamRole(tp_dim=0)  # embedding and LM head: rows (the vocabulary) split over TP


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over TP; each rank looks up its own rows,
    zeros elsewhere, and the partial results are summed (reduce-scattered along the sequence under SP)."""

    def __init__(self, weight: Tensor, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.weight = shard_parameter(weight, VOCABULARY_SPLIT, ctx.tp_group, "embedding (vocab_size)")
        declare_roles(self, weight=VOCABULARY_SPLIT)
        self.vocab_start = ctx.tp_rank * self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        if self.ctx.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return layer_output(out, self.ctx)


def vocab_parallel_logits(h: Tensor, weight: Tensor, ctx: ParallelContext) -> Tensor:
    """This rank's slice of the vocabulary's logits (b, l, V/tp), from vocab-split `weight`."""
    return F.linear(layer_input(h, ctx), weight)


class VocabParallelLMHead(nn.Module):
    """An untied output layer, its rows (the vocabulary) split over TP."""

    def __init__(self, weight: Tensor, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.weight = shard_parameter(weight, VOCABULARY_SPLIT, ctx.tp_group, "lm_head (vocab_size)")
        declare_roles(self, weight=VOCABULARY_SPLIT)

    def forward(self, h: Tensor) -> Tensor:
        return vocab_parallel_logits(h, self.weight, self.ctx)
