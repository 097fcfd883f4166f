"""ModelConfig: the architecture of a Mamba-2 language model, with the published presets. How it runs (kernels,
compile, activation checkpointing, CUDA graphs) is not architecture: megassm/model/apply.py sets it on a built model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megassm.ops import Mamba2Layout


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
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    init_std: float = 0.02

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
        """One symbol per block, naming its mixer (megassm/model/block.py, MIXERS): Mamba-2 ("M") in every block."""
        return "M" * self.n_layer

    def mamba_layout(self, tp: int = 1) -> Mamba2Layout:
        """The channels of a Mamba-2 mixer on one of tp ranks (tp = 1: the whole layer, as checkpoints hold it)."""
        return Mamba2Layout(nheads=self.nheads // tp, headdim=self.headdim, ngroups=self.ngroups // tp, d_state=self.d_state)

    def __post_init__(self) -> None:
        self.dt_limit = tuple(self.dt_limit)
        self.A_init_range = tuple(self.A_init_range)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first key whose value cannot make a model."""
        for key in ("d_model", "n_layer", "vocab_size", "d_state", "headdim", "expand", "ngroups", "d_conv", "chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {getattr(self, key)}")
        if self.d_inner % self.headdim:
            raise ValueError(f"model.headdim = {self.headdim} must divide expand * d_model = {self.d_inner}")
        if self.nheads % self.ngroups:
            raise ValueError(f"model.ngroups = {self.ngroups} must divide the number of heads {self.nheads}")
        if self.d_conv < 2:
            raise ValueError(f"model.d_conv must be at least 2, got {self.d_conv}")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"model.A_init_range = {self.A_init_range} must satisfy 0 < low <= high")

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise ValueError unless heads, groups and vocabulary split evenly over tp ranks."""
        for count, what in ((self.nheads, "heads (expand * d_model / headdim)"), (self.ngroups, "groups (model.ngroups)"),
                            (self.vocab_size, "vocabulary entries (model.vocab_size)")):
            if count % tp:
                raise ValueError(f"parallel.tp = {tp} must divide the model's {count} {what}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
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
}
