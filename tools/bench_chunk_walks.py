"""The SSD's chunk walks (states, state gradients) at 780m's layer on one sequence, each launch timed: the segments'
ends, the states handed between segments, the walks; for given segment counts and tiles, or as training runs them.

    python tools/bench_chunk_walks.py --tokens 65536 --segments 1 8 22   # every tile candidate at each segment count
    python tools/bench_chunk_walks.py --tokens 65536                     # megassm's own choice (walk_segments, autotuning)

Why: a walk is sequential over chunks; how many walks run at once (segments x (batch, head) x tiles) and how many
programs of a tile fit on an SM decide its speed, which the training step's profile lumps into one kernel name.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from megassm.ops import ssd_triton_bwd as bwd
from megassm.ops import ssd_triton_fwd as fwd

HEADS, HEADDIM, DSTATE, CHUNK, ITERATIONS = 48, 64, 128, 64, 10
TILES = [((64, 128), 2, None), ((16, 64), 3, None), ((64, 128), 2, 168), ((32, 128), 2, None), ((32, 64), 3, None),
         ((16, 128), 3, None)]  # ((BLOCK_P, BLOCK_N), stages, register cap)


class TimedLaunches:
    """Stands in for a kernel: launches it between CUDA events and records (label, start, end)."""

    def __init__(self, kernel, label: str, record: list):
        self.kernel, self.label, self.record = kernel, label, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.kernel[grid](*args, **kwargs)
            end.record()
            self.record.append((self.label, start, end))
        return launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--segments", type=int, nargs="*", help="segment counts to force, each with every tile of TILES")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cuda, length = torch.device("cuda"), args.tokens
    x, dy = (torch.randn(1, length, HEADS, HEADDIM, device=cuda, dtype=torch.bfloat16) for _ in range(2))
    B, C = (torch.randn(1, length, 1, DSTATE, device=cuda, dtype=torch.bfloat16) for _ in range(2))
    seq_idx = torch.zeros(1, length, dtype=torch.int32, device=cuda)
    seq_idx[:, length // 3:] = 1
    dt, cs, _ = fwd.discretize(torch.randn(1, length, HEADS, device=cuda) - 2, -torch.rand(HEADS, device=cuda), None, True,
                               (0.0, float("inf")), CHUNK)
    record: list = []
    kernels = {"states": (fwd, "_states_kernel"), "grads": (bwd, "_state_grads_kernel"), "ends": (fwd, "_segment_ends_kernel"),
               "carry": (fwd, "_carry_kernel")}
    real = {label: getattr(module, name) for label, (module, name) in kernels.items()}
    for label, (module, name) in kernels.items():
        setattr(module, name, TimedLaunches(real[label], label, record))

    def measure(title: str) -> None:
        for _ in range(2):  # compiles and, in megassm's own choice, autotunes
            fwd.chunk_states(x, B, dt, cs, seq_idx, None, CHUNK)
            bwd.state_grads(dy, C, cs, seq_idx, None, HEADS, CHUNK)
        torch.cuda.synchronize()
        record.clear()
        for _ in range(ITERATIONS):
            fwd.chunk_states(x, B, dt, cs, seq_idx, None, CHUNK)
            bwd.state_grads(dy, C, cs, seq_idx, None, HEADS, CHUNK)
        torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for label, start, end in record:
            totals[label] = totals.get(label, 0.0) + start.elapsed_time(end) / ITERATIONS
        print(f"{length} tokens, {title}: " + ", ".join(f"{label} {ms:.3f}" for label, ms in totals.items()) + " ms", flush=True)

    if not args.segments:
        segments = fwd.walk_segments(HEADS, triton.cdiv(length, CHUNK), cuda)
        measure(f"megassm's choice ({segments} segments)")
        return 0
    for segments in args.segments:
        fwd.walk_segments = lambda *_, count=segments: count
        for (block_p, block_n), stages, registers in TILES:
            config = triton.Config({"BLOCK_P": block_p, "BLOCK_N": block_n}, num_warps=4, num_stages=stages, maxnreg=registers)
            for kernel in (real["states"], real["grads"]):
                kernel.configs, kernel.cache = [config], {}
            measure(f"{segments} segments, tile {block_p} x {block_n}, {stages} stages, registers {registers or 'any'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
