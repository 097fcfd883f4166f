"""Config mapping between megassm's hybrids and transformers' NemotronHForCausalLM and BambaForCausalLM (pure
functions on dictionaries; megassm/hf_tensors.py maps the tensors, megassm/pretrained.py reads and writes the folders).

NemotronH holds any pattern, one megassm block per layer (`layers_block_type`: "linear_attention" Mamba-2,
"full_attention", "mlp"), but its attention has no position embedding and its MLP is the squared ReLU: it
needs `rope = false` and `mlp_activation = "relu2"`. Its Mamba-2 clamps dt to `time_step_limit` (megassm's
`dt_limit`; transformers from 5.25, as NVIDIA's own code) and initialises from `time_step_min` (`dt_min`).
Bamba's decoder layer is a Mamba-2 or attention block followed by a SwiGLU MLP block: the pattern must be pairs
`M-` or `*-`; its attention rotates the first `partial_rotary_factor` of each head's channels (rotate-half, as
megassm's `rope_fraction`). Neither holds attention or MLP biases.
"""

from __future__ import annotations

from megassm.hf import require
from megassm.model.config import ModelConfig

NEMOTRON_H, BAMBA = "nemotron_h", "bamba"  # transformers' model_type
# NemotronH's layers_block_type entry of each megassm block kind.
_NEMOTRON_H_BLOCKS = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
# megassm field -> transformers field: the Mamba-2 blocks' in NemotronH, then in Bamba, then those both name alike.
_NEMOTRON_H_MAMBA = {"d_state": "ssm_state_size", "ngroups": "n_groups", "d_conv": "conv_kernel", "chunk_size": "chunk_size",
                     "headdim": "mamba_head_dim", "conv_bias": "use_conv_bias", "proj_bias": "use_bias"}
_BAMBA_MAMBA = {"d_state": "mamba_d_state", "ngroups": "mamba_n_groups", "d_conv": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
                "headdim": "mamba_d_head", "conv_bias": "mamba_conv_bias", "proj_bias": "mamba_proj_bias", "expand": "mamba_expand"}
_SHARED = {"d_model": "hidden_size", "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range",
           "attn_heads": "num_attention_heads", "attn_kv_heads": "num_key_value_heads", "attn_head_dim": "head_dim",
           "mlp_hidden": "intermediate_size"}
_NO_BIASES = {"attention_bias": False, "mlp_bias": False}


def _cache(cfg: ModelConfig) -> dict:
    """transformers' NemotronH and Bamba caches (5.25) need an attention layer: without one, model(ids) and generate()
    raise in get_mask_sizes. Such a folder says use_cache = false: each step then runs over the whole text."""
    return {} if "*" in cfg.layer_kinds else {"use_cache": False}


def _fit_problem(cfg: ModelConfig, model_type: str) -> str | None:
    """Why transformers' `model_type` cannot hold cfg's model, naming the keys to change; None if it can."""
    kinds = cfg.layer_kinds
    if model_type == NEMOTRON_H:
        if "*" in kinds and cfg.rope:
            return "model.rope = true, but NemotronH's attention has no position embedding (it needs model.rope = false)"
        if "-" in kinds and cfg.mlp_activation != "relu2":
            return f"model.mlp_activation = {cfg.mlp_activation!r}, but NemotronH's MLP is 'relu2'"
        return None
    if len(kinds) % 2 or set(kinds[::2]) - {"M", "*"} or set(kinds[1::2]) != {"-"}:
        return f"model.pattern = {cfg.pattern!r} is not pairs 'M-' or '*-', as Bamba's layers (Mamba-2 or attention, then an MLP)"
    if cfg.mlp_activation != "swiglu":
        return f"model.mlp_activation = {cfg.mlp_activation!r}, but Bamba's MLP is 'swiglu'"
    if "*" in kinds and not cfg.rope:
        return "model.rope = false, but Bamba's attention applies RoPE (it needs model.rope = true)"
    return None


def nemotron_h_config_dict(cfg: ModelConfig) -> dict:
    """The `transformers.NemotronHConfig` fields describing cfg; ValueError if NemotronH cannot hold it."""
    _require_fit(cfg, NEMOTRON_H)
    return {"model_type": NEMOTRON_H, "architectures": ["NemotronHForCausalLM"], **_fields(cfg, {**_SHARED, **_NEMOTRON_H_MAMBA}),
            "layers_block_type": [_NEMOTRON_H_BLOCKS[kind] for kind in cfg.layer_kinds], "mamba_num_heads": cfg.nheads,
            "expand": cfg.expand, "mamba_proj_bias": cfg.proj_bias, "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2",
            "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor,
            "time_step_limit": list(cfg.dt_limit), "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": True, **_NO_BIASES,
            **_cache(cfg)}


