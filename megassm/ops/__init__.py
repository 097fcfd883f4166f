"""The mixer's numerical kernels, each with a pure-PyTorch reference and, on CUDA, Triton kernels
(megassm's SSD, conv1d and gated RMSNorm backward; mamba-ssm's gated RMSNorm forward, and its SSD with
kernels.ssd = "mamba-ssm"). `backend`: "torch" (the reference, anywhere),
"triton" (CUDA + mamba-ssm, or an error), or "auto" (the reference on CPU, Triton on CUDA: an error
there when the kernels do not load, rather than a silent fall back to a path many times slower).
The plain-PyTorch pieces with no Triton kernel of their own (RMSNorm, the loss's softmax, and the
conv1d on the "torch" backend) run through torch.compile on CUDA (`maybe_compiled`), which fuses
each into a few kernels."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from megassm.ops.conv import causal_conv1d
from megassm.ops.layout import Mamba2Layout
from megassm.ops.mamba_triton import TRITON_MAX_ELEMENTS, KernelsUnavailable, load_triton_kernels
from megassm.ops.norm import gated_rms_norm as gated_rms_norm_reference
from megassm.ops.norm import add_rms_norm, rms_norm
from megassm.ops.ssd import NO_DT_LIMIT, ssd_chunked, ssd_step
from parallel.compiled import maybe_compiled

BACKENDS = ("auto", "torch", "triton")
SSD_KERNELS = ("megassm", "mamba-ssm")  # the SSD's Triton kernels: megassm's (megassm/ops/ssd_triton.py) or mamba-ssm's

__all__ = ["BACKENDS", "NO_DT_LIMIT", "SSD_KERNELS", "TRITON_MAX_ELEMENTS", "KernelsUnavailable", "Mamba2Layout", "add_rms_norm",
           "causal_conv1d", "causal_conv1d_silu", "conv_ssd_gated_norm", "gated_rms_norm", "int32_document_ids", "maybe_compiled",
           "resolve_backend", "rms_norm", "ssd"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """"torch" or "triton" for tensors on `device`; KernelsUnavailable, saying what to install or set, where
    the chosen backend cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if device.type != "cuda":
        if backend == "triton":
            raise KernelsUnavailable(
                f"backend = 'triton' needs CUDA tensors, these are on {device.type}: use 'auto' or 'torch'"
            )
        return "torch"
    try:
        load_triton_kernels()
    except KernelsUnavailable as error:
        raise KernelsUnavailable(f"backend = {backend!r} on CUDA needs the Triton kernels: {error}; or choose the backend 'torch' "
                                 "(the PyTorch reference, many times slower)") from None
    return "triton"


def int32_document_ids(seq_idx: Tensor) -> Tensor:
    """seq_idx as the kernels take them: int32 and contiguous, the ids' low 31 bits. Only equality matters, which those
    keep within any row of fewer than 2^31 documents (global document numbers may not fit int32), and every CP rank
    converts its slice of a row alike (attention compares ids across ranks). The model converts once per pass, so that
    its layers' kernels convert nothing."""
    return (seq_idx & (2**31 - 1)).to(torch.int32).contiguous()


def _kernel_seq_idx(seq_idx: Tensor | None, initial_states: Tensor | None = None) -> Tensor | None:
    """Document ids as the SSD kernels take them: int32 ids as they are, others by int32_document_ids; counted from each row's
    first token where initial_states are given: mamba-ssm's kernels give those to document 0."""
    if seq_idx is None:
        return None
    if initial_states is not None:
        seq_idx = seq_idx - seq_idx[:, :1]
    return seq_idx.contiguous() if seq_idx.dtype == torch.int32 else int32_document_ids(seq_idx)


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
    kernels: str = "megassm",
) -> Tensor | tuple[Tensor, Tensor]:
    """SSD scan, shapes and conventions of megassm.ops.ssd.ssd_chunked, on the chosen backend (on Triton, by the
    `kernels` of SSD_KERNELS); one token continuing initial_states (a generation step) by the recurrence, on any backend."""
    if initial_states is not None and return_final_states and x.shape[1] == 1:
        return ssd_step(x, dt, A, B, C, initial_states, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    if resolve_backend(backend, x.device) == "torch":
        return ssd_chunked(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
            initial_states=initial_states, seq_idx=seq_idx, return_final_states=return_final_states,
        )
    if kernels == "megassm":
        from megassm.ops.ssd_triton import ssd_triton  # imports triton: only where it runs

        scan = ssd_triton
    else:
        scan = load_triton_kernels().mamba_chunk_scan_combined
    return scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                seq_idx=_kernel_seq_idx(seq_idx, initial_states), dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
                return_final_states=return_final_states)


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None, halo: Tensor | None = None, seq_idx: Tensor | None = None,
                       halo_seq_idx: Tensor | None = None, backend: str = "auto", compile: bool = False) -> Tensor:
    """causal_conv1d(..., activation="silu") on the chosen backend: megassm's Triton kernels
    (megassm/ops/conv_triton.py), else the PyTorch reference (compiled on CUDA if asked)."""
    if resolve_backend(backend, x.device) == "triton":
        from megassm.ops.conv_triton import causal_conv1d_silu as conv_triton  # imports triton: only where it runs

        return conv_triton(x, weight, bias, seq_idx, halo, halo_seq_idx)
    conv = maybe_compiled(causal_conv1d, compile, x.device)
    return conv(x, weight, bias, halo=halo, seq_idx=seq_idx, halo_seq_idx=halo_seq_idx, activation="silu")


def conv_ssd_gated_norm(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
                        norm_weight: Tensor, layout: Mamba2Layout, chunk_size: int, dt_limit: tuple[float, float], eps: float,
                        seq_idx: Tensor | None = None, ssd_kernels: str = "megassm", keep_ssd_states: bool = False,
                        cp_group: ProcessGroup | None = None, halo_seq_idx: Tensor | None = None) -> Tensor:
    """The mixer from in_proj's output to the gated norm's, fused for the Triton backend only
    (megassm/ops/fused_mixer.py: one gradient buffer instead of split-and-concatenate). cp_group: zxbcdt is this
    rank's slice of the sequences (context parallelism: megassm's SSD kernels only), halo_seq_idx the document ids
    of the previous rank's last d_conv - 1 tokens."""
    from megassm.ops.fused_mixer import RankSlice  # imports triton: only where it runs
    from megassm.ops.fused_mixer import conv_ssd_gated_norm as fused

    rank_slice = None if cp_group is None else RankSlice(cp_group, _kernel_seq_idx(halo_seq_idx))
    return fused(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, layout, chunk_size, dt_limit, eps, _kernel_seq_idx(seq_idx),
                 ssd_kernels, keep_ssd_states, rank_slice)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float, backend: str = "auto") -> Tensor:
    """norm(x * silu(z)) * weight per group of `group_size` channels, on the chosen backend."""
    if resolve_backend(backend, x.device) == "torch":
        return gated_rms_norm_reference(x, z, weight, group_size, eps)
    return load_triton_kernels().rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
