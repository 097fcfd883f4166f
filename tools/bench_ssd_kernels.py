"""megassm's Triton SSD kernels (megassm/ops/ssd_triton.py) against mamba-ssm's, on one GPU.

Accuracy: both against the PyTorch reference ssd_chunked in float64 on the same (rounded) inputs, bf16
(megassm: every kernel chunk) and fp32, with documents, initial states, dt clamping and the final states'
gradient: max|got - want| / max|want| of y, the final states and every gradient, within the budget of
the input precision (fp32: TF32 tensor-core dots) or FAIL.
Speed: forward, backward and both (CUDA events around ITERATIONS calls back to back, after warm-up) and the peak memory
of a forward + backward, megassm's ssd_forward / ssd_backward against mamba-ssm's
_mamba_chunk_scan_combined_fwd / _bwd, bf16, with x, B, C and dt strided views of one in_proj-like
(b, l, 2hp + 2gn + h) tensor and the gradients written into views of one buffer, as the fused mixer
calls them. "bwd" of megassm uses the states its forward kept; "bwd recompute" recomputes them as
mamba-ssm's backward does (the memory of mamba-ssm's path), from the state handed to each segment of
their walk, as the mixer does. "max diff" compares the two paths' results.

    python tools/bench_ssd_kernels.py [--quick] [--json results.json]

The first run on a machine compiles and tunes both paths' kernels (a few minutes; Triton's cache and
megassm's autotune cache for mamba-ssm's kernels make later runs quicker).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools.bench_ssd, when run as a script

from megassm.ops.mamba_triton import load_triton_kernels  # noqa: E402
from megassm.ops.ssd import ssd_chunked  # noqa: E402
from megassm.ops.ssd_triton import DEFAULT_KERNEL_CHUNK, KERNEL_CHUNKS, SSDSaved, ssd_backward, ssd_forward, ssd_triton  # noqa: E402
from tools.bench_ssd import BUDGET, launch_ms, layer_shape  # noqa: E402
from tools.bench_ssd import relative_error as tensor_error  # noqa: E402

CHUNK_SIZE = 256
WARMUP, ITERATIONS = 3, 20
SHAPES = {
    "780m": layer_shape("mamba2-780m", 8, 2048),
    "780m-32k": layer_shape("mamba2-780m", 1, 32768),
    "130m": layer_shape("mamba2-130m", 8, 2048),
    "1.3b": layer_shape("mamba2-1.3b", 4, 4096),
    "32k-g8": layer_shape("mamba2-780m", 1, 32768, ngroups=8),
}
# (shape, documents per row, megassm's kernel chunk)
TIMED = [("780m", 1, DEFAULT_KERNEL_CHUNK), ("780m", 4, DEFAULT_KERNEL_CHUNK), ("780m-32k", 1, DEFAULT_KERNEL_CHUNK),
         ("130m", 1, DEFAULT_KERNEL_CHUNK), ("1.3b", 1, DEFAULT_KERNEL_CHUNK), ("32k-g8", 1, DEFAULT_KERNEL_CHUNK)]
TIMED += [("780m", 4, chunk) for chunk in KERNEL_CHUNKS if chunk != DEFAULT_KERNEL_CHUNK]
QUICK = [("780m", 1, DEFAULT_KERNEL_CHUNK), ("780m", 4, DEFAULT_KERNEL_CHUNK), ("130m", 1, DEFAULT_KERNEL_CHUNK)]
ACCURACY_SHAPE = dict(batch=2, seqlen=1000, nheads=8, headdim=64, ngroups=2, dstate=128)
ACCURACY_BOUNDARIES = (300, 512, 777)  # 512: on a chunk edge of every kernel chunk and of CHUNK_SIZE
ACCURACY_DT_LIMIT = (0.01, 0.3)
RESULTS = ("y", "final_states", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dinitial_states")


def ids_with_boundaries(batch: int, seqlen: int, boundaries: list[int], device: torch.device) -> torch.Tensor | None:
    """int32 ids starting at 0, a new document at each boundary, the same in every row (None without any)."""
    if not boundaries:
        return None
    ids = torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    for position in boundaries:
        ids[:, position:] += 1
    return ids


def mixer_tensors(batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int, dstate: int, dtype: torch.dtype,
                  device: torch.device, seed: int = 0) -> tuple[torch.Tensor, Callable[[torch.Tensor], list[torch.Tensor]], dict]:
    """In_proj's output as the mixer has it, [z | x | B | C | dt] (b, l, 2hp + 2gn + h) in `dtype`, a function
    giving the views x, B, C, dt of such a tensor, and the parameters A, D, dt_bias (fp32)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    widths = [nheads * headdim, nheads * headdim, ngroups * dstate, ngroups * dstate, nheads]
    wide = torch.randn(batch, seqlen, sum(widths), device=device, generator=generator)
    wide[..., -nheads:] = wide[..., -nheads:] * 0.5 - 2.0  # dt before softplus: softplus(-2 + bias) ~ 0.1
    wide = wide.to(dtype)

    def views(t: torch.Tensor) -> list[torch.Tensor]:
        _, x, B, C, dt = torch.split(t, widths, dim=-1)
        return [x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate)), dt]

    f32 = dict(device=device, dtype=torch.float32, generator=generator)
    params = dict(A=-(torch.rand(nheads, **f32) * 15 + 1), D=torch.randn(nheads, **f32), dt_bias=torch.randn(nheads, **f32) * 0.5)
    return wide, views, params


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """tools/bench_ssd.py's relative error; NaN where a gradient does not exist (no D, no dt_bias)."""
    return float("nan") if got is None or want is None else tensor_error(got, want)


