"""tools/gpu_timeline.py's reading of a device timeline: events split into steps at the marker kernels, and the idle
time between kernels, on a hand-made timeline (the tool itself needs a GPU)."""

from types import SimpleNamespace

import torch

from tools.gpu_timeline import MARKER, device_steps, idle_gaps_us


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
    assert idle_gaps_us(steps[0]) == [2]  # b starts 2 us after a ends; the copy overlaps a
    assert idle_gaps_us(steps[1]) == []
