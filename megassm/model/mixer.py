"""The Mamba-2 mixer (mamba_ssm.modules.mamba2.Mamba2, norm_before_gate=False).

It reads as single-device code; `ctx` makes it tensor- and context-parallel: in_proj is
column-parallel over its five segments and out_proj row-parallel (the layer's one collective),
each rank owning nheads/tp heads and ngroups/tp groups with their conv channels, A_log, D, dt_bias and
norm weights; under CP the conv takes its halo from the previous rank and the SSD adds the state
entering the rank's slice (megassm/model/context_parallel.py). On the Triton backend the conv, SSD and gated
norm run as one autograd step (megassm/ops/fused_mixer.py) with the same kernels, under CP (megassm's SSD kernels)
with the rank's communication inside.
In generation the mixer carries a Mamba2State from call to call: the conv continues from its window,
the SSD from its state (one token: the recurrence itself, megassm/ops/ssd.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megassm import ops
from megassm.model.config import ModelConfig
from megassm.model.context_parallel import add_incoming_state
from megassm.model.conv import CausalDepthwiseConv1d
from megassm.model.init import residual_output, uniform_fan_in
from megassm.ops.dtypes import upcast
from parallel import ColumnParallelLinear, ParallelContext, ParamRole, RowParallelLinear, declare_roles, send_to_next_rank, shard_parameter


def init_dt_bias(nheads: int, dt_min: float, dt_max: float, dt_init_floor: float) -> Tensor:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max], floored at dt_init_floor."""
    dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