def check_accuracy(device: torch.device) -> list[dict]:
    """Each path, bf16 and fp32, against ssd_chunked in float64 on the same rounded inputs."""
    kernels = load_triton_kernels()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        wide, views, params = mixer_tensors(**ACCURACY_SHAPE, dtype=dtype, device=device)
        shape = ACCURACY_SHAPE
        generator = torch.Generator(device=device).manual_seed(1)
        initial = torch.randn(shape["batch"], shape["nheads"], shape["headdim"], shape["dstate"], device=device, generator=generator)
        dy = torch.randn(*views(wide)[0].shape, device=device, generator=generator)
        dfinal = torch.randn_like(initial)
        seq_idx = ids_with_boundaries(shape["batch"], shape["seqlen"], list(ACCURACY_BOUNDARIES), device)
        options = dict(seq_idx=seq_idx, dt_softplus=True, dt_limit=ACCURACY_DT_LIMIT, return_final_states=True)

        def run(scan: Callable, precision: torch.dtype) -> dict:
            leaf = wide.to(precision).requires_grad_()
            leaves = {name: t.to(torch.float64 if precision == torch.float64 else torch.float32).requires_grad_()
                      for name, t in (*params.items(), ("initial_states", initial))}
            x, B, C, dt = views(leaf)
            y, final = scan(x, dt, leaves["A"], B, C, CHUNK_SIZE, D=leaves["D"], dt_bias=leaves["dt_bias"],
                            initial_states=leaves["initial_states"], **options)
            loss = (y * dy.to(y.dtype)).sum() + (final * dfinal.to(final.dtype)).sum()
            grads = torch.autograd.grad(loss, [leaf, leaves["A"], leaves["D"], leaves["dt_bias"], leaves["initial_states"]])
            dx, dB, dC, ddt = views(grads[0])
            return dict(zip(RESULTS, (y, final, dx, ddt, grads[1], dB, dC, grads[2], grads[3], grads[4]), strict=True))

        want = run(ssd_chunked, torch.float64)
        paths = {"mamba-ssm": kernels.mamba_chunk_scan_combined}
        chunks = KERNEL_CHUNKS if dtype == torch.bfloat16 else (DEFAULT_KERNEL_CHUNK,)  # fewer kernels to compile
        paths.update({f"megassm q{chunk}": (lambda *a, c=chunk, **k: ssd_triton(*a, kernel_chunk=c, **k)) for chunk in chunks})
        for name, scan in paths.items():
            got = run(scan, dtype)
            errors = {key: relative_error(got[key], want[key]) for key in RESULTS}
            worst = max(errors.values())
            rows.append(dict(path=name, dtype=str(dtype).removeprefix("torch."), errors=errors, max_error=worst,
                             passed=worst <= BUDGET[dtype]))
    return rows


