"""tools/gpu_timeline.py's reading of a device timeline: events split into steps at the marker kernels, the idle time
between kernels, and where small kernels were launched, on hand-made timelines (the tool itself needs a GPU)."""

from types import SimpleNamespace

import torch

from tools.gpu_timeline import MARKER, ROOT, device_steps, idle_gaps, launch_sites


def event(name: str, start: float, end: float, device: bool = True) -> SimpleNamespace:
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=kind, time_range=SimpleNamespace(start=start, end=end))


def test_steps_start_at_markers_and_gaps_skip_overlaps():
    events = [event("late kernel of an earlier step", 0, 5), event(MARKER + "(long)", 6, 7), event("a", 10, 20),
              event("copy beside a", 12, 15), event("b", 22, 30), event("host op", 31, 40, device=False),
              event(MARKER + "(long)", 41, 42), event("c", 50, 60)]
    profile = SimpleNamespace(events=lambda: list(reversed(events)))  # any order: the tool sorts by start
    steps = device_steps(profile)
    assert [[e.name for e in step] for step in steps] == [["a", "copy beside a", "b"], ["c"]]
    assert idle_gaps(steps[0]) == [(2, "a", "b")]  # b starts 2 us after a ends; the copy overlaps a
    assert idle_gaps(steps[1]) == []
    # The gap is named after the event that ended last, not the one that started last.
    assert idle_gaps([event("a", 10, 20), event("long copy", 12, 25), event("b", 27, 30)]) == [(2, "long copy", "b")]


def test_small_kernels_are_grouped_by_the_innermost_repository_frames_around_their_launch():
    def frame(name, ts, dur, tid=1):
        return {"cat": "python_function", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(correlation, ts, tid=1):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid, "args": {"correlation": correlation}}

    def kernel(name, correlation, dur, cat="kernel"):
        return {"cat": cat, "name": name, "ts": 1000 + correlation, "dur": dur, "args": {"correlation": correlation}}

    # The profiler names a file by its path relative to the sys.path entry it came from, or by its full path.
    trace = [frame(f"{ROOT}/megassm/model/block.py(70): forward", 0, 100), frame("megassm/model/mixer.py(85): forward", 10, 50),
             frame("torch/nn/modules/module.py(1): _call_impl", 12, 40), frame("/usr/lib/python3/functools.py(1): wrapper", 13, 30),
             frame("megassm/model/mixer.py(123): A", 20, 5),
             launch(1, 21), launch(2, 22), launch(3, 30), launch(4, 70), launch(5, 22, tid=2), launch(6, 31),
             kernel("exp", 1, 2), kernel("neg", 2, 2), kernel("exp", 3, 3), kernel("Memset", 4, 1, "gpu_memset"), kernel("add", 5, 4),
             kernel("big matmul", 6, 500)]
    sites = launch_sites(trace, max_us=30, depth=2)
    in_A = "mixer.py(123): A < mixer.py(85): forward"
    assert sites == {("exp", in_A): [1, 2], ("neg", in_A): [1, 2],
                     ("exp", "mixer.py(85): forward < block.py(70): forward"): [1, 3],
                     ("Memset", "block.py(70): forward"): [1, 1],
                     ("add", ""): [1, 4]}  # launched on another thread (autograd's): no frames of ours; the long matmul left out
