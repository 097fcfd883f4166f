"""The backward of the Mamba-2 mixer's gated RMSNorm, norm(x * silu(z)) * weight per group, as a Triton kernel.

Why: mamba-ssm's backward kernel (layernorm_gated._layer_norm_bwd) runs one program per SM, each walking its rows one
after the other: a row's loads wait for the previous row's arithmetic and stores, and at 780m it moved its bytes at
about half the H200's bandwidth (11.8 ms per step where the forward, reading and writing 3/5 as much, took 3.8).
Here a program loads the next row before it works on the current one (a whole row of 3,072 channels per program
leaves room for few programs per SM). The forward stays mamba-ssm's: this reads its 1/rms in that layout,
(groups, rows) flattened.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from megassm.ops.column_sums import column_sums


class LaunchShape(NamedTuple):
    """How the kernel is launched for rows of a given width."""
    warps: int
    prefetch: bool  # the next row's loads go out before this row's arithmetic and stores
    programs_per_sm: int  # launched per SM (over several waves where fewer fit at once)


# Widest rows whose next row is loaded ahead: past it the registers of two rows spill (to 2.6 KB at 8,192 columns).
PREFETCH_MAX_BLOCK = 4096


def launch_shape(block: int) -> LaunchShape:
    """For rows of `block` columns (a power of two): 256 columns per warp, up to sixteen warps, two programs per SM,
    loading the next row ahead up to PREFETCH_MAX_BLOCK. On an H200 at 780m (rows of 3,072 channels) 2 programs of 16
    warps took 0.83x the time of 4 of 8 (bench/raw/h200_run14_call1_sweep_mem.txt); on an H100 at 2.7b (5,120) without
    loading ahead 0.69x the time with, 0.86x mamba-ssm's (tools/bench_norm.py --sweep, bench/raw/h100_run32_call2_*)."""
    return LaunchShape(min(max(block // 256, 1), 16), block <= PREFETCH_MAX_BLOCK, 2)


@triton.jit
def _row(x_ptr, z_ptr, dout_ptr, row, present, stride_x, stride_z, stride_dout, first_col, cols, ok):
    """Row `row` of x, z and dout at the group's columns, fp32 (zeros where it is not `present`)."""
    r = tl.cast(row, tl.int64)
    mask = ok & present
    return (tl.load(x_ptr + r * stride_x + first_col + cols, mask=mask, other=0.0).to(tl.float32),
            tl.load(z_ptr + r * stride_z + first_col + cols, mask=mask, other=0.0).to(tl.float32),
            tl.load(dout_ptr + r * stride_dout + first_col + cols, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _gated_norm_backward_kernel(x_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dx_ptr, dz_ptr, dw_ptr, M, N, rows_per_program,
                                stride_x, stride_z, stride_dout, stride_dx, stride_dz, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    """Rows [program * rows_per_program, ...) of group g: with h = x silu(z), hat = h rstd, out = hat w,
        dh = rstd (w dout - hat mean(hat w dout)),  dx = dh silu(z),  dz = dh x silu'(z),
    and this program's share of dw = sum over rows of dout hat, fp32 (programs, groups * N)."""
    program, g = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    first_col = g * N
    w = tl.load(w_ptr + first_col + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = program * rows_per_program
    end = tl.minimum(first + rows_per_program, M)
    x, z, dout = _row(x_ptr, z_ptr, dout_ptr, first, PREFETCH and first < end, stride_x, stride_z, stride_dout, first_col, cols, ok)
    for row in range(first, end):
        r = tl.cast(row, tl.int64)  # row offsets past 2^31 elements at long sequences
        rstd = tl.load(rstd_ptr + g * M + row)
        if PREFETCH:  # the next row's loads go out before this row's arithmetic and stores
            x_next, z_next, dout_next = _row(x_ptr, z_ptr, dout_ptr, row + 1, row + 1 < end, stride_x, stride_z, stride_dout, first_col,
                                             cols, ok)
        else:
            x, z, dout = _row(x_ptr, z_ptr, dout_ptr, row, True, stride_x, stride_z, stride_dout, first_col, cols, ok)
        sig = tl.sigmoid(z)
        hat = x * z * sig * rstd
        w_dout = w * dout
        dh = (w_dout - hat * (tl.sum(hat * w_dout, axis=0) / N)) * rstd
        dw += dout * hat
        tl.store(dx_ptr + r * stride_dx + first_col + cols, (dh * z * sig).to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dz_ptr + r * stride_dz + first_col + cols, (dh * x * sig * (1 + z * (1 - sig))).to(dz_ptr.dtype.element_ty), mask=ok)
        if PREFETCH:
            x, z, dout = x_next, z_next, dout_next
    tl.store(dw_ptr + program * (tl.num_programs(1) * N) + first_col + cols, dw, mask=ok)


def gated_norm_backward(dout: Tensor, x: Tensor, z: Tensor, weight: Tensor, rstd: Tensor, group_size: int,
                        dz: Tensor | None = None, shape: LaunchShape | None = None) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of out = norm(x * silu(z)) * weight over groups of `group_size` channels, norm_before_gate=False
    (rows (M, width), last dimension contiguous, any row stride); rstd: 1/rms (groups * M,), group-major, as
    mamba-ssm's forward leaves it. dz is written into the given buffer (or a new one). `shape`: launch_shape's
    unless given (tools/bench_norm.py --sweep)."""
    rows, width = x.shape
    groups = width // group_size
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if dz is None else dz
    block = triton.next_power_of_2(group_size)
    shape = shape or launch_shape(block)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    rows_per_program = triton.cdiv(rows, max(1, sms * shape.programs_per_sm // groups))
    programs = triton.cdiv(rows, rows_per_program)
    dw = torch.empty(programs, width, dtype=torch.float32, device=x.device)
    _gated_norm_backward_kernel[(programs, groups)](x, z, weight, rstd, dout, dx, dz, dw, rows, group_size, rows_per_program,
                                                    x.stride(0), z.stride(0), dout.stride(0), dx.stride(0), dz.stride(0),
                                                    BLOCK_N=block, PREFETCH=shape.prefetch, num_warps=shape.warps)
    return dx, column_sums(dw, weight.dtype)
