"""Config and state-dict mapping between megassm and the two published Mamba-2 formats: Hugging Face
`transformers` Mamba2ForCausalLM and state-spaces' mamba-ssm MambaLMHeadModel (pure functions on
dictionaries; megassm/pretrained.py reads and writes the folders, megassm/hf_tensors.py maps the tensors).

Both formats keep mamba-ssm's fused in_proj and conv1d. The two formats' tensor names differ only in the
embedding (`backbone.embeddings.weight` in transformers, `backbone.embedding.weight` in mamba-ssm);
mamba-ssm's state dict holds `lm_head.weight` also when it is tied to the embedding.

Note: megassm, mamba-ssm and transformers' kernel path normalise the gated RMSNorm per group
(d_inner / ngroups). transformers 5.24's PyTorch path does too; older versions' normalised over all
of d_inner, which agrees only when ngroups = 1.
"""

from __future__ import annotations

import copy
import math

from torch import Tensor

from megassm.hf_tensors import BACKBONE_LAYOUT, from_transformers, to_transformers
from megassm.model.config import ModelConfig

# transformers Mamba2Config field -> ModelConfig field.
_HF_FIELDS = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size", "state_size": "d_state", "head_dim": "headdim",
    "expand": "expand", "n_groups": "ngroups", "conv_kernel": "d_conv", "chunk_size": "chunk_size", "tie_word_embeddings": "tie_embeddings",
    "layer_norm_epsilon": "norm_eps", "use_bias": "proj_bias", "use_conv_bias": "conv_bias", "time_step_min": "dt_min",
    "time_step_max": "dt_max", "time_step_floor": "dt_init_floor", "time_step_limit": "dt_limit", "initializer_range": "init_std",
}


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The `transformers.Mamba2Config` fields describing `cfg`."""
    _require_mamba_only(cfg)
    fields = {theirs: getattr(cfg, ours) for theirs, ours in _HF_FIELDS.items()}
    return {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], **fields, "time_step_limit": list(cfg.dt_limit),
            "num_heads": cfg.nheads, "residual_in_fp32": True, "rescale_prenorm_residual": False}


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a transformers Mamba2Config's fields (`Mamba2Config.to_dict()`, which fills in the defaults
    that a `config.json` may leave out). Raises ValueError for a model megassm cannot represent."""
    require(hf, {"hidden_act": "silu"})
    if hf["num_heads"] * hf["head_dim"] != hf["expand"] * hf["hidden_size"]:
        raise ValueError(f"num_heads * head_dim = {hf['num_heads']} * {hf['head_dim']} must equal "
                         f"expand * hidden_size = {hf['expand']} * {hf['hidden_size']}")
    return ModelConfig(**{ours: hf[theirs] for theirs, ours in _HF_FIELDS.items()})


def to_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """megassm Mamba2LM state dict -> transformers Mamba2ForCausalLM state dict."""
    return to_transformers(state, cfg, BACKBONE_LAYOUT)


def from_hf_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """transformers Mamba2ForCausalLM state dict -> megassm Mamba2LM state dict."""
    return from_transformers(hf_state, cfg, BACKBONE_LAYOUT)


def to_mamba_ssm_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """megassm Mamba2LM state dict -> mamba-ssm MambaLMHeadModel state dict (with lm_head.weight, tied or not)."""
    return {_HF_TO_MAMBA_SSM.get(name, name): tensor for name, tensor in to_hf_state_dict(state, cfg).items()}


