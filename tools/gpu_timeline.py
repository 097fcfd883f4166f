"""Where a training step's GPU time goes between its kernels, on one GPU: kernels per step, GPU idle between them (by
gap size, and by the kernels before and after), the most frequent kernels, and the host's time per step against the
GPU's; or, with --by-line, which Python lines launch a step's small kernels.

    python tools/gpu_timeline.py [--case 780m:8x2048] [--steps 3] [--set train.cuda_graphs=false] [--by-line]

Why: a step's wall time exceeds the sum of its kernels by the gaps between them, and every small kernel (a cast, a
memset, a small reduction) costs its own run time plus one gap. The steps are built as tools/bench.py builds them
and queued back to back as the trainer queues them; a marker kernel queued before each one delimits them on the
device. The first profiled step is left out (the profiler may have synchronized before it): the others show the
device's own gaps, not the host catching up. --by-line profiles one step without CUDA graphs (a graph replays its
kernels without Python) and groups the kernels under --small-us each by name and by the innermost frames of this
repository's code around their launch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:  # torch and megassm are imported only where they are used
    import torch.profiler

    from megassm.metrics import StepTimer
    from megassm.train import Trainer

GAP_BINS_US = (5, 20, 100)  # idle reported below each of these gap lengths, then above the last


MARKER = "spin_kernel"  # torch.cuda._sleep's kernel, queued before each step


def device_steps(prof: torch.profiler.profile) -> list[list]:
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


def idle_gaps(events: list) -> list[tuple[float, str, str]]:
    """(idle us, the event that ended last before it, the event after it) for each event that starts after every earlier
    one has ended (overlapping events: no gap)."""
    gaps, busy_until, last = [], events[0].time_range.end, events[0].name
    for event in events[1:]:
        if event.time_range.start > busy_until:
            gaps.append((event.time_range.start - busy_until, last, event.name))
        if event.time_range.end >= busy_until:
            busy_until, last = event.time_range.end, event.name
    return gaps


def _in_repository(frame: str, root: str) -> bool:
    """Whether a profiler frame, "file(line): name", is in the repository at `root`. The profiler names files relative
    to the sys.path entry they were imported from (e.g. "megassm/model/lm.py"), or by their full path."""
    file = frame.split("(", 1)[0]
    return Path(file).is_relative_to(root) if Path(file).is_absolute() else (Path(root) / file).is_file()


def launch_sites(trace_events: list[dict], max_us: float, root: str = str(ROOT), depth: int = 4) -> dict[tuple[str, str], list]:
    """{(kernel name, where it was launched): [count, us]} of the GPU events (kernels, copies, memsets) under max_us
    each, from a Chrome trace recorded with Python stacks. A GPU event's launch is the runtime call with its correlation
    id; where: the `depth` innermost Python functions under `root` whose spans hold that call, on its thread, as
    "file.py(first line): name", innermost first ("" for launches outside them, e.g. autograd's backward thread)."""
    launches = {e["args"]["correlation"]: e for e in trace_events if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    frames: dict[int, list[dict]] = {}
    for e in trace_events:
        if e.get("cat") == "python_function" and _in_repository(e["name"], root):
            frames.setdefault(e["tid"], []).append(e)
    sites: dict[tuple[str, str], list] = {}
    for e in trace_events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset") or e["dur"] >= max_us:
            continue
        launch = launches.get(e["args"].get("correlation"))
        around = [] if launch is None else [f for f in frames.get(launch["tid"], []) if f["ts"] <= launch["ts"] <= f["ts"] + f["dur"]]
        around.sort(key=lambda f: -f["ts"])  # innermost (latest to start) first
        where = " < ".join(f["name"].rsplit("/", 1)[-1] for f in around[:depth])
        site = sites.setdefault((e["name"], where), [0, 0.0])
        site[0] += 1
        site[1] += e["dur"]
    return sites


def print_launch_sites(trainer: Trainer, step: int, timer: StepTimer, small_us: float, top: int) -> None:
    """One step profiled with Python stacks: its kernels under small_us each by launching line, the most frequent first."""
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        trainer.train_step(step, timer)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    sites = launch_sites(events, small_us)
    print(f"kernels under {small_us:g} us in one step without CUDA graphs, by launching Python line (innermost first):")
    for (name, where), (count, us) in sorted(sites.items(), key=lambda item: -item[1][0])[:top]:
        print(f"  {count:5d} {us:8.0f} us  {name[:60]} | {where or '(outside this repository: autograd, a library)'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="780m:8x2048", help="SIZE:BATCHxSEQLEN, as tools/bench.py takes it")
    parser.add_argument("--data", default="data/builtin")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiler starts (compilation, capture)")
    parser.add_argument("--steps", type=int, default=3, help="steps recorded")
    parser.add_argument("--top", type=int, default=30, help="list this many kernels (the most frequent first) and kernel pairs around gaps")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE, as tools/bench.py --set")
    parser.add_argument("--by-line", action="store_true", help="list where the step's small kernels are launched instead")
    parser.add_argument("--small-us", type=float, default=30.0, help="with --by-line: the kernels shorter than this")
    args = parser.parse_args()
    if args.by_line:
        args.set.append("train.cuda_graphs=false")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from megassm.metrics import StepTimer
    from megassm.train import Trainer
    from tools.bench import megassm_config, require_prepared_data

    if not torch.cuda.is_available():
        raise SystemExit("gpu_timeline: needs a CUDA GPU (it profiles the device's timeline)")
    require_prepared_data(args.data, "gpu_timeline")
    with tempfile.TemporaryDirectory() as run_dir:
        total = args.warmup + 1 + args.steps
        cfg = megassm_config(args.case, args.data, total, run_dir, args.set)
        trainer = Trainer(cfg)
        timer = StepTimer(trainer.device)
        for i in range(args.warmup):
            trainer.train_step(i, timer)
        if args.by_line:
            print_launch_sites(trainer, args.warmup, timer, args.small_us, args.top)
            return 0
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
    gaps_around = [gap for step in steps for gap in idle_gaps(step)]
    gaps = [us for us, _, _ in gaps_around]
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
    pair_counts, pair_times = Counter(), Counter()
    for us, before, after in gaps_around:
        pair_counts[before[:60], after[:60]] += 1
        pair_times[before[:60], after[:60]] += us
    print("  the kernel pairs with the most idle time between them:")
    for (before, after), us in pair_times.most_common(args.top):
        print(f"  {pair_counts[before, after] * per_step:7.1f}/step {us * per_step / 1e3:7.2f} ms/step  {before}  ->  {after}")
    counts, times = Counter(), Counter()
    for event in events:
        counts[event.name] += 1
        times[event.name] += event.time_range.elapsed_us()
    for name, count in counts.most_common(args.top):
        print(f"  {count * per_step:7.1f}/step {times[name] * per_step / 1e3:7.2f} ms/step {times[name] / count:8.1f} us each  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
