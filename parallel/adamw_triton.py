"""AdamW's update of every parameter of a group in one Triton launch, reading each tensor through a table of pointers.

Why: torch's fused AdamW (multi_tensor_apply) moved its bytes at about 2.9 TB/s on an H200 (7.5 ms of a 780m step,
13.1 of a 1.3b one) in ~110 launches per step. Here one launch per parameter group streams every parameter, gradient
and moment in blocks of BLOCK elements. The math, the state (`step`, `exp_avg`, `exp_avg_sq`) and the `grad_scale` /
`found_inf` contract are those of torch's fused AdamW, whose state_dict() this optimizer keeps.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096  # elements per program


@triton.jit
def _pointer(row, column: tl.constexpr):
    """The table's pointer in `column`, 16-byte aligned (TritonAdamW checks): loads of four values at once."""
    return tl.multiple_of(tl.load(row + column).to(tl.pointer_type(tl.float32)), 16)


@triton.jit
def _adamw_kernel(table_ptr, tensor_of_block_ptr, first_block_ptr, grad_scale_ptr, found_inf_ptr, lr, beta1, beta2, eps, weight_decay,
                  HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr, SIZES_BY_4: tl.constexpr):
    """One block of one tensor: grad / grad_scale, then p <- p (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    p <- p - lr / (1 - b1^step) m / (sqrt(v) / sqrt(1 - b2^step) + eps), nothing where found_inf is set."""
    tensor = tl.load(tensor_of_block_ptr + tl.program_id(0))
    row = table_ptr + tensor * 6
    offsets = (tl.program_id(0) - tl.load(first_block_ptr + tensor)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offsets = tl.max_contiguous(tl.multiple_of(offsets, BLOCK), BLOCK)
    numel = tl.load(row + 5)
    if HAS_FOUND_INF:
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)  # a skipped step: no element loaded or stored
    if SIZES_BY_4:  # every tensor's size a multiple of 4: masks constant over four values, loads of four at once
        numel = tl.multiple_of(numel, 4)
    mask = offsets < numel
    param, grad, exp_avg, exp_avg_sq = _pointer(row, 0), _pointer(row, 1), _pointer(row, 2), _pointer(row, 3)
    step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))  # one value: no alignment asserted
    g = tl.load(grad + offsets, mask=mask, other=0.0)
    if HAS_SCALE:
        g = g / tl.load(grad_scale_ptr)
    p = tl.load(param + offsets, mask=mask, other=0.0) * (1 - lr * weight_decay)
    m = beta1 * tl.load(exp_avg + offsets, mask=mask, other=0.0) + (1 - beta1) * g
    v = beta2 * tl.load(exp_avg_sq + offsets, mask=mask, other=0.0) + (1 - beta2) * g * g
    correction1 = 1 - tl.exp2(step * tl.log2(beta1))
    correction2 = 1 - tl.exp2(step * tl.log2(beta2))
    p -= lr / correction1 * m / (tl.sqrt(v) / tl.sqrt(correction2) + eps)
    tl.store(param + offsets, p, mask=mask)
    tl.store(exp_avg + offsets, m, mask=mask)
    tl.store(exp_avg_sq + offsets, v, mask=mask)


class _Blocks(NamedTuple):
    """Which tensor each program updates, each tensor's first program (by the tensors' sizes), and whether every size is
    a multiple of 4 (the large matrices are; A_log, D and dt_bias hold one value per head)."""

    tensor_of_block: Tensor
    first_block: Tensor
    sizes_by_4: bool


def _to_device(values: list, device: torch.device) -> Tensor:
    """int64 values on `device`, copied from pinned memory without waiting for the device."""
    return torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def _blocks(numels: tuple[int, ...], device: torch.device) -> _Blocks:
    blocks = [triton.cdiv(n, BLOCK) for n in numels]
    firsts = [0, *itertools.accumulate(blocks)][:-1]
    return _Blocks(_to_device([i for i, count in enumerate(blocks) for _ in range(count)], device), _to_device(firsts, device),
                   all(n % 4 == 0 for n in numels))


