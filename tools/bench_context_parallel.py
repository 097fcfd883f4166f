"""Context parallelism with the Triton SSD on one GPU: the ranks simulated in one process.

Each "rank" runs mamba-ssm's Triton SSD on its slice from a zero state, exactly as Mamba2Mixer does
under CP; the state exchange that parallel.incoming_state does with one all-gather is replaced by
the same recurrence (parallel.context_parallel.prefix_states) over the stacked slices. The result,
outputs and the gradient of every input, is compared with the unsplit Triton SSD, and both with the
float64 PyTorch reference: CP must be as accurate as no CP (error at most 2x, or within 1e-3).

    python tools/bench_context_parallel.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from bench_ssd import make_ssd_inputs, relative_error  # tools/ is on the path when run as a script

from megassm import ops
from megassm.model.context_parallel import apply_incoming_state, slice_decays
from parallel.context_parallel import prefix_states

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def make_inputs(shape: dict, row_boundaries: list[tuple[int, ...]], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """bench_ssd's inputs without initial states (each CP rank starts from zero), and per-row documents."""
    inputs, _ = make_ssd_inputs(**shape, boundaries=(), device=device, dt_shift=-3.0, A_range=(0.5, 4.5))
    del inputs["initial_states"]
    seq_idx = torch.zeros(shape["batch"], shape["seqlen"], dtype=torch.int32, device=device)
    for row, starts in enumerate(row_boundaries):
        for start in starts:
            seq_idx[row, start:] += 1
    return inputs, seq_idx


def leaves(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: t.to(dtype if n in ("x", "B", "C") or dtype == torch.float64 else torch.float32).requires_grad_(True) for n, t in inputs.items()}


def unsplit(inputs: dict[str, torch.Tensor], seq_idx: torch.Tensor, chunk_size: int, backend: str,
            dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    p = leaves(inputs, dtype)
    y = ops.ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], chunk_size, D=p["D"], dt_bias=p["dt_bias"], seq_idx=seq_idx, backend=backend)
    return y, p


def context_parallel(inputs: dict[str, torch.Tensor], seq_idx: torch.Tensor, chunk_size: int, cp: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every rank's local Triton SSD + the incoming-state correction, concatenated."""
    p = leaves(inputs, dtype)
    seqlen = p["x"].shape[1]
    cut = lambda t, r: t[:, r * seqlen // cp : (r + 1) * seqlen // cp]  # noqa: E731
    local, finals, log_decays, decays = [], [], [], []
    for r in range(cp):
        ids = cut(seq_idx, r)
        previous_last = cut(seq_idx, r - 1)[:, -1:] if r else torch.zeros_like(ids[:, :1])
        y0, final = ops.ssd(cut(p["x"], r), cut(p["dt"], r), p["A"], cut(p["B"], r), cut(p["C"], r), chunk_size, D=p["D"],
                            dt_bias=p["dt_bias"], seq_idx=ids, return_final_states=True, backend="triton")
        log_decay, decay = slice_decays(cut(p["dt"], r), p["A"], p["dt_bias"], (0.0, float("inf")), ids, previous_last)
        local.append(y0), finals.append(final), log_decays.append(log_decay), decays.append(decay)
    incoming = prefix_states(torch.stack(finals).flatten(-2), torch.exp(torch.stack(log_decays)), cp)
    ys = [apply_incoming_state(local[r], incoming[r].view_as(finals[r]), cut(p["C"], r), decays[r]) for r in range(cp)]
    return torch.cat(ys, dim=1), p


def main() -> int:
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    cases = [
        ("b2 L8192 H16 P64 N128 G2, cp=4 (slices of 2048)", dict(batch=2, seqlen=8192, nheads=16, headdim=64, ngroups=2, dstate=128), 4,
         [(1000, 2048, 5000), (3000,)]),
        ("b2 L8000 H8 P64 N64 G1, cp=8 (slices of 1000, not whole chunks)", dict(batch=2, seqlen=8000, nheads=8, headdim=64, ngroups=1, dstate=64), 8,
         [(999, 1000, 4321), ()]),
    ]
    print("\n| case | dtype | tensor | CP vs unsplit | CP vs float64 | unsplit vs float64 | ok |\n|---|---|---|---|---|---|---|")
    failures = 0
    for name, shape, cp, boundaries in cases:
        inputs, seq_idx = make_inputs(shape, boundaries, device)
        g = torch.Generator(device=device).manual_seed(1)
        dy = torch.randn(inputs["x"].shape, device=device, dtype=torch.float64, generator=g)

        def run(fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]], *args) -> dict[str, torch.Tensor]:
            y, p = fn(*args)
            grads = torch.autograd.grad((y * dy.to(y.dtype)).sum(), [p[n] for n in NAMES])
            return {"y": y, **{f"d{n}": gr for n, gr in zip(NAMES, grads)}}

        exact = run(unsplit, inputs, seq_idx, 256, "torch", torch.float64)
        for label, dtype in DTYPES.items():
            whole = run(unsplit, inputs, seq_idx, 256, "triton", dtype)
            split = run(context_parallel, inputs, seq_idx, 256, cp, dtype)
            for tensor in exact:
                vs_whole, vs_exact, whole_exact = (relative_error(split[tensor], whole[tensor]), relative_error(split[tensor], exact[tensor]),
                                                   relative_error(whole[tensor], exact[tensor]))
                ok = vs_exact <= max(2 * whole_exact, 1e-3)
                failures += not ok
                print(f"| {name} | {label} | {tensor} | {vs_whole:.2e} | {vs_exact:.2e} | {whole_exact:.2e} | {'yes' if ok else 'NO'} |")
    print(f"\n{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
