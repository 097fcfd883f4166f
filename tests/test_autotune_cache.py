"""The record of Triton autotuning choices: what one process chose, the next one starts with."""

import fcntl
import json
import sys
import threading
import types

from megassm.ops import autotune_cache


class Config:
    def __init__(self, description: str):
        self.description = description

    def __str__(self) -> str:
        return self.description


class FakeAutotuner:
    """What triton.autotune makes, as far as the cache sees it: configs and a {key: config} cache."""

    def __init__(self, configs: list[str]):
        self.configs = [Config(c) for c in configs]
        self.cache = {}


def install_kernels(monkeypatch, configs: list[str]) -> FakeAutotuner:
    tuner = FakeAutotuner(configs)
    module = types.ModuleType("mamba_ssm.ops.triton.fake_kernels")
    module.fake_kernel = tuner
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return tuner


def test_choices_survive_a_new_process(monkeypatch, tmp_path):
    path = tmp_path / "autotune.json"
    first = install_kernels(monkeypatch, ["BLOCK 64", "BLOCK 128", "BLOCK 256"])
    first.cache[(256, 64, "torch.bfloat16")] = first.configs[2]
    first.cache[(128, 64, "torch.float32")] = first.configs[0]
    autotune_cache.record(path)

    later = install_kernels(monkeypatch, ["BLOCK 64", "BLOCK 128", "BLOCK 256"])  # a fresh process's kernels
    assert autotune_cache.restore(path) == 2
    assert later.cache == {(256, 64, "torch.bfloat16"): later.configs[2], (128, 64, "torch.float32"): later.configs[0]}


def test_a_changed_kernel_is_tuned_again_and_records_merge(monkeypatch, tmp_path):
    path = tmp_path / "autotune.json"
    first = install_kernels(monkeypatch, ["A", "B"])
    first.cache[(1,)] = first.configs[1]
    autotune_cache.record(path)
    changed = install_kernels(monkeypatch, ["A", "C"])  # position 1 now describes another configuration
    assert autotune_cache.restore(path) == 0 and changed.cache == {}
    changed.cache[(2,)] = changed.configs[0]
    autotune_cache.record(path)  # merged: the old list's choice stays recorded next to the new one's
    again = install_kernels(monkeypatch, ["A", "B"])
    assert autotune_cache.restore(path) == 1 and again.cache == {(1,): again.configs[1]}
    later = install_kernels(monkeypatch, ["A", "C"])
    assert autotune_cache.restore(path) == 1 and later.cache == {(2,): later.configs[0]}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_new_candidate_is_tried(monkeypatch, tmp_path):
    """A configuration added to a kernel's list: the recorded choice, still at its position, was made without it."""
    path = tmp_path / "autotune.json"
    first = install_kernels(monkeypatch, ["A", "B"])
    first.cache[(1,)] = first.configs[1]
    autotune_cache.record(path)
    grown = install_kernels(monkeypatch, ["A", "B", "C"])
    assert autotune_cache.restore(path) == 0 and grown.cache == {}


def test_entries_of_another_format_or_damaged_mean_tuning_again(monkeypatch, tmp_path):
    """[key, position, description] (the first format), and what a damaged or hand-edited file may hold: restored as
    nothing, dropped when the choices are next recorded."""
    path = tmp_path / "autotune.json"
    name = "mamba_ssm.ops.triton.fake_kernels.fake_kernel"
    tuner = install_kernels(monkeypatch, ["A", "B"])
    listed = autotune_cache.candidates(tuner)
    damaged = [[[1], 1, "B"], [[1], 1], [[1], 1, listed, "x"], [[2], 5, listed], [[3], -1, listed], [[4], True, listed],
               [[[5]], 0, listed], [6, 0, listed], None, {"key": [7]}]
    for content in ([], None, 3, {name: {"key": [1]}}, {name: damaged}):
        path.write_text(json.dumps(content))
        assert autotune_cache.restore(path) == 0 and tuner.cache == {}, content
    tuner.cache[(8,)] = tuner.configs[0]
    autotune_cache.record(path)
    assert json.loads(path.read_text()) == {name: [[[8], 0, listed]]}


def test_an_unreadable_record_means_tuning_again(monkeypatch, tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    tuner = install_kernels(monkeypatch, ["A"])
    assert autotune_cache.restore(path) == 0 and tuner.cache == {}


def test_processes_recording_together_merge_one_at_a_time(monkeypatch, tmp_path):
    """The ranks of a job record at exit together: one holding the file (its lock) while another records; the other's
    merge then reads what the first wrote."""
    path = tmp_path / "autotune.json"
    tuner = install_kernels(monkeypatch, ["A", "B"])
    listed = autotune_cache.candidates(tuner)
    tuner.cache[(2,)] = tuner.configs[1]
    with open(tmp_path / "autotune.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process, mid-merge
        recording = threading.Thread(target=autotune_cache.record, args=(path,))
        recording.start()
        recording.join(timeout=0.5)
        assert recording.is_alive(), "recorded while another process held the file"
        path.write_text(json.dumps({"mamba_ssm.ops.triton.fake_kernels.fake_kernel": [[[1], 0, listed]]}))
    recording.join(timeout=10)
    assert json.loads(path.read_text()) == {"mamba_ssm.ops.triton.fake_kernels.fake_kernel": [[[1], 0, listed], [[2], 1, listed]]}


def test_a_lock_held_too_long_is_merged_around(monkeypatch, tmp_path):
    """A process stalled holding the lock (a hung file system) holds the others' exit for LOCK_WAIT_S at most."""
    path = tmp_path / "autotune.json"
    tuner = install_kernels(monkeypatch, ["A", "B"])
    tuner.cache[(2,)] = tuner.configs[1]
    monkeypatch.setattr(autotune_cache, "LOCK_WAIT_S", 0.2)
    with open(tmp_path / "autotune.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recording = threading.Thread(target=autotune_cache.record, args=(path,), daemon=True)
        recording.start()
        recording.join(timeout=10)
        assert not recording.is_alive(), "waited for the stalled lock"
    assert autotune_cache.restore(path) == 1


def test_kernels_with_no_valid_entry_are_dropped(monkeypatch, tmp_path):
    path = tmp_path / "autotune.json"
    tuner = install_kernels(monkeypatch, ["A", "B"])
    good = [[1], 0, autotune_cache.candidates(tuner)]
    path.write_text(json.dumps({"k": [], "j": [[[1], "x", "y"], good]}))
    autotune_cache.record(path)
    assert json.loads(path.read_text()) == {"j": [good]}
