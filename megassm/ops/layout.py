"""Mamba2Layout: the channels of a Mamba-2 mixer, whole or one TP rank's share.

in_proj's output is [z | x | B | C | dt] and the conv runs over [x | B | C]; the model builds its
parameters from these segment sizes, the kernels split activations with them, the converters cut
mamba-ssm's fused tensors with them and the FLOP count multiplies them. `ModelConfig.mamba_layout(tp)`
makes one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Mamba2Layout:
    nheads: int  # H: heads (of this rank, under TP)
    headdim: int  # P: channels per head
    ngroups: int  # G: groups of heads sharing B and C (of this rank, under TP)
    d_state: int  # N: the state size per channel

    @property
    def d_inner(self) -> int:
        """Channels of x, z and the SSD's output: H * P."""
        return self.nheads * self.headdim

    @property
    def group_size(self) -> int:
        """Channels of d_inner per group: the gated norm normalises each group apart."""
        return self.d_inner // self.ngroups

    @property
    def in_proj_segments(self) -> dict[str, int]:
        """in_proj's output channels, segment by segment, in order."""
        bc = self.ngroups * self.d_state
        return {"z": self.d_inner, "x": self.d_inner, "B": bc, "C": bc, "dt": self.nheads}

    @property
    def conv_segments(self) -> dict[str, int]:
        """The conv's channels, segment by segment, in order: x, B and C of in_proj's output."""
        return {name: size for name, size in self.in_proj_segments.items() if name in ("x", "B", "C")}

    @property
    def in_proj_width(self) -> int:
        return sum(self.in_proj_segments.values())

    @property
    def conv_channels(self) -> int:
        return sum(self.conv_segments.values())

    def split_in_proj(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """in_proj's output (..., in_proj_width) as views: z (..., d_inner), the pre-conv xBC (..., conv_channels), dt (..., H)."""
        return zxbcdt.split([self.d_inner, self.conv_channels, self.nheads], dim=-1)

    def split_conv(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The conv's output (..., conv_channels) as views: x (..., H, P), B and C (..., G, N)."""
        x, B, C = xBC.split(list(self.conv_segments.values()), dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)))
