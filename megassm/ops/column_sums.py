"""Sums over the rows of a kernel's fp32 partial sums (one row per program), as one Triton kernel.

Why: the backward kernels of the conv, the gated norm and the SSD leave their parameter gradients as partial sums,
a row per program, so that no atomics make them non-deterministic. torch's `sum(0)` over a few hundred such rows took
~9 us per call on an H200, three calls per Mamba-2 layer; here each program sums one block of columns down all rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS, BLOCK_COLUMNS = 64, 64


@triton.jit
def _column_sums_kernel(partial_ptr, out_ptr, rows, columns, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for first in range(0, rows, BLOCK_R):
        r = (first + tl.arange(0, BLOCK_R)).to(tl.int64)
        total += tl.load(partial_ptr + r[:, None] * columns + cols[None, :], mask=(r < rows)[:, None] & (cols < columns)[None, :],
                         other=0.0)
    tl.store(out_ptr + cols, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty), mask=cols < columns)


def column_sums(partial: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """partial.sum(0) of a contiguous fp32 (rows, ...) tensor, summed in fp32 in a fixed order, in `dtype` (default fp32)."""
    if partial.dtype != torch.float32 or not partial.is_contiguous():
        raise ValueError(f"column_sums takes contiguous fp32 partial sums, got {partial.dtype} with strides {partial.stride()}")
    rows, shape = partial.shape[0], partial.shape[1:]
    out = torch.empty(shape, dtype=dtype or partial.dtype, device=partial.device)
    columns = out.numel()
    _column_sums_kernel[(triton.cdiv(columns, BLOCK_COLUMNS),)](partial, out, rows, columns, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLUMNS)
    return out
