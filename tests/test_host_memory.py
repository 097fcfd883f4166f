"""The host memory a process may take, read from a /proc and a cgroup tree the tests write."""

from __future__ import annotations

from pathlib import Path

import pytest

from megassm.host_memory import available

GIB = 1 << 30


def fake_system(tmp_path: Path, mem_available_kib: int | None, cgroup_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    if mem_available_kib is not None:
        (proc / "meminfo").write_text(f"MemTotal:       999999999 kB\nMemFree:          1000 kB\nMemAvailable:   {mem_available_kib} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text + "\n")
    return proc, cgroup


def test_without_a_cgroup_limit_the_node_s_available_memory_counts(tmp_path):
    proc, cgroup = fake_system(tmp_path, 64 * GIB // 1024, "0::/", {"memory.max": "max", "memory.current": str(GIB)})
    assert available(proc, cgroup) == 64 * GIB


def test_a_cgroup_v2_limit_above_the_process_s_cgroup_bounds_it(tmp_path):
    """Slurm sets the job's limit; the step's cgroup below it has none of its own."""
    files = {"slurm/job_7/memory.max": str(40 * GIB), "slurm/job_7/memory.current": str(30 * GIB),
             "slurm/job_7/step_0/memory.max": "max", "slurm/job_7/step_0/memory.current": str(29 * GIB)}
    proc, cgroup = fake_system(tmp_path, 500 * GIB // 1024, "0::/slurm/job_7/step_0", files)
    assert available(proc, cgroup) == 10 * GIB


def test_reclaimable_page_cache_is_room(tmp_path):
    """Data read and checkpoints written fill the cgroup's page cache up to its limit; the inactive part is reclaimed
    before anything is killed."""
    files = {"memory.max": str(40 * GIB), "memory.current": str(39 * GIB), "memory.stat": f"anon 1000\ninactive_file {25 * GIB}\n"}
    proc, cgroup = fake_system(tmp_path, 500 * GIB // 1024, "0::/", files)
    assert available(proc, cgroup) == 26 * GIB


def test_cgroup_v1_memory_controller_and_its_no_limit_value(tmp_path):
    lines = "4:memory:/docker/abc\n3:cpu:/docker/abc\n0::/"
    limited = {"memory/docker/abc/memory.limit_in_bytes": str(16 * GIB), "memory/docker/abc/memory.usage_in_bytes": str(6 * GIB),
               "memory/docker/abc/memory.stat": f"inactive_file {GIB}\ntotal_inactive_file {2 * GIB}\n",
               "memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": str(100 * GIB)}
    proc, cgroup = fake_system(tmp_path / "a", 100 * GIB // 1024, lines, limited)
    assert available(proc, cgroup) == 12 * GIB
    unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": str(GIB)}
    proc, cgroup = fake_system(tmp_path / "b", 100 * GIB // 1024, lines, unlimited)  # the process's cgroup not visible
    assert available(proc, cgroup) == 100 * GIB


@pytest.mark.parametrize("mem_available_kib", [None, 3 * GIB // 1024])
def test_what_the_system_does_not_say_is_not_guessed(tmp_path, mem_available_kib):
    proc, cgroup = fake_system(tmp_path, mem_available_kib, "0::/\nnot a cgroup line", {"memory.max": "max", "memory.current": "1"})
    assert available(proc, cgroup) == (None if mem_available_kib is None else 3 * GIB)
