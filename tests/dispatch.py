"""A recorder of the operators that run, for tests that assert how much work a path does."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)


class Operators(TorchDispatchMode):
    """While active (forward and backward): how often each aten operator ran, and the most elements
    any operator produced."""

    def __init__(self):
        super().__init__()
        self.calls, self.numel = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls[func.overloadpacket] += 1
        self.numel = max([self.numel] + [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out

    @property
    def matmuls(self) -> int:
        return sum(self.calls[op] for op in MATMULS)
