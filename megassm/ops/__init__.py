"""The mixer's numerical kernels, each with a pure-PyTorch reference and, on CUDA, mamba-ssm's Triton
kernels. `backend`: "torch" (the reference, anywhere), "triton" (CUDA + mamba-ssm, or an error), or
"auto" (Triton when the tensors are on CUDA and the kernels load, the reference otherwise)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from megassm.ops.conv import causal_conv1d
from megassm.ops.mamba_triton import KernelsUnavailable, load_triton_kernels
from megassm.ops.norm import gated_rms_norm as gated_rms_norm_reference
from megassm.ops.norm import rms_norm
from megassm.ops.ssd import NO_DT_LIMIT, ssd_chunked

BACKENDS = ("auto", "torch", "triton")

__all__ = ["BACKENDS", "KernelsUnavailable", "causal_conv1d", "gated_rms_norm", "resolve_backend", "rms_norm", "ssd"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """"torch" or "triton" for tensors on `device`; a clear error where "triton" cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"ssd_backend = {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if device.type != "cuda":
        if backend == "triton":
            raise KernelsUnavailable(
                f"ssd_backend = 'triton' needs CUDA tensors, these are on {device.type}: use 'auto' or 'torch'"
            )
        return "torch"
    try:
        load_triton_kernels()
    except KernelsUnavailable as error:
        if backend == "triton":
            raise
        warnings.warn(f"ssd_backend = 'auto' falls back to the PyTorch reference: {error}", stacklevel=3)
        return "torch"
    return "triton"


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """SSD scan, shapes and conventions of megassm.ops.ssd.ssd_chunked, on the chosen backend."""
    if resolve_backend(backend, x.device) == "torch":
        return ssd_chunked(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
            initial_states=initial_states, seq_idx=seq_idx, return_final_states=return_final_states,
        )
    if seq_idx is not None:
        # The kernels give initial_states to document id 0: make the first token's document id 0.
        seq_idx = (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
    return load_triton_kernels().mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
        dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=return_final_states,
    )


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float, backend: str = "auto") -> Tensor:
    """norm(x * silu(z)) * weight per group of `group_size` channels, on the chosen backend."""
    if resolve_backend(backend, x.device) == "torch":
        return gated_rms_norm_reference(x, z, weight, group_size, eps)
    return load_triton_kernels().rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