def from_mamba_ssm_state_dict(ssm_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """mamba-ssm MambaLMHeadModel state dict -> megassm Mamba2LM state dict."""
    mamba_ssm_to_hf = {theirs: ours for ours, theirs in _HF_TO_MAMBA_SSM.items()}
    return from_hf_state_dict({mamba_ssm_to_hf.get(name, name): tensor for name, tensor in ssm_state.items()}, cfg)


_HF_TO_MAMBA_SSM = {"backbone.embeddings.weight": "backbone.embedding.weight"}

# mamba-ssm fixes every norm's epsilon (MixerModel's norm_epsilon, Mamba2's gated norm) at 1e-5: MambaConfig has no field for it.
MAMBA_SSM_NORM_EPS = 1e-5
# mamba_ssm.modules.mamba2.Mamba2's defaults for the ssm_cfg keys that are ModelConfig fields.
MAMBA2_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256, "A_init_range": (1.0, 16.0),
                   "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "dt_limit": (0.0, math.inf), "bias": False, "conv_bias": True}
_SSM_CFG_FIELDS = {"bias": "proj_bias"}  # ssm_cfg key -> ModelConfig field, where the names differ
# Values megassm's architecture implies (mamba-ssm's defaults): a Mamba2 mixer per block, no MLP, no attention, RMSNorm,
# the gated norm after the gate, D per head, the SSM over all of d_inner.
_MAMBA_SSM_FIXED = {"d_intermediate": 0, "attn_layer_idx": [], "rms_norm": True}
_MAMBA2_FIXED = {"layer": "Mamba2", "d_ssm": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False}
_MAMBA2_IGNORED = {"conv_init", "use_mem_eff_path"}  # initialisation and kernel choice: no effect on trained weights
# Also ignored: residual_in_fp32 (megassm's residual stream is always fp32) and fused_add_norm (a kernel choice).


def mamba_ssm_config_dict(cfg: ModelConfig) -> dict:
    """mamba-ssm's `config.json` (MambaConfig's fields) for `cfg`; ssm_cfg names only what differs from Mamba2's
    defaults, as the published configs do. Raises ValueError if mamba-ssm cannot express cfg."""
    _require_mamba_only(cfg)
    if cfg.norm_eps != MAMBA_SSM_NORM_EPS:
        raise ValueError(f"model.norm_eps = {cfg.norm_eps}: mamba-ssm fixes it at {MAMBA_SSM_NORM_EPS}; export to transformers instead")
    ssm_cfg = {"layer": _MAMBA2_FIXED["layer"]}  # the other fixed settings are mamba-ssm's Mamba2 defaults
    for key, default in MAMBA2_DEFAULTS.items():
        value = getattr(cfg, _SSM_CFG_FIELDS.get(key, key))
        if value != default:
            ssm_cfg[key] = list(value) if isinstance(value, tuple) else value
    return {
        **copy.deepcopy(_MAMBA_SSM_FIXED), "d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size, "ssm_cfg": ssm_cfg,
        "attn_cfg": {}, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 1,  # vocab_size is already the embedding's row count
        "tie_embeddings": cfg.tie_embeddings,
    }


def model_config_from_mamba_ssm(config: dict) -> ModelConfig:
    """A ModelConfig from a mamba-ssm `config.json` dictionary (defaults as MambaConfig's and Mamba2's). Raises
    ValueError for a model megassm cannot represent and KeyError for a missing field."""
    require(config, _MAMBA_SSM_FIXED)
    ssm_cfg = {"layer": "Mamba1", **config.get("ssm_cfg", {})}  # mamba-ssm's default layer is Mamba-1
    require(ssm_cfg, _MAMBA2_FIXED, "ssm_cfg.")
    unknown = set(ssm_cfg) - set(MAMBA2_DEFAULTS) - set(_MAMBA2_FIXED) - _MAMBA2_IGNORED
    if unknown:
        raise ValueError(f"ssm_cfg.{sorted(unknown)[0]} is not a Mamba2 setting megassm knows")
    ssm = {_SSM_CFG_FIELDS.get(key, key): ssm_cfg.get(key, default) for key, default in MAMBA2_DEFAULTS.items()}
    multiple = config.get("pad_vocab_size_multiple", 8)
    return ModelConfig(
        d_model=config["d_model"],
        n_layer=config["n_layer"],
        vocab_size=-(-config["vocab_size"] // multiple) * multiple,  # mamba-ssm pads the embedding to the multiple
        tie_embeddings=config.get("tie_embeddings", True),
        norm_eps=MAMBA_SSM_NORM_EPS,
        **ssm,
    )


def require(config: dict, fixed: dict, prefix: str = "") -> None:
    """ValueError unless each key of `fixed` is absent from config or has the value megassm's architecture implies."""
    for key, value in fixed.items():
        if config.get(key, value) != value:
            raise ValueError(f"{prefix}{key} = {config[key]!r} is not supported (megassm's model has {value!r})")


def _require_mamba_only(cfg: ModelConfig) -> None:
    """ValueError for a hybrid: both formats hold Mamba-2 blocks only."""
    if cfg.layer_kinds.strip("M"):
        raise ValueError(f"model.pattern = {cfg.pattern!r} has attention or MLP blocks: the transformers Mamba2 and mamba-ssm "
                         "formats hold Mamba-2 blocks only; transformers' NemotronH or Bamba holds a hybrid")