@dataclass
class Mamba2State:
    """What a Mamba-2 layer carries from one call to the next in generation, the same size however many
    tokens came before."""

    conv: Tensor  # (b, d_conv - 1, conv channels): the last pre-conv [x | B | C] rows, the conv's window
    ssm: Tensor  # (b, H, P, N): the SSM state h, fp32 (fp64 in a float64 model)

    def window_after(self, xBC: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        """The conv's window once the pre-conv rows xBC (b, l, conv channels) of documents seq_idx (b, l) follow it:
        rows of an earlier document than the last token's are zeros, as the conv masks them (the window's own rows
        continue xBC's first document)."""
        window = torch.cat([self.conv.to(xBC.dtype), xBC], dim=1)[:, xBC.shape[1] :]
        if seq_idx is None:
            return window
        width = window.shape[1]
        ids = torch.cat([seq_idx[:, :1].expand(-1, width), seq_idx], dim=1)[:, -width:]
        return window * (ids == seq_idx[:, -1:]).unsqueeze(-1).to(window.dtype)


class Mamba2Mixer(nn.Module):
    """u -> in_proj -> [z | xBC | dt] -> conv + silu -> SSD + D x -> norm(y * silu(z)) -> out_proj."""

    backend = "auto"  # megassm.ops's kernels for the SSD and the gated norm (apply_kernels sets it)
    ssd_kernels = "megassm"  # the SSD's Triton kernels on the Triton backend: "megassm" or "mamba-ssm" (apply_kernels sets it)
    keep_ssd_states = False  # megassm's SSD keeps its per-chunk states for the backward (apply_ssd_state_keeping sets it)

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = ParallelContext()):
        super().__init__()
        cfg.check_tensor_parallel(ctx.tp)
        self.cfg, self.ctx = cfg, ctx
        self.layout = cfg.mamba_layout(ctx.tp)  # this rank's heads and groups
        whole = cfg.mamba_layout()  # every parameter is built whole, then split over TP
        self.in_proj = ColumnParallelLinear(
            {n: uniform_fan_in((size, cfg.d_model), cfg.d_model) for n, size in whole.in_proj_segments.items()}, ctx,
            biases={n: torch.zeros(size) for n, size in whole.in_proj_segments.items()} if cfg.proj_bias else None,
        )
        self.conv1d = CausalDepthwiseConv1d(whole.conv_segments, cfg.d_conv, cfg.conv_bias, ctx.tp_group)
        with_heads = ParamRole(tp_dim=0)  # split over TP with the heads
        self.dt_bias = shard_parameter(init_dt_bias(whole.nheads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), with_heads, ctx.tp_group)
        self.A_log = shard_parameter(torch.log(torch.empty(whole.nheads).uniform_(*cfg.A_init_range)), with_heads, ctx.tp_group)
        self.D = shard_parameter(torch.ones(whole.nheads), with_heads, ctx.tp_group)
        self.norm_weight = shard_parameter(torch.ones(whole.d_inner), with_heads, ctx.tp_group)
        declare_roles(self, **dict.fromkeys(("dt_bias", "A_log", "D", "norm_weight"), with_heads))
        self.out_proj = RowParallelLinear(residual_output(cfg.d_model, whole.d_inner, cfg.n_layer), ctx,
                                          bias=torch.zeros(cfg.d_model) if cfg.proj_bias else None)

    def forward(self, u: Tensor, seq_idx: Tensor | None = None, halo_seq_idx: Tensor | None = None,
                state: Mamba2State | None = None) -> Tensor | tuple[Tensor, Mamba2State]:
        """u: (b, l, d_model), or (b, l/tp, d_model) under sequence parallelism. seq_idx: (b, l)
        document ids; halo_seq_idx: those of the previous CP rank's last d_conv-1 tokens.
        Given `state` (generation: `empty_state`, or the state a previous call returned), u continues the
        sequences it holds, and the output comes with the state after u."""
        cfg, layout = self.cfg, self.layout
        zxbcdt = self.in_proj(u)
        cp = self.ctx.cp
        if state is None and (cp == 1 or self.ssd_kernels == "megassm") and ops.resolve_backend(self.backend, u.device) == "triton":
            # The same kernels as below, but one gradient buffer for zxbcdt instead of split-and-concatenate, and under CP
            # the incoming state walked through the chunks instead of added afterwards.
            conv_bias = None if self.conv1d.bias is None else self.conv1d.bias.fused()
            y = ops.conv_ssd_gated_norm(zxbcdt, self.conv1d.weight.fused(), conv_bias, self.dt_bias, self.A(), self.D,
                                        self.norm_weight, layout, cfg.chunk_size, cfg.dt_limit, cfg.norm_eps, seq_idx,
                                        self.ssd_kernels, self.keep_ssd_states, self.ctx.cp_group if cp > 1 else None, halo_seq_idx)
            return self.out_proj(y)
        z, xBC, dt = layout.split_in_proj(zxbcdt)
        x, B, C = layout.split_conv(self.conv1d(xBC, self._halo(xBC, state), seq_idx, halo_seq_idx))
        A = self.A()
        y = ops.ssd(
            x, dt, A, B, C, cfg.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_limit=cfg.dt_limit, seq_idx=seq_idx,
            initial_states=None if state is None else state.ssm, return_final_states=state is not None or self.ctx.cp > 1,
            backend=self.backend, kernels=self.ssd_kernels,
        )
        if state is not None:
            y, ssm = y
            return self.out_proj(self.gated_norm(y, z)), Mamba2State(state.window_after(xBC, seq_idx), ssm)
        if self.ctx.cp > 1:
            y, final_state = y
            y = add_incoming_state(y, final_state, dt, A, C, self.dt_bias, cfg.dt_limit, seq_idx, halo_seq_idx, self.ctx.cp_group)
        return self.out_proj(self.gated_norm(y, z))

    def empty_state(self, batch: int) -> Mamba2State:
        """The state before a sequence's first token: zeros, on the parameters' device."""
        layout, like = self.layout, self.D
        ssm_dtype = torch.promote_types(like.dtype, torch.float32)
        return Mamba2State(like.new_zeros(batch, self.cfg.d_conv - 1, layout.conv_channels),
                           like.new_zeros(batch, layout.nheads, layout.headdim, layout.d_state, dtype=ssm_dtype))

    def A(self) -> Tensor:
        """The per-head decay rates, negative, fp32."""
        return -torch.exp(upcast(self.A_log))

    def _halo(self, xBC: Tensor, state: Mamba2State | None) -> Tensor | None:
        """The d_conv-1 pre-conv rows before xBC: the state's window, the previous CP rank's last rows, or none (zeros)."""
        if state is not None:
            return state.conv
        if self.ctx.cp > 1:
            return send_to_next_rank(xBC[:, xBC.shape[1] - (self.cfg.d_conv - 1) :], self.ctx.cp_group)
        return None

    def gated_norm(self, y: Tensor, z: Tensor) -> Tensor:
        """norm(y * silu(z)) per group of d_inner / ngroups channels, (b, l, d_inner). y: (b, l, H, P)."""
        cfg = self.cfg
        return ops.gated_rms_norm(y.flatten(-2), z, self.norm_weight, self.layout.group_size, cfg.norm_eps, self.backend)
