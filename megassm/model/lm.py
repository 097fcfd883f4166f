"""The Mamba-2 language model: embedding, pre-norm residual blocks (residual stream in fp32), final
RMSNorm, LM head (tied to the embedding by default). Under TP the vocabulary is split and the loss
is computed from vocabulary-split logits; under SP the residual stream is split along the sequence."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from megassm.model.block import Block, RMSNorm
from megassm.model.config import ModelConfig
from megassm.model.cuda_graphs import BlockGraphs
from megassm.model.init import uniform_fan_in
from megassm.ops import int32_document_ids, resolve_backend
from megassm.ops.attention import shared_block_masks
from megassm.ops.dtypes import upcast
from parallel import (
    LOSS_CHUNK_TOKENS,
    ParallelContext,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    send_to_next_rank,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_logits,
)


class Mamba2LM(nn.Module):
    # How the model runs, set on a built model by megassm/model/apply.py:
    torch_compile = False  # torch.compile the loss's chunk steps on CUDA
    backend = "auto"  # the loss's kernels: "auto" (Triton on CUDA: parallel/cross_entropy_triton.py), "torch" or "triton"
    cuda_graphs = False  # replay the blocks as CUDA graphs (megassm/model/cuda_graphs.py), captured on the first training step
    cuda_graph_groups = 1  # in this many groups of consecutive blocks, each one autograd node
    loss_chunk_tokens = LOSS_CHUNK_TOKENS  # the loss holds the logits of this many tokens at a time

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = ParallelContext()):
        super().__init__()
        cfg.check_tensor_parallel(ctx.tp)
        self.cfg, self.ctx = cfg, ctx
        self.graphs: BlockGraphs | None = None
        self.embedding = VocabParallelEmbedding(torch.empty(cfg.vocab_size, cfg.d_model).normal_(std=cfg.init_std), ctx)
        self.layers = nn.ModuleList(Block(cfg, ctx, kind) for kind in cfg.layer_kinds)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, ctx)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = VocabParallelLMHead(uniform_fan_in((cfg.vocab_size, cfg.d_model), cfg.d_model), ctx)

    def forward(self, input_ids: Tensor, seq_idx: Tensor | None = None, labels: Tensor | None = None,
                states: list[Any] | None = None) -> Tensor | tuple[Tensor, list[Any]]:
        """Logits (b, l, vocab_size / tp), this TP rank's part of the vocabulary; or, given labels,
        the cross-entropy per token (b, l), fp32, 0 where labels == -100, the logits never gathered over TP
        nor held for more than loss_chunk_tokens tokens at a time.
        Given `states` (generation: `empty_states`, or the states a previous call returned), input_ids
        continue the sequences they hold: returns the logits after the last token (b, vocab_size / tp) and
        the states after input_ids.
        The loss goes through forward so that wrappers such as DDP see the call."""
        if states is not None:
            h, states = self._final_hidden(input_ids, seq_idx, states)
            return self.logits(h[:, -1]), states
        h = self.hidden_states(input_ids, seq_idx)
        if labels is None:
            return self.logits(h)
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return vocab_parallel_linear_cross_entropy(h, weight, labels, self.ctx, self.loss_chunk_tokens, compile=self.torch_compile,
                                                   triton=resolve_backend(self.backend, h.device) == "triton")

    def logits(self, h: Tensor) -> Tensor:
        """The LM head on final hidden states h (..., d_model): this TP rank's part of the vocabulary."""
        return vocab_parallel_logits(h, self.embedding.weight, self.ctx) if self.lm_head is None else self.lm_head(h)

    def empty_states(self, batch: int) -> list[Any]:
        """Each block's state before a sequence's first token, for `forward(..., states=)`."""
        return [layer.mixer.empty_state(batch) for layer in self.layers]

    def hidden_states(self, input_ids: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        """Final normalised hidden states: (b, l, d_model), or (b, l/tp, d_model) under SP.
        input_ids and seq_idx are this CP rank's slice of the sequence."""
        return self._final_hidden(input_ids, seq_idx)[0]

    def _final_hidden(self, input_ids: Tensor, seq_idx: Tensor | None, states: list[Any] | None = None) -> tuple[Tensor, list[Any] | None]:
        """hidden_states, and given states, the states after input_ids."""
        ctx = self.ctx
        if ctx.sequence_parallel and input_ids.shape[1] % ctx.tp:
            raise ValueError(f"sequence parallelism splits each rank's {input_ids.shape[1]} tokens over tp = {ctx.tp}: they must divide")
        if ctx.cp > 1 and input_ids.shape[1] < self.cfg.d_conv - 1:
            raise ValueError(f"each CP rank needs at least model.d_conv - 1 = {self.cfg.d_conv - 1} tokens, got {input_ids.shape[1]}")
        halo_seq_idx = None
        if seq_idx is not None:  # the ids as the kernels take them, and the previous CP rank's last ones, once for all layers
            seq_idx = int32_document_ids(seq_idx)
            if ctx.cp > 1:
                with torch.no_grad():
                    halo_seq_idx = send_to_next_rank(seq_idx[:, seq_idx.shape[1] - (self.cfg.d_conv - 1) :], ctx.cp_group)
        h = upcast(self.embedding(input_ids))  # the residual stream is fp32
        if states is None:
            if self.cuda_graphs and self.graphs is None and h.is_cuda and seq_idx is not None and torch.is_grad_enabled():
                run = lambda h, update, seq, halo, layers: self.run_blocks(h, seq, halo, update=update, layers=layers)[:2]  # noqa: E731
                self.graphs = BlockGraphs(run, self.layers, self.cuda_graph_groups, h, seq_idx, halo_seq_idx)
            if self.graphs is not None and self.graphs.matches(h, seq_idx, halo_seq_idx):
                return self.norm_f.add_forward(*self.graphs(h, seq_idx, halo_seq_idx))[1], None
        h, update, states = self.run_blocks(h, seq_idx, halo_seq_idx, states)
        return self.norm_f.add_forward(h, update)[1], states

    def run_blocks(self, h: Tensor, seq_idx: Tensor | None, halo_seq_idx: Tensor | None = None, states: list[Any] | None = None,
                   update: Tensor | None = None, layers: slice = slice(None)) -> tuple[Tensor, Tensor, list[Any] | None]:
        """The blocks `layers` in order, from the residual stream h and the previous block's output not yet added to it
        (None before the first block): (residual stream, last block's output not yet added to it, and given states,
        the states after)."""
        after = []
        with shared_block_masks():  # the attention blocks build one block mask for the pass
            for i, layer in zip(range(len(self.layers))[layers], self.layers[layers]):
                h, update, state = layer(h, update, seq_idx, halo_seq_idx, None if states is None else states[i])
                after.append(state)
        return h, update, None if states is None else after
