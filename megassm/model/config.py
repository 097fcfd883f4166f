"""ModelConfig: the architecture of a Mamba-2 language model or a hybrid of Mamba-2, attention and MLP blocks,
with the published presets. How it runs (kernels, compile, activation checkpointing, CUDA graphs) is not
architecture: megassm/model/apply.py sets it on a built model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megassm.ops import NO_DT_LIMIT, Mamba2Layout


# The layer kinds a pattern names; megassm/model/block.py's MIXERS builds each.
LAYER_KINDS = {"M": "Mamba-2", "*": "attention", "-": "MLP"}
MLP_SEGMENTS = {"swiglu": ("gate", "up"), "relu2": ("up",)}  # each MLP activation's pieces of up_proj


@dataclass
class ModelConfig:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50288
    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    ngroups: int = 1
    d_conv: int = 4
    chunk_size: int = 256
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = NO_DT_LIMIT
    A_init_range: tuple[float, float] = (1.0, 16.0)
    init_std: float = 0.02
    # Hybrids: one symbol per block (LAYER_KINDS), Megatron's hybrid pattern, e.g. "M-M*-"; empty: every block Mamba-2.
    pattern: str = ""
    attn_heads: int = 32  # query heads of the attention blocks ("*")
    attn_kv_heads: int = 8  # key/value heads (grouped-query attention): they divide attn_heads
    attn_head_dim: int = 128
    rope: bool = True  # rotary position embeddings on queries and keys
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # the part of each head's channels rotated (partial rotary: Bamba 0.5)
    mlp_hidden: int = 0  # the MLP blocks' ("-") intermediate size; required when the pattern has MLP blocks
    mlp_activation: str = "swiglu"  # "swiglu" (gate and up projections, as Llama and Bamba) | "relu2" (squared ReLU, as Nemotron-H)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def in_proj_width(self) -> int:
        """in_proj's output channels, [z | x | B | C | dt]: the mixer's widest activation."""
        return self.mamba_layout().in_proj_width

    @property
    def layer_kinds(self) -> str:
        """One symbol per block, naming its mixer (megassm/model/block.py, MIXERS): the pattern, else Mamba-2 ("M") in every block."""
        return self.pattern or "M" * self.n_layer

    @property
    def rope_dim(self) -> int:
        """Channels of each attention head that RoPE rotates (the first ones): 0 without RoPE."""
        return round(self.rope_fraction * self.attn_head_dim) if self.rope else 0

    def mamba_layout(self, tp: int = 1) -> Mamba2Layout:
        """The channels of a Mamba-2 mixer on one of tp ranks (tp = 1: the whole layer, as checkpoints hold it)."""
        return Mamba2Layout(nheads=self.nheads // tp, headdim=self.headdim, ngroups=self.ngroups // tp, d_state=self.d_state)

    def __post_init__(self) -> None:
        self.dt_limit = tuple(self.dt_limit)
        self.A_init_range = tuple(self.A_init_range)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first key whose value cannot make a model; the keys of a kind of block
        (Mamba-2, attention, MLP) only where the pattern has one."""
        self._check_positive("d_model", "n_layer", "vocab_size")
        if not 0 < self.norm_eps < math.inf:
            raise ValueError(f"model.norm_eps must be a positive number, got {self.norm_eps}")
        if not 0 <= self.init_std < math.inf:
            raise ValueError(f"model.init_std must be 0 or positive, got {self.init_std}")
        self._validate_pattern()
        for kind, check in (("M", self._validate_mamba), ("*", self._validate_attention), ("-", self._validate_mlp)):
            if kind in self.layer_kinds:
                check()

    def _check_positive(self, *keys: str) -> None:
        for key in keys:
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {getattr(self, key)}")

    def _validate_mamba(self) -> None:
        self._check_positive("d_state", "headdim", "expand", "ngroups", "d_conv", "chunk_size")
        if self.d_inner % self.headdim:
            raise ValueError(f"model.headdim = {self.headdim} must divide expand * d_model = {self.d_inner}")
        if self.nheads % self.ngroups:
            raise ValueError(f"model.ngroups = {self.ngroups} must divide the number of heads {self.nheads}")
        if self.d_conv < 2:
            raise ValueError(f"model.d_conv must be at least 2, got {self.d_conv}")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"model.A_init_range = {self.A_init_range} must satisfy 0 < low <= high")
        if not 0 < self.dt_min <= self.dt_max < math.inf:
            raise ValueError(f"model.dt_min = {self.dt_min} and model.dt_max = {self.dt_max} must satisfy 0 < dt_min <= dt_max")
        if not 0 < self.dt_init_floor < math.inf:
            raise ValueError(f"model.dt_init_floor must be a positive number, got {self.dt_init_floor}")
        if not 0 <= self.dt_limit[0] < self.dt_limit[1]:
            raise ValueError(f"model.dt_limit = {self.dt_limit} must satisfy 0 <= low < high (inf: no upper limit)")

    def _validate_pattern(self) -> None:
        if not self.pattern:
            return
        if len(self.pattern) != self.n_layer:
            raise ValueError(f"model.pattern has {len(self.pattern)} symbols but model.n_layer = {self.n_layer}: "
                             "give one symbol per block, or set model.n_layer to the pattern's length")
        unknown = sorted(set(self.pattern) - set(LAYER_KINDS))
        if unknown:
            kinds = ", ".join(f"{symbol!r} {name}" for symbol, name in LAYER_KINDS.items())
            raise ValueError(f"model.pattern = {self.pattern!r} has unknown symbols {', '.join(map(repr, unknown))}; "
                             f"the symbols are {kinds}")

    def _validate_attention(self) -> None:
        self._check_positive("attn_heads", "attn_kv_heads", "attn_head_dim")
        if self.attn_heads % self.attn_kv_heads:
            raise ValueError(f"model.attn_kv_heads = {self.attn_kv_heads} must divide model.attn_heads = {self.attn_heads}")
        if not self.rope:
            return
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta}")
        rotated = self.rope_fraction * self.attn_head_dim
        if not 0 < self.rope_fraction <= 1 or rotated != round(rotated) or round(rotated) % 2:
            raise ValueError(f"model.rope_fraction = {self.rope_fraction} must be in (0, 1] and rotate an even number of the "
                             f"model.attn_head_dim = {self.attn_head_dim} channels, got {rotated:g}")

    def _validate_mlp(self) -> None:
        if self.mlp_hidden < 1:
            raise ValueError(f"model.mlp_hidden must be a positive integer when model.pattern has MLP blocks ('-'), got {self.mlp_hidden}")
        if self.mlp_activation not in MLP_SEGMENTS:
            raise ValueError(f"model.mlp_activation = {self.mlp_activation!r}: choose one of {', '.join(MLP_SEGMENTS)}")

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise ValueError unless the heads, groups, MLP channels and vocabulary of the blocks the pattern uses split
        evenly over tp ranks (fewer key/value heads than tp are replicated: tp must be a multiple of them)."""
        kinds = self.layer_kinds
        counts = [(self.vocab_size, "vocabulary entries (model.vocab_size)")]
        if "M" in kinds:
            counts += [(self.nheads, "heads (expand * d_model / headdim)"),
                       (self.ngroups, "groups (model.ngroups: B and C are split by group; raise it to a multiple of parallel.tp, "
                                      "which widens in_proj, or lower parallel.tp)")]
        if "*" in kinds:
            counts.append((self.attn_heads, "attention heads (model.attn_heads)"))
        if "-" in kinds:
            counts.append((self.mlp_hidden, "MLP channels (model.mlp_hidden)"))
        for count, what in counts:
            if count % tp:
                raise ValueError(f"parallel.tp = {tp} must divide the model's {count} {what}")
        kv = self.attn_kv_heads
        if "*" in kinds and kv % tp and tp % kv:
            raise ValueError(f"parallel.tp = {tp} must divide the model's {kv} key/value heads (model.attn_kv_heads) "
                             "or be a multiple of them (each replicated over tp / attn_kv_heads ranks)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"model.preset = {name!r} is not one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# The published Mamba-2 language models (state-spaces/mamba2-*): vocabulary 50277 padded to 50288.
PRESETS: dict[str, ModelConfig] = {
    "mamba2-130m": ModelConfig(d_model=768, n_layer=24),
    "mamba2-370m": ModelConfig(d_model=1024, n_layer=48),
    "mamba2-780m": ModelConfig(d_model=1536, n_layer=48),
    "mamba2-1.3b": ModelConfig(d_model=2048, n_layer=48),
    "mamba2-2.7b": ModelConfig(d_model=2560, n_layer=64),
    # Tiny models for CPU tests and the quickstart. "debug" has 8 heads in 4 groups, so tp = 1, 2, 4 work.
    "debug": ModelConfig(d_model=64, n_layer=2, vocab_size=512, d_state=16, headdim=16, ngroups=4, chunk_size=16),
    "debug-g1": ModelConfig(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, ngroups=1, chunk_size=8),
    # A tiny hybrid: 3 Mamba-2, 2 attention (4 query heads sharing 2 key/value heads, half of each head rotated) and 3 MLP
    # blocks; tp = 1, 2, 4 work (tp = 4 replicates the key/value heads).
    "debug-hybrid": ModelConfig(d_model=64, n_layer=8, vocab_size=512, d_state=16, headdim=16, ngroups=4, chunk_size=16, pattern="M-M*-M*-",
                                attn_heads=4, attn_kv_heads=2, attn_head_dim=16, rope_fraction=0.5, mlp_hidden=128),
    # NVIDIA's Nemotron-H 8B (nvidia/Nemotron-H-8B-Base-8K): 24 Mamba-2, 4 attention (no position embedding), 24 squared-ReLU MLP blocks.
    "nemotron-h-8b": ModelConfig(d_model=4096, n_layer=52, vocab_size=131072, d_state=128, headdim=64, ngroups=8, chunk_size=128,
                                 tie_embeddings=False, pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                                 attn_heads=32, attn_kv_heads=8, attn_head_dim=128, rope=False, mlp_hidden=21504, mlp_activation="relu2"),
    # A ~1B hybrid for one GPU: 15 Mamba-2, 2 attention (RoPE) and 15 SwiGLU MLP blocks, the Mamba-2 groups as Megatron's (8: tp up to 8).
    "hybrid-1b": ModelConfig(d_model=2048, n_layer=32, ngroups=8, pattern="M-M-M-M-M-M*-M-M-M-M-M-M-M*-M-M-",
                             attn_heads=16, attn_kv_heads=8, attn_head_dim=128, mlp_hidden=5632),
}
