"""megassm: distributed pretraining of Mamba-2 language models."""

import os

from megassm.errors import quiet_interrupt_while_importing


def use_expandable_segments() -> None:
    """CUDA memory in segments that grow in place, unless the user set PYTORCH_CUDA_ALLOC_CONF. PyTorch reads the
    variable once, when CUDA initializes, which megassm's own start-up already does (the config checks load the
    Triton kernels, whose autotuning record is named after the GPU): hence at megassm's import. Why: a step near
    the GPU's capacity fits where fixed blocks fragment; on an H200 780m x 65,536 tokens trains in 137.1 GiB with
    them and runs out of memory with 3 GiB reserved but free without. Ignored on the CPU."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


use_expandable_segments()
quiet_interrupt_while_importing()
