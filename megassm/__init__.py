"""megassm: distributed pretraining of Mamba-2 language models."""

import os


def use_expandable_segments() -> None:
    """CUDA memory in segments that grow in place, unless the user set PYTORCH_CUDA_ALLOC_CONF. PyTorch reads the
    variable once, when CUDA initializes, which megassm's own start-up already does (the config checks load the
    Triton kernels, whose autotuning record is named after the GPU): hence at megassm's import. Why: a step near
    the GPU's capacity fits where fixed blocks fragment; on an H200 780m x 65,536 tokens trains in 137.1 GiB with
    them and runs out of memory with 3 GiB reserved but free without. Ignored on the CPU."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")




def use_cublas_without_workspace() -> None:
    """cuBLAS's matmuls without a workspace, unless the user sized one (CUBLAS_WORKSPACE_CONFIG, or
    CUBLASLT_WORKSPACE_SIZE). Why: with one, cuBLAS 13 picks for the mixers' bf16 matmuls on an H200 kernels that
    need part of it zeroed first, a memset before each (192 per 780m step) with the GPU idle around it, also inside a
    CUDA graph (~1.5 ms of a 780m step); without one, kernels of the same tiles that need none: 0.4-0.8% more tokens/s
    at 780m, 1.3b and 32K (bench/RESULTS.md, run 19). PyTorch reads both at its first matmul. (Deterministic
    algorithms want CUBLAS_WORKSPACE_CONFIG=:4096:8: set it, and megassm leaves it.)"""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")


use_expandable_segments()
use_cublas_without_workspace()

__version__ = "0.1.0"
