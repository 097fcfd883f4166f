"""Text generation on one device: sampling a token from logits (temperature, top-k, top-p) and the loop
that feeds each sampled token back through the model's forward with the sequences' states.

The prompt runs through the parallel forward (the chunked scan), which also returns each layer's state;
each further token runs through the same forward from those states (the scan's recurrence). A model with attention
blocks takes the prompt PREFILL_CHUNK_TOKENS at a time, each piece continuing the states of the one before: its
attention scores then take (piece x prompt) entries, not (prompt x prompt), 64 GiB per layer at 32K tokens and 16 heads."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from megassm.model import Mamba2LM

PREFILL_CHUNK_TOKENS = 1024  # the prompt tokens a model with attention blocks takes at a time


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int = 0) -> None:
    """Raise ValueError naming the first setting that cannot generate."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be 0 (greedy) or a positive number, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or positive, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of logits (b, vocab): the argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k most likely ids (0: all) and then to the
    fewest most likely ids holding top_p of the probability (1: all)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # at most 0: a tiny temperature cannot overflow
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # the ids before these already hold top_p: never the first
        logits = logits.scatter(-1, order, ordered.masked_fill(beyond, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def prefill(model: Mamba2LM, prompt_ids: Tensor) -> tuple[Tensor, list[Any]]:
    """Run prompts (b, l >= 1) from empty states: the logits (b, vocab) after their last token and the
    states to continue from."""
    if model.ctx.tp > 1 or model.ctx.cp > 1:
        raise ValueError(f"generation runs on one device, this model is split over tp = {model.ctx.tp}, cp = {model.ctx.cp}: "
                         "build it with the default ParallelContext() and load the checkpoint into it")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prefill takes prompts shaped (batch, length >= 1), got {tuple(prompt_ids.shape)}")
    pieces = prompt_ids.split(PREFILL_CHUNK_TOKENS, dim=1) if "*" in model.cfg.layer_kinds else [prompt_ids]
    states = model.empty_states(prompt_ids.shape[0])
    for piece in pieces:
        logits, states = model(piece, states=states)
    return logits, states


@torch.no_grad()
def step(model: Mamba2LM, token: Tensor, states: list[Any]) -> tuple[Tensor, list[Any]]:
    """One more token per sequence, token (b,): its logits (b, vocab) and the states after it."""
    return model(token[:, None], states=states)


@torch.no_grad()
def generate(
    model: Mamba2LM,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Continue prompts of equal length (b, l): returns (b, l + n), prompts first, n <= max_new_tokens.

    A row that samples eos_id is finished: eos_id fills the rest of it, and generation stops early
    once every row is. vocab_size: sample only ids below it (a tokenizer smaller than the model's
    padded vocabulary). Each row is one document (no document ids: an eos_id inside a prompt does not reset the
    states as training's document starts did). Mamba-2 blocks' memory stays constant however many tokens are
    generated; attention blocks' key/value caches grow with them."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens = [prompt_ids]
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    logits, states = prefill(model, prompt_ids)
    for i in range(max_new_tokens):
        token = sample_next(logits[:, :vocab_size], temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        tokens.append(token[:, None])
        if finished.all() or i == max_new_tokens - 1:
            break
        logits, states = step(model, token, states)
    return torch.cat(tokens, dim=1)
