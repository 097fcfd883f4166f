"""Where a training step's GPU time goes between its kernels, on one GPU: kernels per step, GPU idle between them (by
gap size), the most frequent kernels, and the host's time per step against the GPU's.

    python tools/gpu_timeline.py [--case 780m:8x2048] [--steps 3] [--set train.cuda_graphs=false]

Why: a step's wall time exceeds the sum of its kernels by the gaps between them, and every small kernel (a cast, a
memset, a small reduction) costs its own run time plus one gap. The steps are built as tools/bench.py builds them
and queued back to back as the trainer queues them; a marker kernel queued before each one delimits them on the
device. The first profiled step is left out (the profiler may have synchronized before it): the others show the
device's own gaps, not the host catching up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GAP_BINS_US = (5, 20, 100)  # idle reported below each of these gap lengths, then above the last


MARKER = "spin_kernel"  # torch.cuda._sleep's kernel, queued before each step


def device_steps(prof) -> list[list]:
    """The kernels, copies and memsets the profiler saw, in start order, one list per step (between markers); the
    events before the first marker (earlier steps') are dropped."""
    import torch

    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    steps: list[list] = []
    for event in events:
        if MARKER in event.name:
            steps.append([])
        elif steps:
            steps[-1].append(event)
    return steps


def idle_gaps_us(events: list) -> list[float]:
    """The idle time before each event that starts after every earlier one has ended (overlapping events: none)."""
    gaps, busy_until = [], events[0].time_range.end
    for event in events[1:]:
        if event.time_range.start > busy_until:
            gaps.append(event.time_range.start - busy_until)
        busy_until = max(busy_until, event.time_range.end)
    return gaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="780m:8x2048", help="SIZE:BATCHxSEQLEN, as tools/bench.py takes it")
    parser.add_argument("--data", default="data/builtin")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiler starts (compilation, capture)")
    parser.add_argument("--steps", type=int, default=3, help="steps recorded")
    parser.add_argument("--top", type=int, default=30, help="list this many kernels, the most frequent first")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE, as tools/bench.py --set")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from megassm.metrics import StepTimer
    from megassm.train import Trainer, open_data
    from tools.bench import megassm_config, require_prepared_data

    if not torch.cuda.is_available():
        raise SystemExit("gpu_timeline: needs a CUDA GPU (it profiles the device's timeline)")
    require_prepared_data(args.data, "gpu_timeline")
    with tempfile.TemporaryDirectory() as run_dir:
        total = args.warmup + 1 + args.steps
        cfg = megassm_config(args.case, args.data, total, run_dir, args.set)
        trainer = Trainer(cfg, open_data(cfg))
        timer = StepTimer(trainer.device)
        for i in range(args.warmup):
            trainer.train_step(i, timer)
        host_s = []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(args.warmup, total):
                torch.cuda._sleep(1)
                started = time.perf_counter()
                trainer.train_step(i, timer)
                host_s.append(time.perf_counter() - started)
            torch.cuda.synchronize()
    steps = device_steps(prof)[1:]
    events = [e for step in steps for e in step]
    gaps = [g for step in steps for g in idle_gaps_us(step)]
    per_step = 1 / len(steps)
    span_us = sum(step[-1].time_range.end - step[0].time_range.start for step in steps)
    print(f"{args.case} {' '.join(args.set)}: {len(events) * per_step:.0f} kernels/step; GPU {span_us * per_step / 1e3:.1f} ms/step from "
          f"its first kernel to its last, idle between kernels {sum(gaps) * per_step / 1e3:.2f} ms; the host queues a step in "
          f"{1e3 * sum(host_s[1:]) / len(host_s[1:]):.1f} ms")
    low = 0.0
    for high in (*GAP_BINS_US, float("inf")):
        chosen = [g for g in gaps if low <= g < high]
        print(f"  gaps {low:g}-{high:g} us: {len(chosen) * per_step:.0f}/step, {sum(chosen) * per_step / 1e3:.2f} ms/step")
        low = high
    counts, times = Counter(), Counter()
    for event in events:
        counts[event.name] += 1
        times[event.name] += event.time_range.elapsed_us()
    for name, count in counts.most_common(args.top):
        print(f"  {count * per_step:7.1f}/step {times[name] * per_step / 1e3:7.2f} ms/step {times[name] / count:8.1f} us each  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
