"""The attention block's mixer: causal self-attention with grouped-query heads, rotary position embeddings on
the first rope_dim channels of each head, and packed documents that never see each other (seq_idx).

It reads as single-device code; `ctx` makes it parallel. TP: qkv_proj is column-parallel over its q, k, v
segments and o_proj row-parallel (the block's one collective), each rank owning attn_heads/tp query heads and
attn_kv_heads/tp key/value heads; with fewer key/value heads than ranks every rank holds k and v whole
(replicated, their gradient summed over TP) and uses the one head its query heads share. CP: each rank holds a
slice of the sequence; its queries see the keys and values of the earlier ranks' slices and its own, one
all-gather over the CP group (its backward: reduce-scatter of their gradients), so documents that cross slices
attend exactly as on one rank; unlike Mamba-2's chunk states these bytes grow with the sequence. RoPE positions
are the tokens' positions in the whole (CP-joined) sequence. In generation the mixer carries a KVCache.

Init: qkv_proj uniform_fan_in, o_proj residual_output (model/init.py), as the other mixers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from megassm.model.config import ModelConfig
from megassm.model.init import residual_output, uniform_fan_in
from megassm.ops.attention import causal_document_attention, rotary
from parallel import ColumnParallelLinear, ParallelContext, RowParallelLinear
from parallel.collectives import gather_from_region


@dataclass
class KVCache:
    """The keys (after RoPE), values and document ids of the `length` tokens so far, for generation: the first `length`
    positions of buffers with room to grow (half as much again when full), so that a token appended copies nothing
    (torch.cat of the whole cache at every token made generation quadratic in its length). `extend` writes into the
    buffers it shares with the cache it returns; extending an earlier cache of the same buffers again (two
    continuations of one text) copies them first."""

    k_buffer: Tensor  # (b, key/value heads, capacity, head_dim)
    v_buffer: Tensor
    seq_idx_buffer: Tensor  # (b, capacity)
    length: int = 0
    written: list[int] = field(default_factory=lambda: [0])  # the positions written into these buffers, shared

    @property
    def k(self) -> Tensor:
        return self.k_buffer[:, :, : self.length]

    @property
    def v(self) -> Tensor:
        return self.v_buffer[:, :, : self.length]

    @property
    def seq_idx(self) -> Tensor:
        return self.seq_idx_buffer[:, : self.length]

    def extend(self, k: Tensor, v: Tensor, seq_idx: Tensor | None) -> KVCache:
        """The cache with the l new tokens' k, v (b, heads, l, head_dim) after it. The new tokens' first document
        continues the cache's last one, as a Mamba-2 state continues into it (seq_idx None: one document)."""
        last = self.seq_idx[:, -1:] if self.length else self.seq_idx_buffer.new_zeros(k.shape[0], 1)
        ids = last.expand(-1, k.shape[2]) if seq_idx is None else seq_idx - seq_idx[:, :1] + last
        end = self.length + k.shape[2]
        buffers, written = (self.k_buffer, self.v_buffer, self.seq_idx_buffer), self.written
        if end > self.k_buffer.shape[2] or self.k_buffer.dtype != k.dtype or written[0] != self.length:
            capacity = max(end, 3 * end // 2)  # in k's dtype, and a later cache's positions left alone
            buffers = tuple(_grown(buffer, self.length, capacity, dim, dtype)
                            for buffer, dim, dtype in zip(buffers, (2, 2, 1), (k.dtype, v.dtype, self.seq_idx_buffer.dtype)))
            written = [self.length]
        for buffer, new, dim in zip(buffers, (k, v, ids), (2, 2, 1)):
            buffer.narrow(dim, self.length, new.shape[dim]).copy_(new)
        written[0] = end
        return KVCache(*buffers, length=end, written=written)


def _grown(buffer: Tensor, length: int, capacity: int, dim: int, dtype: torch.dtype) -> Tensor:
    """A buffer of `capacity` along `dim` in `dtype`, holding the first `length` entries of `buffer`."""
    shape = list(buffer.shape)
    shape[dim] = capacity
    grown = buffer.new_empty(shape, dtype=dtype)
    grown.narrow(dim, 0, length).copy_(buffer.narrow(dim, 0, length))
    return grown


class Attention(nn.Module):
    """u -> qkv_proj -> RoPE(q), RoPE(k) -> causal attention within documents -> o_proj."""

    torch_compile = False  # on CUDA: flex_attention compiled into its fused kernel, else eager and slow (apply_kernels sets it)

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = ParallelContext()):
        super().__init__()
        cfg.check_tensor_parallel(ctx.tp)
        self.cfg, self.ctx = cfg, ctx
        dim, kv_heads = cfg.attn_head_dim, cfg.attn_kv_heads
        replicated = kv_heads < ctx.tp
        self.heads, self.kv_heads = cfg.attn_heads // ctx.tp, 1 if replicated else kv_heads // ctx.tp
        # The key/value head of this rank's query heads when k and v are replicated (all of qkv_proj's k, v otherwise).
        self.kv_head = ctx.tp_rank * kv_heads // ctx.tp if replicated else None
        self.qkv_proj = ColumnParallelLinear(
            {name: uniform_fan_in((heads * dim, cfg.d_model), cfg.d_model) for name, heads in
             (("q", cfg.attn_heads), ("k", kv_heads), ("v", kv_heads))},
            ctx, replicated=("k", "v") if replicated else (),
        )
        self.widths = [self.heads * dim, *[(kv_heads if replicated else self.kv_heads) * dim] * 2]
        width = cfg.attn_heads * dim
        self.o_proj = RowParallelLinear(residual_output(cfg.d_model, width, cfg.n_layer), ctx)

    def forward(self, u: Tensor, seq_idx: Tensor | None = None, halo_seq_idx: Tensor | None = None,
                state: KVCache | None = None) -> Tensor | tuple[Tensor, KVCache]:
        """u: (b, l, d_model), or (b, l/tp, d_model) under sequence parallelism; seq_idx: (b, l) document ids
        (halo_seq_idx, for the Mamba-2 conv, is not needed). Given `state` (generation: `empty_state`, or the
        cache a previous call returned), u continues the sequences it holds, and the output comes with the cache after u."""
        q, k, v = (self._heads(t) for t in self.qkv_proj(u).split(self.widths, dim=-1))
        if self.kv_head is not None:
            k, v = k[:, self.kv_head : self.kv_head + 1], v[:, self.kv_head : self.kv_head + 1]
        length = q.shape[2]
        start = state.length if state is not None else self.ctx.cp_rank * length
        positions = torch.arange(start, start + length, device=u.device)
        q, k = (rotary(t, positions, self.cfg.rope_dim, self.cfg.rope_theta) for t in (q, k))
        k_seq_idx = seq_idx
        if state is not None:
            state = state.extend(k, v, seq_idx)
            k, v, k_seq_idx = state.k, state.v, state.seq_idx
            seq_idx = k_seq_idx[:, -length:]
        elif self.ctx.cp > 1:
            k, v, k_seq_idx = self._with_earlier_ranks(k, v, seq_idx)
        y = causal_document_attention(q, k, v, seq_idx, k_seq_idx, flex=u.is_cuda and state is None, compile=self.torch_compile)
        y = self.o_proj(y.transpose(1, 2).flatten(2))
        return y if state is None else (y, state)

    def empty_state(self, batch: int) -> KVCache:
        """The cache before a sequence's first token: no tokens, on the parameters' device and dtype."""
        like = self.o_proj.weight
        kv = like.new_zeros(batch, self.kv_heads, 0, self.cfg.attn_head_dim)
        return KVCache(kv, kv.clone(), torch.zeros(batch, 0, dtype=torch.long, device=like.device))

    def _heads(self, x: Tensor) -> Tensor:
        """(b, l, heads * head_dim) -> (b, heads, l, head_dim)."""
        return x.unflatten(-1, (-1, self.cfg.attn_head_dim)).transpose(1, 2)

    def _with_earlier_ranks(self, k: Tensor, v: Tensor, seq_idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The keys, values and document ids of the CP ranks up to this one, in sequence order (one all-gather of k | v)."""
        group, end = self.ctx.cp_group, (self.ctx.cp_rank + 1) * k.shape[2]
        k, v = gather_from_region(torch.cat([k, v], dim=1), group, 2)[:, :, :end].chunk(2, dim=1)
        return k, v, None if seq_idx is None else gather_from_region(seq_idx, group, 1)[:, :end]
