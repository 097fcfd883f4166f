from megassm.model.apply import (apply_activation_checkpointing, apply_cuda_graphs, apply_kernels, apply_loss_chunking,
                                 apply_ssd_state_keeping)
from megassm.model.attention import Attention, KVCache
from megassm.model.block import MIXERS, Block, RMSNorm
from megassm.model.config import PRESETS, ModelConfig
from megassm.model.lm import Mamba2LM
from megassm.model.mixer import Mamba2Mixer, Mamba2State
from megassm.model.mlp import MLP

__all__ = ["MIXERS", "MLP", "PRESETS", "Attention", "Block", "KVCache", "Mamba2LM", "Mamba2Mixer", "Mamba2State", "ModelConfig",
           "RMSNorm", "apply_activation_checkpointing", "apply_cuda_graphs", "apply_kernels", "apply_loss_chunking",
           "apply_ssd_state_keeping"]
