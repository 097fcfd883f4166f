"""State-dict mapping between megassm and transformers' models, block by block (pure functions on dictionaries).

A `Layout` says where a transformers model keeps each megassm block's norm and mixer: Mamba2ForCausalLM,
NemotronHForCausalLM (and mamba-ssm, up to the embedding's name) one block per `backbone.layers.N` (`norm`,
`mixer`), BambaForCausalLM two per decoder layer `model.layers.N`: `input_layernorm` + `mamba` or `self_attn`,
then `pre_ff_layernorm` + `feed_forward`. The mixers' tensors map by kind: Mamba-2's in_proj over
[z | x | B | C | dt] and conv1d over [x | B | C] (shape (channels, 1, width)) are one tensor there and one
parameter per segment here (parallel.ShardedSegments), concatenated and split; attention's qkv_proj segments
are q_proj, k_proj and v_proj; the MLP's up_proj segments gate_proj and up_proj (relu2: up_proj alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from megassm.model.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    """Where a transformers model keeps megassm's tensors."""

    embedding: str
    norm_f: str
    block: Callable[[int, str], tuple[str, str]]  # (block index, kind) -> (its norm weight's name, its mixer's prefix)


def _backbone_block(i: int, kind: str) -> tuple[str, str]:
    return f"backbone.layers.{i}.norm.weight", f"backbone.layers.{i}.mixer."


def _bamba_block(i: int, kind: str) -> tuple[str, str]:
    layer = f"model.layers.{i // 2}."
    if i % 2:
        return layer + "pre_ff_layernorm.weight", layer + "feed_forward."
    return layer + "input_layernorm.weight", layer + ("mamba." if kind == "M" else "self_attn.")


BACKBONE_LAYOUT = Layout("backbone.embeddings.weight", "backbone.norm_f.weight", _backbone_block)
BAMBA_LAYOUT = Layout("model.embed_tokens.weight", "model.final_layernorm.weight", _bamba_block)

# A mixer's tensors that map one to one, by kind: megassm name -> transformers name, both after the mixer's prefix.
_RENAMES = {
    "M": {"dt_bias": "dt_bias", "A_log": "A_log", "D": "D", "norm_weight": "norm.weight", "out_proj.weight": "out_proj.weight",
          "out_proj.bias": "out_proj.bias"},
    "*": {"qkv_proj.weight.q": "q_proj.weight", "qkv_proj.weight.k": "k_proj.weight", "qkv_proj.weight.v": "v_proj.weight",
          "o_proj.weight": "o_proj.weight"},
    "-": {"up_proj.weight.gate": "gate_proj.weight", "up_proj.weight.up": "up_proj.weight", "down_proj.weight": "down_proj.weight"},
}


def to_transformers(state: dict[str, Tensor], cfg: ModelConfig, layout: Layout) -> dict[str, Tensor]:
    """megassm Mamba2LM state dict -> the transformers model's, with lm_head.weight also when tied (the embedding)."""
    head = "embedding.weight" if cfg.tie_embeddings else "lm_head.weight"
    out = {layout.embedding: state["embedding.weight"], layout.norm_f: state["norm_f.weight"], "lm_head.weight": state[head]}
    for i, kind in enumerate(cfg.layer_kinds):
        norm, theirs = layout.block(i, kind)
        ours = f"layers.{i}.mixer."
        out[norm] = state[f"layers.{i}.norm.weight"]
        out.update({theirs + name: state[ours + mine] for mine, name in _RENAMES[kind].items() if ours + mine in state})
        if kind == "M":
            out.update(_fused_mamba(state, ours, theirs, cfg))
    return out


def from_transformers(hf_state: dict[str, Tensor], cfg: ModelConfig, layout: Layout) -> dict[str, Tensor]:
    """The transformers model's state dict -> megassm Mamba2LM's (lm_head.weight only when not tied)."""
    out = {"embedding.weight": hf_state[layout.embedding], "norm_f.weight": hf_state[layout.norm_f]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    for i, kind in enumerate(cfg.layer_kinds):
        norm, theirs = layout.block(i, kind)
        ours = f"layers.{i}.mixer."
        out[f"layers.{i}.norm.weight"] = hf_state[norm]
        out.update({ours + mine: hf_state[theirs + name] for mine, name in _RENAMES[kind].items() if theirs + name in hf_state})
        if kind == "M":
            out.update(_split_mamba(hf_state, theirs, ours, cfg))
    return out


def _fused_mamba(state: dict[str, Tensor], ours: str, theirs: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """A Mamba-2 mixer's in_proj and conv1d segments (megassm names after `ours`) as the fused tensors (after `theirs`)."""
    layout, out = cfg.mamba_layout(), {}
    for kind in ("weight", "bias"):
        if f"{ours}in_proj.{kind}.z" in state:
            out[f"{theirs}in_proj.{kind}"] = torch.cat([state[f"{ours}in_proj.{kind}.{s}"] for s in layout.in_proj_segments])
        if f"{ours}conv1d.{kind}.x" in state:
            fused = torch.cat([state[f"{ours}conv1d.{kind}.{s}"] for s in layout.conv_segments])
            out[f"{theirs}conv1d.{kind}"] = fused[:, None, :] if kind == "weight" else fused
    return out


def _split_mamba(hf_state: dict[str, Tensor], theirs: str, ours: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """The inverse of _fused_mamba: the fused in_proj and conv1d tensors cut into megassm's segments."""
    layout, out = cfg.mamba_layout(), {}
    for kind in ("weight", "bias"):
        if f"{theirs}in_proj.{kind}" in hf_state:
            out.update(_split(hf_state[f"{theirs}in_proj.{kind}"], layout.in_proj_segments, f"{ours}in_proj.{kind}."))
        if f"{theirs}conv1d.{kind}" in hf_state:
            fused = hf_state[f"{theirs}conv1d.{kind}"]
            out.update(_split(fused[:, 0, :] if kind == "weight" else fused, layout.conv_segments, f"{ours}conv1d.{kind}."))
    return out


def _split(fused: Tensor, segments: dict[str, int], prefix: str) -> dict[str, Tensor]:
    """A fused tensor cut into its segments along dim 0, named prefix + segment."""
    return {prefix + name: part for name, part in zip(segments, fused.split(list(segments.values())))}
