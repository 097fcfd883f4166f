"""The mixer's causal depthwise conv1d over [x | B | C], its channels split over TP like in_proj's."""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed import ProcessGroup

from megassm.model.init import uniform_fan_in
from megassm.ops import causal_conv1d_silu
from parallel import ShardedSegments


class CausalDepthwiseConv1d(nn.Module):
    """`weight[name]` (channels, width) and `bias[name]` per segment; silu applied to the output."""

    backend = "auto"  # megassm.ops's kernels: "auto", "torch" or "triton" (apply_kernels sets it)
    torch_compile = False  # torch.compile the PyTorch conv where the Triton one does not run

    def __init__(self, segments: dict[str, int], width: int, bias: bool, tp_group: ProcessGroup | None):
        super().__init__()
        self.weight = ShardedSegments({n: uniform_fan_in((size, width), width) for n, size in segments.items()}, tp_group)
        biases = {n: uniform_fan_in((size,), width) for n, size in segments.items()} if bias else None
        self.bias = None if biases is None else ShardedSegments(biases, tp_group)

    def forward(self, x: Tensor, halo: Tensor | None = None, seq_idx: Tensor | None = None, halo_seq_idx: Tensor | None = None) -> Tensor:
        bias = None if self.bias is None else self.bias.fused()
        return causal_conv1d_silu(x, self.weight.fused(), bias, halo, seq_idx, halo_seq_idx, self.backend, self.torch_compile)
