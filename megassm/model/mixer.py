"""The Mamba-2 mixer (mamba_ssm.modules.mamba2.Mamba2 with norm_before_gate=False), single device."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megassm import ops
from megassm.model.config import ModelConfig
from megassm.model.segmented import SegmentedDepthwiseConv1d, SegmentedLinear
from megassm.ops.dtypes import upcast


def init_dt_bias(nheads: int, dt_min: float, dt_max: float, dt_init_floor: float) -> Tensor:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max], floored at dt_init_floor."""
    dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2Mixer(nn.Module):
    """u -> in_proj -> [z | xBC | dt] -> conv+silu -> SSD + D x -> norm(y * silu(z)) -> out_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d_inner, nheads, gn = cfg.d_inner, cfg.nheads, cfg.ngroups * cfg.d_state
        self.in_proj = SegmentedLinear(cfg.d_model, {"z": d_inner, "x": d_inner, "B": gn, "C": gn, "dt": nheads}, bias=cfg.proj_bias)
        self.conv1d = SegmentedDepthwiseConv1d({"x": d_inner, "B": gn, "C": gn}, cfg.d_conv, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(nheads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*cfg.A_init_range)))
        self.D = nn.Parameter(torch.ones(nheads))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.proj_bias)
        # mamba-ssm / GPT-2: residual-branch outputs scaled by 1/sqrt(number of residual layers).
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(cfg.n_layer)
            if self.out_proj.bias is not None:
                self.out_proj.bias.zero_()

    def forward(self, u: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        batch, seqlen, _ = u.shape
        d_inner, gn = cfg.d_inner, cfg.ngroups * cfg.d_state
        z, xBC, dt = self.in_proj(u).split([d_inner, d_inner + 2 * gn, cfg.nheads], dim=-1)
        x, B, C = self.conv1d(xBC, seq_idx=seq_idx).split([d_inner, gn, gn], dim=-1)
        y = ops.ssd(
            x.reshape(batch, seqlen, cfg.nheads, cfg.headdim),
            dt,
            -torch.exp(upcast(self.A_log)),
            B.reshape(batch, seqlen, cfg.ngroups, cfg.d_state),
            C.reshape(batch, seqlen, cfg.ngroups, cfg.d_state),
            cfg.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_limit=cfg.dt_limit,
            seq_idx=seq_idx,
            backend=cfg.ssd_backend,
        )
        y = ops.gated_rms_norm(y.reshape(batch, seqlen, d_inner), z, self.norm_weight, d_inner // cfg.ngroups, cfg.norm_eps, cfg.ssd_backend)
        return self.out_proj(y)
