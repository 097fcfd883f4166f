from megassm.model.config import PRESETS, ModelConfig
from megassm.model.lm import Block, Mamba2LM, RMSNorm
from megassm.model.mixer import Mamba2Mixer

__all__ = ["PRESETS", "Block", "Mamba2LM", "Mamba2Mixer", "ModelConfig", "RMSNorm"]