class TritonAdamW(torch.optim.AdamW):
    """torch's fused AdamW (state, state_dict, hyperparameters, optimizer.grad_scale and .found_inf as for
    torch.amp.GradScaler), updated by `_adamw_kernel` where every parameter and gradient is a contiguous fp32 tensor on
    one of KERNEL_DEVICES; anything else (CPU, other dtypes, amsgrad, maximize, a closure) steps as torch's does. One
    difference: the gradients stay as they were, where torch's step leaves them divided by grad_scale (a write of every
    gradient that nothing here reads: the engines drop or zero them after the step)."""

    KERNEL_DEVICES = ("cuda",)  # the tests add "cpu" to run the kernel in Triton's interpreter

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(params, lr=lr, betas=betas, eps=eps, fused=True)
        self._tables: dict[tuple, Tensor | None] = {}
        self._block_maps: dict[tuple, _Blocks] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        launches = [self._launch(group) for group in self.param_groups] if closure is None else [None]
        if any(launch is None for launch in launches):
            return super().step(closure)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group, (steps, table, blocks) in zip(self.param_groups, launches):
            if not steps:
                continue
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            device = steps[0].device
            _adamw_kernel[(len(blocks.tensor_of_block),)](
                table, blocks.tensor_of_block, blocks.first_block, steps[0] if grad_scale is None else grad_scale.to(device),
                steps[0] if found_inf is None else found_inf.to(device), float(group["lr"]), float(beta1), float(beta2),
                float(group["eps"]), float(group["weight_decay"]), HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                BLOCK=BLOCK, SIZES_BY_4=blocks.sizes_by_4, num_warps=8)
            if found_inf is not None:  # a skipped step does not count, as in torch's fused AdamW
                torch._foreach_sub_(steps, [found_inf.to(device)] * len(steps))
        return None

    def _launch(self, group: dict) -> tuple[list[Tensor], Tensor | None, _Blocks | None] | None:
        """The group's step counts (of the parameters with a gradient, their state created as torch creates it), pointer
        table ([param, grad, exp_avg, exp_avg_sq, step, numel] per parameter) and block map; None where the kernel does
        not apply. Tables are kept by the tensors' addresses (gradients that are static buffers never move), and so is the
        answer whether the kernel applies."""
        if group["amsgrad"] or group["maximize"] or group["differentiable"] or group["capturable"]:
            return None
        tensors: list[list[Tensor]] = [[], [], [], [], [], []]
        self._init_group(group, *tensors)
        del tensors[4]  # max_exp_avg_sqs: none without amsgrad
        steps = tensors[-1]
        if not steps:
            return steps, None, None
        addresses = tuple(t.data_ptr() for per_kind in tensors for t in per_kind)
        if addresses not in self._tables:
            if len(self._tables) >= 4:  # gradients allocated anew each step: keep a few
                self._tables.clear()
            self._tables[addresses] = self._table(tensors)
        table = self._tables[addresses]
        if table is None:
            return None
        numels = tuple(p.numel() for p in tensors[0])
        if numels not in self._block_maps:
            self._block_maps[numels] = _blocks(numels, table.device)
        return steps, table, self._block_maps[numels]

    def _table(self, tensors: list[list[Tensor]]) -> Tensor | None:
        """The pointer table of [params, grads, exp_avgs, exp_avg_sqs, steps], or None where the kernel cannot take them:
        contiguous fp32 on one device of KERNEL_DEVICES, 16-byte aligned (it loads four values at once)."""
        moving, steps = [t for per_kind in tensors[:4] for t in per_kind], tensors[4]
        if any(t.device.type not in self.KERNEL_DEVICES or t.dtype != torch.float32 or not t.is_contiguous() for t in moving):
            return None
        if len({t.device for t in moving + steps}) > 1 or any(s.dtype != torch.float32 for s in steps):
            return None
        if any(t.data_ptr() % 16 for t in moving):
            return None
        return _to_device([[t.data_ptr() for t in row] + [row[0].numel()] for row in zip(*tensors)], steps[0].device)