def model_config_from_nemotron_h(hf: dict) -> ModelConfig:
    """A ModelConfig from a transformers NemotronHConfig's fields (`NemotronHConfig.to_dict()`). Raises ValueError
    for a model megassm cannot represent."""
    require(hf, {"mamba_hidden_act": "silu", "num_nextn_predict_layers": 0, **_NO_BIASES})
    blocks = {name: kind for kind, name in _NEMOTRON_H_BLOCKS.items()}
    unknown = sorted(set(hf["layers_block_type"]) - set(blocks))
    if unknown:
        raise ValueError(f"layers_block_type has {', '.join(map(repr, unknown))}: megassm builds {', '.join(map(repr, blocks))} only")
    pattern = "".join(blocks[name] for name in hf["layers_block_type"])
    if "-" in pattern:
        require(hf, {"mlp_hidden_act": "relu2"})
    inner = hf["mamba_num_heads"] * hf["mamba_head_dim"]  # NemotronH's Mamba-2 width; its `expand` builds nothing
    if inner % hf["hidden_size"]:
        raise ValueError(f"mamba_num_heads * mamba_head_dim = {inner} must be a multiple of hidden_size = {hf['hidden_size']} "
                         "(megassm's Mamba-2 width is model.expand * model.d_model)")
    return _model_config(hf, {**_SHARED, **_NEMOTRON_H_MAMBA}, pattern=pattern, n_layer=len(pattern), expand=inner // hf["hidden_size"],
                         norm_eps=hf["layer_norm_epsilon"], dt_limit=tuple(hf["time_step_limit"]), dt_min=hf["time_step_min"],
                         dt_max=hf["time_step_max"], dt_init_floor=hf["time_step_floor"], rope=False, mlp_activation="relu2")


def bamba_config_dict(cfg: ModelConfig) -> dict:
    """The `transformers.BambaConfig` fields describing cfg; ValueError if Bamba cannot hold it."""
    _require_fit(cfg, BAMBA)
    return {"model_type": BAMBA, "architectures": ["BambaForCausalLM"], **_fields(cfg, {**_SHARED, **_BAMBA_MAMBA}),
            "num_hidden_layers": cfg.n_layer // 2, "attn_layer_indices": [i // 2 for i, kind in enumerate(cfg.layer_kinds) if kind == "*"],
            "mamba_n_heads": cfg.nheads, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "time_step_limit": list(cfg.dt_limit),
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rope_fraction},
            **_NO_BIASES, **_cache(cfg)}


def model_config_from_bamba(hf: dict) -> ModelConfig:
    """A ModelConfig from a transformers BambaConfig's fields (`BambaConfig.to_dict()`). Raises ValueError for a model
    megassm cannot represent."""
    require(hf, {"hidden_act": "silu", **_NO_BIASES})
    rope = hf["rope_parameters"]
    require(rope, {"rope_type": "default"}, "rope_parameters.")
    attention = set(hf["attn_layer_indices"] or ())
    pattern = "".join(("*" if layer in attention else "M") + "-" for layer in range(hf["num_hidden_layers"]))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]  # as BambaAttention reads it
    return _model_config({**hf, "head_dim": head_dim}, {**_SHARED, **_BAMBA_MAMBA}, pattern=pattern, n_layer=len(pattern),
                         norm_eps=hf["rms_norm_eps"], dt_limit=tuple(hf["time_step_limit"]), rope=True, rope_theta=rope["rope_theta"],
                         rope_fraction=rope.get("partial_rotary_factor", 1.0), mlp_activation="swiglu")


def _require_fit(cfg: ModelConfig, model_type: str) -> None:
    """ValueError naming what keeps `model_type` from holding cfg, and the other format if that one fits."""
    problem = _fit_problem(cfg, model_type)
    if problem is not None:
        other = BAMBA if model_type == NEMOTRON_H else NEMOTRON_H
        hint = f"export to {other} instead (it fits)" if _fit_problem(cfg, other) is None else f"{other} does not fit either"
        if not cfg.layer_kinds.strip("M"):
            hint = "export a model of Mamba-2 blocks only to mamba2"
        raise ValueError(f"transformers' {model_type} cannot hold this model: {problem}; {hint}")


def _fields(cfg: ModelConfig, names: dict[str, str]) -> dict:
    return {theirs: getattr(cfg, ours) for ours, theirs in names.items()}


def _model_config(hf: dict, names: dict[str, str], **fields) -> ModelConfig:
    """A ModelConfig of the `names` fields read from hf (megassm name -> theirs) and the other `fields`."""
    return ModelConfig(**{**{ours: hf[theirs] for ours, theirs in names.items()}, **fields})

