"""megassm's gated RMSNorm backward (megassm/ops/gated_norm_triton.py) against mamba-ssm's (layernorm_gated), on one GPU.

As the fused mixer runs it: y (the SSD's output) and z (a strided view of in_proj's output) in bf16, norm groups of
d_inner / ngroups channels, mamba-ssm's forward giving the 1/rms both backwards read, dz written into a view of one
gradient buffer. Accuracy: dx, dz, dweight of each against autograd through the float32 reference
(megassm/ops/norm.py) on the same rounded inputs, max|got - want| / max|want|. Speed: GPU time per call from LAUNCHES
back-to-back calls (tools/bench_ssd.py's launch_ms: timing each call alone would count the host's launch time of a
~0.2 ms kernel), and the bandwidth that the bytes read and written imply.

    python tools/bench_norm.py [--shapes 780m 1.3b 2.7b] [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megassm.ops import gated_norm_triton  # noqa: E402
from megassm.ops.mamba_triton import load_triton_kernels  # noqa: E402
from megassm.ops.norm import gated_rms_norm  # noqa: E402
from tools.bench_ssd import launch_ms, preset_layout, relative_error  # noqa: E402

EPS, LAUNCHES = 1e-5, 30


def norm_shape(preset: str, tokens: int, **overrides: int) -> tuple[int, int, int, int]:
    """(tokens, d_inner, ngroups, in_proj's width) of one Mamba-2 layer of a preset."""
    layout = preset_layout(preset, **overrides)
    return tokens, layout.d_inner, layout.ngroups, layout.in_proj_width


SHAPES = {"780m": norm_shape("mamba2-780m", 16384), "780m-64k": norm_shape("mamba2-780m", 65536), "1.3b": norm_shape("mamba2-1.3b", 16384),
          "780m-g8": norm_shape("mamba2-780m", 16384, ngroups=8), "2.7b": norm_shape("mamba2-2.7b", 16384),
          "8b-g1": norm_shape("nemotron-h-8b", 16384, ngroups=1)}


# Launch shapes (warps, prefetch, programs per SM) for --sweep.
SWEEP = [gated_norm_triton.LaunchShape(*shape) for shape in ((16, True, 2), (16, False, 2), (8, True, 2), (8, True, 4), (32, True, 1),
                                                             (32, True, 2), (32, False, 1), (32, False, 2))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="megassm's kernel also at each of SWEEP's launch shapes")
    args = parser.parse_args()
    kernels, device = load_triton_kernels(), torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.shapes:
        tokens, width, groups, in_proj = SHAPES[name]
        generator = torch.Generator(device=device).manual_seed(0)
        wide = torch.randn(tokens, in_proj, device=device, generator=generator).to(torch.bfloat16)
        z = wide[:, :width]
        y, dout = (torch.randn(tokens, width, device=device, generator=generator).to(torch.bfloat16) for _ in range(2))
        weight = 1 + 0.1 * torch.randn(width, device=device, generator=generator)
        group = width // groups
        _, _, rstd = kernels.norm_forward(y, weight, None, EPS, z, group_size=group, norm_before_gate=False, is_rms_norm=True)
        leaves = [t.float().requires_grad_() for t in (y, z, weight)]
        want = torch.autograd.grad(gated_rms_norm(*leaves, group, EPS), leaves, dout.float())
        grad = torch.empty_like(wide)
        dz = grad[:, :width]

        def ours(shape: gated_norm_triton.LaunchShape | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            dx, dw = gated_norm_triton.gated_norm_backward(dout, y, z, weight, rstd, group, dz=dz, shape=shape)
            return dx, dz, dw

        def peer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            dx, dw, _, dz_ = kernels.norm_backward(dout, y, weight, None, EPS, None, rstd, z, group_size=group, norm_before_gate=False,
                                                   is_rms_norm=True, dz=dz)
            return dx, dz_, dw

        moved = tokens * width * 2 * 5  # y, z, dout read; dx, dz written, bf16
        sweep = [(f"megassm {tuple(shape)}", functools.partial(ours, shape)) for shape in SWEEP] if args.sweep else []
        for label, fn in (("megassm", ours), ("mamba-ssm", peer), *sweep):
            errors = [relative_error(got, w) for got, w in zip(fn(), want)]
            ms = launch_ms(fn, LAUNCHES)
            print(f"{name:9} | {label:32} {ms:.3f} ms ({moved / ms / 1e9:.2f} TB/s), errors dx {errors[0]:.1e} dz {errors[1]:.1e} "
                  f"dw {errors[2]:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
