"""Constant-memory inference on one device (tp = cp = 1): a Mamba2LM continued one token at a time.

Each layer carries a state whose size does not depend on how many tokens came before: the last
d_conv - 1 pre-conv [x | B | C] rows (the conv's window) and the SSM state h (nheads x headdim x
d_state, fp32). A prompt goes through the chunked SSD scan, which also returns h; each further token
goes through the recurrence  h = exp(dt A) h + dt x B^T,  y = h C + D x. The weights are read from
the Mamba2LM's own modules, so training and inference share one copy of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm import ops
from megassm.model.lm import Mamba2LM
from megassm.model.mixer import Mamba2Mixer
from megassm.ops.dtypes import upcast
from megassm.ops.ssd import discretize_dt


@dataclass
class LayerState:
    conv: Tensor  # (batch, d_conv - 1, conv channels): the last pre-conv [x | B | C] rows
    ssm: Tensor  # (batch, nheads, headdim, d_state): fp32 (fp64 in a float64 model)


# scan(mixer, x, dt, A, B, C, ssm_state) -> (y, ssm_state after the last token); shapes as ops.ssd.
Scan = Callable[[Mamba2Mixer, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _empty_states(model: Mamba2LM, batch: int) -> list[LayerState]:
    """The states before a sequence's first token: zeros, on the model's device."""
    cfg, layout, weight = model.cfg, model.cfg.mamba_layout(), model.embedding.weight
    ssm_dtype = torch.promote_types(weight.dtype, torch.float32)
    return [
        LayerState(weight.new_zeros(batch, cfg.d_conv - 1, layout.conv_channels),
                   torch.zeros(batch, layout.nheads, layout.headdim, layout.d_state, dtype=ssm_dtype, device=weight.device))
        for _ in model.layers
    ]


def _chunked_scan(mixer: Mamba2Mixer, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Many tokens at once: the chunked SSD (Triton on CUDA) from `state`."""
    cfg = mixer.cfg
    return ops.ssd(x, dt, A, B, C, cfg.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_limit=cfg.dt_limit,
                   initial_states=state, return_final_states=True, backend=cfg.ssd_backend)


def _recurrent_scan(mixer: Mamba2Mixer, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token (x: (b, 1, h, p)) by the recurrence, in the state's precision: no chunk padding."""
    compute = state.dtype
    dt = discretize_dt(dt[:, 0], mixer.dt_bias, True, mixer.cfg.dt_limit).to(compute)  # (b, h)
    xs = x[:, 0].to(compute)  # (b, h, p)
    # Heads h of group g are h // (nheads // ngroups) == g, as in the chunked scan.
    heads_per_group = mixer.layout.nheads // mixer.layout.ngroups
    B, C = (t[:, 0].to(compute).repeat_interleave(heads_per_group, dim=1) for t in (B, C))  # (b, h, n)
    state = torch.exp(dt * A)[..., None, None] * state + (dt[..., None] * xs)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C) + mixer.D.to(compute)[:, None] * xs
    return y[:, None].to(x.dtype), state


def _mixer(mixer: Mamba2Mixer, u: Tensor, state: LayerState, scan: Scan) -> tuple[Tensor, LayerState]:
    """Mamba2Mixer.forward on u (b, l, d_model) continuing from `state`; also the state after u."""
    z, xBC, dt = mixer.layout.split_in_proj(mixer.in_proj(u))
    x, B, C = mixer.layout.split_conv(mixer.conv1d(xBC, halo=state.conv))  # the window's rows as the halo
    conv = torch.cat([state.conv.to(xBC.dtype), xBC], dim=1)[:, u.shape[1] :]
    y, ssm = scan(mixer, x, dt, mixer.A(), B, C, state.ssm)
    return mixer.out_proj(mixer.gated_norm(y, z, norm_backend="torch")), LayerState(conv, ssm)


def _advance(model: Mamba2LM, input_ids: Tensor, states: list[LayerState], scan: Scan) -> tuple[Tensor, list[LayerState]]:
    """Mamba2LM.forward on input_ids (b, l) continuing from `states`: logits after the last token, new states."""
    dtype = model.embedding.weight.dtype  # the layers' inputs: a bf16 model without autocast takes bf16
    h = upcast(model.embedding(input_ids))  # the residual stream is fp32
    after = []
    for layer, state in zip(model.layers, states, strict=True):
        out, state = _mixer(layer.mixer, layer.norm(h).to(dtype), state, scan)
        h = h + out
        after.append(state)
    head = model.embedding if model.lm_head is None else model.lm_head
    return F.linear(model.norm_f(h[:, -1]).to(dtype), head.weight), after


@torch.no_grad()
def prefill(model: Mamba2LM, input_ids: Tensor) -> tuple[Tensor, list[LayerState]]:
    """Run prompts (b, l >= 1) with the chunked scan: the logits (b, vocab) after their last token and
    the states to continue from."""
    if model.ctx.tp > 1 or model.ctx.cp > 1:
        raise ValueError(f"generation runs on one device, this model is split over tp = {model.ctx.tp}, cp = {model.ctx.cp}: "
                         "build it with the default ParallelContext() and load the checkpoint into it")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"prefill takes prompts shaped (batch, length >= 1), got {tuple(input_ids.shape)}")
    return _advance(model, input_ids, _empty_states(model, input_ids.shape[0]), _chunked_scan)


@torch.no_grad()
def step(model: Mamba2LM, token: Tensor, states: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
    """One more token per sequence, token (b,): its logits (b, vocab) and the states after it."""
    return _advance(model, token[:, None], states, _recurrent_scan)