def cuda_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of GPU time per call of fn, ITERATIONS back to back after WARMUP calls (the first autotunes)."""
    return launch_ms(fn, ITERATIONS, WARMUP)


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory fn allocates above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_case(shape_name: str, documents: int, kernel_chunk: int, device: torch.device) -> dict:
    kernels = load_triton_kernels()
    shape = SHAPES[shape_name]
    wide, views, params = mixer_tensors(**shape, dtype=torch.bfloat16, device=device)
    x, B, C, dt = views(wide)
    seqlen = shape["seqlen"]
    seq_idx = ids_with_boundaries(shape["batch"], seqlen, [seqlen * k // documents + 17 * k for k in range(1, documents)], device)
    dy = torch.randn_like(x)
    grad = torch.empty_like(wide)  # the gradient buffer the kernels write their slices of
    dx, dB, dC, ddt = views(grad)
    common = dict(D=params["D"], dt_bias=params["dt_bias"], seq_idx=seq_idx, dt_softplus=True)
    A = params["A"]

    def mamba_forward() -> tuple[torch.Tensor | None, ...]:
        return kernels.scan_forward(x, dt, A, B, C, CHUNK_SIZE, **common)

    def mamba_backward(out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return kernels.scan_backward(dy, x, dt, A, B, C, out, CHUNK_SIZE, **common, dx=dx, ddt=ddt, dB=dB, dC=dC)

    def ours_forward() -> tuple[torch.Tensor, torch.Tensor, SSDSaved]:
        return ssd_forward(x, dt, A, B, C, CHUNK_SIZE, kernel_chunk=kernel_chunk, **common)

    def ours_backward(saved: SSDSaved | None, handed: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
        return ssd_backward(dy, x, dt, A, B, C, CHUNK_SIZE, **common, saved=saved, dx=dx, ddt=ddt, dB=dB, dC=dC, kernel_chunk=kernel_chunk,
                            handed=handed)

    mamba_out = mamba_forward()
    ours_out = ours_forward()
    mamba_grads = mamba_backward(mamba_out[0])
    mamba_results = dict(y=mamba_out[0], final_states=mamba_out[5], dx=dx.clone(), ddt=ddt.clone(), dA=mamba_grads[2], dB=dB.clone(),
                         dC=dC.clone(), dD=mamba_grads[5], ddt_bias=mamba_grads[7])
    ours_grads = ours_backward(ours_out[2])
    ours_results = dict(y=ours_out[0], final_states=ours_out[1], dx=dx.clone(), ddt=ddt.clone(), dA=ours_grads[2], dB=dB.clone(),
                        dC=dC.clone(), dD=ours_grads[5], ddt_bias=ours_grads[6])
    differences = {key: relative_error(ours_results[key], mamba_results[key]) for key in ours_results}

    row = dict(case=f"{shape_name} docs{documents} q{kernel_chunk}", shape=shape, documents=documents, kernel_chunk=kernel_chunk,
               max_diff=max(differences.values()), diffs=differences)
    row["mamba_fwd_ms"] = cuda_ms(mamba_forward)
    row["mamba_bwd_ms"] = cuda_ms(lambda y=mamba_out[0]: mamba_backward(y))
    row["ours_fwd_ms"] = cuda_ms(ours_forward)
    row["ours_bwd_ms"] = cuda_ms(lambda saved=ours_out[2]: ours_backward(saved))
    row["ours_bwd_recompute_ms"] = cuda_ms(lambda handed=ours_out[2].handed: ours_backward(None, handed))
    row["mamba_total_ms"] = row["mamba_fwd_ms"] + row["mamba_bwd_ms"]
    row["ours_total_ms"] = row["ours_fwd_ms"] + row["ours_bwd_ms"]
    row["speedup"] = row["mamba_total_ms"] / row["ours_total_ms"]
    del mamba_out, ours_out
    row["mamba_peak_mib"] = peak_mib(lambda: mamba_backward(mamba_forward()[0]))
    row["ours_peak_mib"] = peak_mib(lambda: ours_backward(ours_forward()[2]))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed cases")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")

    accuracy = check_accuracy(device)
    print(f"accuracy vs ssd_chunked float64 (max |got - want| / max |want|), {torch.cuda.get_device_name()}")
    print(f"{'path':<14} {'dtype':<9} {'worst':>9}  {'of':<16} result")
    for row in accuracy:
        worst_name = max(row["errors"], key=row["errors"].get)
        print(f"{row['path']:<14} {row['dtype']:<9} {row['max_error']:>9.2e}  {worst_name:<16} {'PASS' if row['passed'] else 'FAIL'}")

    print(f"\nspeed, bf16, chunk_size {CHUNK_SIZE}: milliseconds (mean of {ITERATIONS} back-to-back calls), "
          "peak MiB of a forward + backward")
    header = (f"{'case':<24} {'mamba fwd':>9} {'bwd':>7} {'total':>7} | {'ours fwd':>8} {'bwd':>7} {'(recomp)':>8} {'total':>7} | "
              f"{'speedup':>7} | {'mamba MiB':>9} {'ours MiB':>8} | max diff")
    print(header)
    timing = []
    for shape_name, documents, kernel_chunk in QUICK if args.quick else TIMED:
        row = time_case(shape_name, documents, kernel_chunk, device)
        timing.append(row)
        print(f"{row['case']:<24} {row['mamba_fwd_ms']:>9.3f} {row['mamba_bwd_ms']:>7.3f} {row['mamba_total_ms']:>7.3f} | "
              f"{row['ours_fwd_ms']:>8.3f} {row['ours_bwd_ms']:>7.3f} {row['ours_bwd_recompute_ms']:>8.3f} {row['ours_total_ms']:>7.3f} | "
              f"{row['speedup']:>6.2f}x | {row['mamba_peak_mib']:>9.0f} {row['ours_peak_mib']:>8.0f} | {row['max_diff']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), accuracy=accuracy, timing=timing), f, indent=1)
    return 0 if all(row["passed"] for row in accuracy) else 1


if __name__ == "__main__":
    sys.exit(main())
