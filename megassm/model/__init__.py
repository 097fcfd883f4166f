from megassm.model.apply import apply_activation_checkpointing, apply_cuda_graphs, apply_kernels, apply_loss_chunking
from megassm.model.block import MIXERS, Block, RMSNorm
from megassm.model.config import PRESETS, ModelConfig
from megassm.model.lm import Mamba2LM
from megassm.model.mixer import Mamba2Mixer, Mamba2State

__all__ = ["MIXERS", "PRESETS", "Block", "Mamba2LM", "Mamba2Mixer", "Mamba2State", "ModelConfig", "RMSNorm",
           "apply_activation_checkpointing", "apply_cuda_graphs", "apply_kernels", "apply_loss_chunking"]
