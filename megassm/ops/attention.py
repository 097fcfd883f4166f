"""Causal self-attention over packed documents, and rotary position embeddings.

Queries are the last lq of the lk keys' positions (a rank's slice after the gathered keys of earlier CP ranks,
or new tokens after a KV cache): query i sees key j when j <= i + lk - lq and both belong to the same
document (seq_idx). Two implementations of the same function: the reference, an explicit masked softmax
(any device and dtype, float64 in the tests), and on CUDA flex_attention with a block mask built from the
same rule, which skips the blocks the mask empties (compiled: the fused kernel). Within `shared_block_masks()`
(the model's blocks, one forward pass) attention over the same document ids builds that block mask once.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import Tensor

from parallel.compiled import maybe_compiled

# Open block-mask scopes: (q_seq_idx, k_seq_idx, lq, lk) -> block mask. The keys' tensors are kept alive by the
# scope, so their ids cannot be reused by other tensors while it is open.
_BLOCK_MASKS: ContextVar[dict | None] = ContextVar("block_masks", default=None)


@contextlib.contextmanager
def shared_block_masks() -> Iterator[None]:
    """A scope in which flex_attention's block mask is built once per (document ids, lengths) and reused by later
    calls, e.g. by every attention block of one forward pass (under a CUDA graph, inside the captured kernels)."""
    token = _BLOCK_MASKS.set({})
    try:
        yield
    finally:
        _BLOCK_MASKS.reset(token)


def rotary(x: Tensor, positions: Tensor, rope_dim: int, theta: float) -> Tensor:
    """RoPE on the first rope_dim channels of each head (rotate-half, as Llama and Bamba), the rest unchanged.
    x: (b, heads, l, head_dim); positions: (l,) the tokens' positions in the whole sequence."""
    if rope_dim == 0:
        return x
    inv_freq = theta ** -(torch.arange(0, rope_dim, 2, device=x.device, dtype=torch.float64) / rope_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    rot, rest = x[..., :rope_dim].to(dtype), x[..., rope_dim:]
    half = rope_dim // 2
    rotated = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)


def causal_document_attention(q: Tensor, k: Tensor, v: Tensor, q_seq_idx: Tensor | None, k_seq_idx: Tensor | None,
                              flex: bool = False, compile: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask) v, (b, hq, lq, head_dim). q: (b, hq, lq, head_dim); k, v:
    (b, hk, lk, head_dim) with hk dividing hq (grouped-query: query head h uses key/value head h // (hq / hk));
    q_seq_idx (b, lq), k_seq_idx (b, lk): document ids (None: one document). flex: flex_attention (CUDA),
    compiled when `compile`; else the reference."""
    if flex:
        return _flex_attention(q, k, v, q_seq_idx, k_seq_idx, compile)
    b, hq, lq, dim = q.shape
    hk, lk = k.shape[1], k.shape[2]
    q = q.reshape(b, hk, hq // hk, lq, dim)  # each key/value head with the query heads that share it
    scores = q @ k[:, :, None].transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(~_mask(q_seq_idx, k_seq_idx, lq, lk, q.device)[:, None, None], -math.inf)
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return (probs @ v[:, :, None]).reshape(b, hq, lq, dim)


def _mask(q_seq_idx: Tensor | None, k_seq_idx: Tensor | None, lq: int, lk: int, device: torch.device) -> Tensor:
    """(b or 1, lq, lk): True where query i may see key j."""
    causal = torch.arange(lk, device=device) <= torch.arange(lk - lq, lk, device=device)[:, None]
    if q_seq_idx is None:
        return causal[None]
    return causal & (q_seq_idx[:, :, None] == k_seq_idx[:, None, :])


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, q_seq_idx: Tensor | None, k_seq_idx: Tensor | None, compile: bool) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lq, lk = q.shape[2], k.shape[2]
    offset = lk - lq

    def visible(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        causal = kv_idx <= q_idx + offset
        return causal if q_seq_idx is None else causal & (q_seq_idx[b, q_idx] == k_seq_idx[b, kv_idx])

    scope, key = _BLOCK_MASKS.get(), (id(q_seq_idx), id(k_seq_idx), lq, lk)
    if scope is not None and key in scope:
        block_mask = scope[key][-1]
    else:
        batch = None if q_seq_idx is None else q.shape[0]
        block_mask = create_block_mask(visible, batch, None, lq, lk, device=q.device, _compile=compile)
        if scope is not None:
            scope[key] = (q_seq_idx, k_seq_idx, block_mask)
    attend = maybe_compiled(flex_attention, compile, q.device)
    return attend(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
