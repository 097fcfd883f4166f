"""How a built model runs, applied to it after construction (torchtitan's apply_ac / apply_compile):
kernels and compile, activation checkpointing, kept SSD states, CUDA graphs, the loss's chunk size. None of it is
architecture: it is not in ModelConfig, not in checkpoints, and a model built without these calls
runs the default path (kernels chosen by device, nothing compiled, nothing recomputed).
"""

from __future__ import annotations

from torch import nn

from megassm.model.lm import Mamba2LM
from megassm.ops import BACKENDS, SSD_KERNELS
from parallel import RowParallelLinear


def apply_kernels(model: nn.Module, backend: str = "auto", compile: bool = False, ssd: str = "megassm") -> None:
    """Every module that chooses kernels gets `backend` ("auto": Triton on CUDA, "torch": the PyTorch
    references, "triton") and, on the Triton backend, its SSD's kernels `ssd` ("megassm" or "mamba-ssm");
    every module with a compilable step gets `torch_compile = compile` (it compiles on CUDA only)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: choose one of {', '.join(BACKENDS)}")
    if ssd not in SSD_KERNELS:
        raise ValueError(f"ssd = {ssd!r}: choose one of {', '.join(SSD_KERNELS)}")
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
        if hasattr(module, "ssd_kernels"):
            module.ssd_kernels = ssd
        if hasattr(module, "torch_compile"):
            module.torch_compile = compile


def apply_activation_checkpointing(model: Mamba2LM, blocks: int | None = None) -> None:
    """The first `blocks` blocks (all: None) keep only their input and recompute the rest in backward: less memory, one
    more forward of each (but for their last matmuls, which multiply with F.linear for that: RowParallelLinear.forward).
    The first ones: each is recomputed after the later blocks' tensors are freed, so it adds nothing to the peak."""
    for layer in model.layers[:blocks]:
        layer.recompute = True
        for module in layer.modules():
            if isinstance(module, RowParallelLinear):
                module.builtin_matmul = True


def apply_ssd_state_keeping(model: nn.Module) -> None:
    """megassm's SSD keeps its per-chunk states for the backward (more memory, one pass over x and B per layer less)."""
    for module in model.modules():
        if hasattr(module, "keep_ssd_states"):
            module.keep_ssd_states = True


def apply_cuda_graphs(model: Mamba2LM, groups: int = 1) -> None:
    """Replay the blocks' forward and backward as CUDA graphs (between their collectives under TP, SP and CP),
    captured on the first training step on CUDA, in `groups` groups of consecutive blocks: a group's parameters get
    their gradients when its backward is done, for DDP to sum while the earlier groups' backward runs."""
    if groups < 1:
        raise ValueError(f"CUDA graphs need at least one group of blocks, got {groups}")
    model.cuda_graphs, model.cuda_graph_groups = True, groups


def apply_loss_chunking(model: Mamba2LM, tokens: int) -> None:
    """The loss holds the logits of `tokens` tokens at a time (fewer: less memory, more kernel launches)."""
    if tokens < 1:
        raise ValueError(f"the loss's chunk must hold at least one token, got {tokens}")
    model.loss_chunk_tokens = tokens
