import torch
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """At least fp32: bf16/fp16 compute in fp32, and fp64 stays fp64 for the float64 reference tests."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
