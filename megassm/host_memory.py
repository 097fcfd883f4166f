"""How much host memory the processes of a node may still take: Linux's MemAvailable, bounded by the cgroup's limit
(Slurm's --mem, a container's).

A process that takes more than that is killed by the kernel's OOM killer: no error, no line, a signal that torchrun
takes for a fault and restarts into the same end.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _meminfo_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" where there is no limit


def _inactive_file(folder: Path) -> int:
    """The cgroup's page cache the kernel reclaims first: counted in its usage, but not in the way of new memory."""
    try:
        fields = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return 0
    value = fields.get("total_inactive_file", fields.get("inactive_file", "0"))  # v1 counts the cgroups below as total_
    return int(value) if value.isdigit() else 0


def _cgroup_room(proc: Path, root: Path) -> int | None:
    """The least room (limit less usage, reclaimable page cache aside) of the process's cgroup and those above it;
    None where none has a limit. cgroup v2 ("0::/path") or v1's memory controller ("N:memory:/path")."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        folder, rooms = base / path.strip("/"), []
        while True:
            limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for no limit
                rooms.append(limit - max(usage - _inactive_file(folder), 0))
            if folder == base or folder == folder.parent:
                break
            folder = folder.parent
        if rooms:
            return max(min(rooms), 0)
    return None


def available(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """Bytes of host memory the node's processes of the job may still take together; None where the system does not
    say (not Linux)."""
    known = [room for room in (_meminfo_available(proc), _cgroup_room(proc, cgroup_root)) if room is not None]
    return min(known) if known else None
