"""State-dict and config mapping between megassm and Hugging Face `transformers` Mamba2ForCausalLM.

transformers keeps mamba-ssm's fused layout: one in_proj over [z | x | B | C | dt] and one conv1d
over [x | B | C] of shape (channels, 1, width). megassm keeps each segment as its own
parameter (parallel.ShardedSegments); here they are concatenated and split.

Note: transformers' PyTorch (no-kernel) path normalises the gated RMSNorm over all of d_inner,
while mamba-ssm, and transformers' own kernel path, normalise per group (d_inner / ngroups). The
two agree when ngroups = 1; megassm follows mamba-ssm.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from megassm.model.config import ModelConfig

IN_PROJ_SEGMENTS = ("z", "x", "B", "C", "dt")
CONV_SEGMENTS = ("x", "B", "C")


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The `transformers.Mamba2Config` fields describing `cfg`."""
    return {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "state_size": cfg.d_state,
        "head_dim": cfg.headdim,
        "num_heads": cfg.nheads,
        "expand": cfg.expand,
        "n_groups": cfg.ngroups,
        "conv_kernel": cfg.d_conv,
        "chunk_size": cfg.chunk_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "layer_norm_epsilon": cfg.norm_eps,
        "use_bias": cfg.proj_bias,
        "use_conv_bias": cfg.conv_bias,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "time_step_limit": list(cfg.dt_limit),
        "residual_in_fp32": True,
        "rescale_prenorm_residual": False,
    }


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a transformers Mamba2 `config.json` dictionary."""
    limit = hf.get("time_step_limit", (0.0, math.inf))
    return ModelConfig(
        d_model=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        d_state=hf["state_size"],
        headdim=hf["head_dim"],
        expand=hf["expand"],
        ngroups=hf["n_groups"],
        d_conv=hf["conv_kernel"],
        chunk_size=hf["chunk_size"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf["layer_norm_epsilon"],
        proj_bias=hf.get("use_bias", False),
        conv_bias=hf.get("use_conv_bias", True),
        dt_limit=(float(limit[0]), float(limit[1])),
        **overrides,
    )


def _segment_sizes(cfg: ModelConfig) -> dict[str, int]:
    gn = cfg.ngroups * cfg.d_state
    return {"z": cfg.d_inner, "x": cfg.d_inner, "B": gn, "C": gn, "dt": cfg.nheads}


# megassm name -> transformers name, for tensors that map one to one (layer index as {i}).
_RENAMES = {
    "embedding.weight": "backbone.embeddings.weight",
    "norm_f.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.norm.weight": "backbone.layers.{i}.norm.weight",
    "layers.{i}.mixer.dt_bias": "backbone.layers.{i}.mixer.dt_bias",
    "layers.{i}.mixer.A_log": "backbone.layers.{i}.mixer.A_log",
    "layers.{i}.mixer.D": "backbone.layers.{i}.mixer.D",
    "layers.{i}.mixer.norm_weight": "backbone.layers.{i}.mixer.norm.weight",
    "layers.{i}.mixer.out_proj.weight": "backbone.layers.{i}.mixer.out_proj.weight",
    "layers.{i}.mixer.out_proj.bias": "backbone.layers.{i}.mixer.out_proj.bias",
}


def to_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """megassm Mamba2LM state dict -> transformers Mamba2ForCausalLM state dict."""
    out = {}
    for i in range(cfg.n_layer):
        ours, theirs = f"layers.{i}.mixer.", f"backbone.layers.{i}.mixer."
        out[theirs + "in_proj.weight"] = torch.cat([state[f"{ours}in_proj.weight.{s}"] for s in IN_PROJ_SEGMENTS])
        if cfg.proj_bias:
            out[theirs + "in_proj.bias"] = torch.cat([state[f"{ours}in_proj.bias.{s}"] for s in IN_PROJ_SEGMENTS])
        out[theirs + "conv1d.weight"] = torch.cat([state[f"{ours}conv1d.weight.{s}"] for s in CONV_SEGMENTS])[:, None, :]
        if cfg.conv_bias:
            out[theirs + "conv1d.bias"] = torch.cat([state[f"{ours}conv1d.bias.{s}"] for s in CONV_SEGMENTS])
    for name, tensor in state.items():
        target = _rename(name, _RENAMES)
        if target is not None:
            out[target] = tensor
    if cfg.tie_embeddings:
        out["lm_head.weight"] = state["embedding.weight"]
    return out


def from_hf_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """transformers Mamba2ForCausalLM state dict -> megassm Mamba2LM state dict."""
    sizes = _segment_sizes(cfg)
    inverse = {theirs: ours for ours, theirs in _RENAMES.items()}
    out = {}
    for i in range(cfg.n_layer):
        ours, theirs = f"layers.{i}.mixer.", f"backbone.layers.{i}.mixer."
        for kind in ("weight", "bias"):
            if theirs + f"in_proj.{kind}" in hf_state:
                parts = hf_state[theirs + f"in_proj.{kind}"].split([sizes[s] for s in IN_PROJ_SEGMENTS])
                out.update({f"{ours}in_proj.{kind}.{s}": t for s, t in zip(IN_PROJ_SEGMENTS, parts)})
            if theirs + f"conv1d.{kind}" in hf_state:
                fused = hf_state[theirs + f"conv1d.{kind}"]
                fused = fused[:, 0, :] if kind == "weight" else fused
                parts = fused.split([sizes[s] for s in CONV_SEGMENTS])
                out.update({f"{ours}conv1d.{kind}.{s}": t for s, t in zip(CONV_SEGMENTS, parts)})
    for name, tensor in hf_state.items():
        target = _rename(name, inverse)
        if target is not None and not (cfg.tie_embeddings and target == "lm_head.weight"):
            out[target] = tensor
    return out


def _rename(name: str, table: dict[str, str]) -> str | None:
    match = re.fullmatch(r"(.*layers\.)(\d+)(\..*)", name)
    if match is None:
        return table.get(name)
    target = table.get(f"{match[1]}{{i}}{match[3]}")
    return None if target is None else target.replace("{i}", match[2])
