"""megassm's Triton conv1d + silu (megassm/ops/conv_triton.py) against causal-conv1d's CUDA kernels, on one GPU.

The conv as the Mamba-2 mixer runs it: x = the [x | B | C] columns of an in_proj-like (b, l, width) bf16 tensor (a
strided view), depthwise weight (channels, 4), bias, four documents per row (seq_idx), dx written into a view of one
gradient buffer. Accuracy: y, dx, dweight, dbias against the PyTorch reference (megassm/ops/conv.py) in float32 on
the same rounded inputs, max|got - want| / max|want|. Speed: forward and backward, the GPU time of one launch (CUDA
events around LAUNCHES back-to-back launches after warm-up: timing each call alone would count the host's ~30 us of
launching a kernel that runs ~100), against a Triton copy of x's bytes into a contiguous tensor (what the forward
reads and writes: its floor); the peer is causal-conv1d's channel-last path (what mamba-ssm's fused path calls),
when installed.

    python tools/bench_conv.py [--sweep]

--sweep also times both under other launch parameters (conv_triton's FORWARD, BACKWARD and PROGRAMS).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megassm.ops import conv_triton  # noqa: E402
from megassm.ops.conv import causal_conv1d  # noqa: E402
from tools.bench_ssd import launch_ms, preset_layout, relative_error  # noqa: E402

WIDTH, DOCUMENTS, LAUNCHES = 4, 4, 30


def conv_shape(preset: str, batch: int, seqlen: int) -> tuple[int, int, int, int]:
    """(batch, seqlen, conv channels: x, B and C, in_proj's width) of one Mamba-2 layer of a preset."""
    layout = preset_layout(preset)
    return batch, seqlen, sum(layout.conv_segments.values()), layout.in_proj_width


SHAPES = {"780m": conv_shape("mamba2-780m", 8, 2048), "780m-32k": conv_shape("mamba2-780m", 1, 32768),
          "130m": conv_shape("mamba2-130m", 8, 2048), "1.3b": conv_shape("mamba2-1.3b", 4, 4096)}
# Launch parameters (block_d, warps, rows) tried for both kernels, each with PROGRAMS of 2048 and 4096.
SWEEP = [(256, 1, 8), (256, 2, 8), (128, 1, 8), (256, 1, 4), (128, 1, 4), (512, 4, 8), (256, 1, 16)]


def conv_inputs(batch: int, seqlen: int, channels: int, width: int, device: torch.device) -> dict:
    """The mixer's conv operands, bf16: x a view of a wider tensor, weight, bias; documents; an upstream gradient."""
    generator = torch.Generator(device=device).manual_seed(0)
    wide = torch.randn(batch, seqlen, width, device=device, generator=generator).to(torch.bfloat16)
    x = wide[..., 1000:1000 + channels]  # past z: the mixer's [x | B | C] columns
    weight = (torch.randn(channels, WIDTH, device=device, generator=generator) * 0.5).to(torch.bfloat16)
    bias = torch.randn(channels, device=device, generator=generator).to(torch.bfloat16)
    seq_idx = (torch.arange(seqlen, device=device) * DOCUMENTS // seqlen).to(torch.int32).expand(batch, -1).contiguous()
    dy = torch.randn(batch, seqlen, channels, device=device, generator=generator).to(torch.bfloat16)
    return dict(wide=wide, x=x, weight=weight, bias=bias, seq_idx=seq_idx, dy=dy)


def check(t: dict) -> dict:
    """megassm's y, dx, dweight, dbias against the float32 reference on the same inputs."""
    y = conv_triton.conv1d_silu_forward(t["x"], t["weight"], t["bias"], t["seq_idx"])
    dx, dw, db, _ = conv_triton.conv1d_silu_backward(t["x"], t["weight"], t["bias"], t["seq_idx"], t["dy"])
    leaves = [v.float().requires_grad_() for v in (t["x"], t["weight"], t["bias"])]
    want = causal_conv1d(*leaves, seq_idx=t["seq_idx"], activation="silu")
    grads = torch.autograd.grad(want, leaves, t["dy"].float())
    return {name: relative_error(got, ref) for name, got, ref in zip(("y", "dx", "dweight", "dbias"), (y, dx, dw, db), (want, *grads))}


@triton.jit
def _copy_kernel(x_ptr, y_ptr, rows, D, stride_x, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (c < D)[None, :]
    tl.store(y_ptr + r[:, None] * D + c[None, :], tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + c[None, :], mask=mask), mask=mask)


def copy_ms(t: dict) -> float:
    """A Triton copy of x (a strided view) into a contiguous tensor: the forward's bytes at the H200's copy speed."""
    x = t["x"].flatten(0, 1)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(x.shape[0], 32), triton.cdiv(x.shape[1], 128))
    return launch_ms(lambda: _copy_kernel[grid](x, y, x.shape[0], x.shape[1], x.stride(0), BLOCK_L=32, BLOCK_D=128), LAUNCHES)


def megassm_times(t: dict) -> dict:
    grad = torch.empty_like(t["wide"])
    dx = grad[..., 1000:1000 + t["x"].shape[-1]]
    forward = launch_ms(lambda: conv_triton.conv1d_silu_forward(t["x"], t["weight"], t["bias"], t["seq_idx"]), LAUNCHES)
    backward = launch_ms(lambda: conv_triton.conv1d_silu_backward(t["x"], t["weight"], t["bias"], t["seq_idx"], t["dy"], dx=dx), LAUNCHES)
    return dict(forward=forward, backward=backward)


def peer_times(t: dict) -> dict | None:
    """causal-conv1d's channel-last forward and backward ((b, d, l) views with channels contiguous), as mamba-ssm's
    fused path calls them."""
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
    except ImportError:
        return None
    x, dy = (t[k].contiguous().transpose(1, 2) for k in ("x", "dy"))
    weight, bias, seq_idx = t["weight"].contiguous(), t["bias"], t["seq_idx"]
    dx = torch.empty_like(x)
    forward = launch_ms(lambda: causal_conv1d_fwd_function(x, weight, bias, seq_idx, None, None, True), LAUNCHES)
    backward = launch_ms(lambda: causal_conv1d_bwd_function(x, weight, bias, dy, seq_idx, None, None, dx, False, True), LAUNCHES)
    return dict(forward=forward, backward=backward)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time both under other launch parameters")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.shapes:
        t = conv_inputs(*SHAPES[name], device)
        errors = check(t)
        ours, peer = megassm_times(t), peer_times(t)
        line = f"{name:9} megassm fwd {ours['forward']:.3f} bwd {ours['backward']:.3f} ms | copy of x {copy_ms(t):.3f} ms"
        if peer:
            line += (f" | causal-conv1d fwd {peer['forward']:.3f} bwd {peer['backward']:.3f} ms"
                     f" | ratio fwd+bwd {(peer['forward'] + peer['backward']) / (ours['forward'] + ours['backward']):.2f}x")
        print(line + " | errors " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
        if not args.sweep:
            continue
        default = conv_triton.FORWARD, conv_triton.BACKWARD, conv_triton.PROGRAMS
        for launch, programs in itertools.product(SWEEP, (2048, 4096)):
            conv_triton.FORWARD = conv_triton.BACKWARD = conv_triton.Launch(*launch)
            conv_triton.PROGRAMS = programs
            try:
                worst = max(check(t).values())
                times = megassm_times(t)
                print(f"  {conv_triton.FORWARD}, programs {programs}: fwd {times['forward']:.3f} bwd {times['backward']:.3f} ms, "
                      f"max error {worst:.1e}", flush=True)
            except Exception as error:  # a configuration the compiler or the GPU refuses: report it, go on
                print(f"  {conv_triton.FORWARD}, programs {programs} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        conv_triton.FORWARD, conv_triton.BACKWARD, conv_triton.PROGRAMS = default
    return 0


if __name__ == "__main__":
    sys.exit(main())
