"""A disk cache of the Triton autotuning choices of the SSD's kernels (megassm's and mamba-ssm's).

Why: on first use each kernel benchmarks all its configurations for every new shape, about 2 minutes
per process on an H100, and Triton's own result cache (TRITON_CACHE_AUTOTUNING) skips every kernel
whose configurations carry a pre_hook, which most SSD backward kernels do. So we record, at exit,
which configuration each autotuner chose for each key, and give the choices back to the autotuners
when the kernels are next loaded: they then benchmark nothing they have seen before. The choice is
stored as the configuration's position in the kernel's list together with a digest of the whole list, so a
kernel whose candidates changed (one added, removed or altered) is tuned again among them rather than held
to a choice made without them. One file per GPU model, Triton and mamba-ssm version, under TRITON_CACHE_DIR
(default ~/.triton/cache); written atomically, merged with what is there by one process at a time (other lists'
choices are kept).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

KERNEL_MODULES = ("mamba_ssm.ops.triton.", "megassm.ops.ssd_triton")  # prefixes of the modules whose autotuners are recorded


def cache_file() -> Path:
    import torch
    import triton

    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    # "-2": entries that name their list's digest; a megassm of the first format keeps its own file.
    return folder / "megassm-autotune" / f"{gpu}-triton{triton.__version__}-mamba_ssm{version('mamba_ssm')}-2.json"


def autotuners() -> Iterator[tuple[str, object]]:
    """(module.name, autotuner) of every loaded kernel of KERNEL_MODULES: the objects that
    triton.autotune makes, with their list of `configs` and their `cache` {key: chosen config}."""
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith(KERNEL_MODULES) and module is not None:
            for name, value in vars(module).items():
                if isinstance(getattr(value, "configs", None), list) and isinstance(getattr(value, "cache", None), dict):
                    yield f"{module_name}.{name}", value


DIGEST = re.compile("[0-9a-f]{16}")


def candidates(tuner: object) -> str:
    """A digest of the autotuner's list of configurations (their descriptions, in order): DIGEST."""
    return hashlib.sha256("\n".join(str(c) for c in tuner.configs).encode()).hexdigest()[:16]


def _is_entry(entry: object) -> bool:
    """[key, position, digest of the list]: key a list of scalars (the autotuner's key), position an int >= 0."""
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], list)
            and all(isinstance(k, (str, int, float, bool)) for k in entry[0])
            and type(entry[1]) is int and entry[1] >= 0 and isinstance(entry[2], str) and DIGEST.fullmatch(entry[2]) is not None)


def _read(path: Path) -> dict[str, list[list]]:
    """{kernel: its entries}; anything else in the file (another format, a damaged file) is left out: tuned again."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable
    if not isinstance(saved, dict):
        return {}
    kept = {name: [e for e in entries if _is_entry(e)] for name, entries in saved.items() if isinstance(entries, list)}
    return {name: entries for name, entries in kept.items() if entries}


def restore(path: Path | None = None) -> int:
    """Give the recorded choices to the loaded autotuners; returns how many were restored."""
    saved, restored = _read(path or cache_file()), 0
    for name, tuner in autotuners():
        listed = candidates(tuner)
        for key, index, chosen_among in saved.get(name, []):
            if chosen_among == listed and index < len(tuner.configs):
                tuner.cache[tuple(key)] = tuner.configs[index]
                restored += 1
    return restored


LOCK_WAIT_S = 60.0  # a process holding the lock longer (a stalled file system) is merged around, not waited for


@contextlib.contextmanager
def _merging(path: Path) -> Iterator[None]:
    """One process at a time reads, merges and replaces the file (the ranks of a job record at exit together: each
    would otherwise replace the file with its own merge, losing the others' new choices). Unlocked where the lock
    cannot be had (no flock on the file system, a lock file of another user's, LOCK_WAIT_S gone by): a lost choice
    costs a later run its tuning time, nothing else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = os.open(path.with_name(f"{path.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            except OSError:
                break
        yield
    finally:
        os.close(lock)


def record(path: Path | None = None) -> None:
    """Merge the loaded autotuners' choices into the file (atomically: a new file renamed over it)."""
    path = path or cache_file()
    with _merging(path):
        _merge_into(path)


def _merge_into(path: Path) -> None:
    saved = _read(path)
    for name, tuner in autotuners():
        listed = candidates(tuner)
        entries = {json.dumps([key, among]): [key, index, among] for key, index, among in saved.get(name, [])
                   if among != listed or index < len(tuner.configs)}
        for key, config in tuner.cache.items():
            index = next((i for i, c in enumerate(tuner.configs) if c is config), None)
            if index is not None:
                entries[json.dumps([list(key), listed])] = [list(key), index, listed]
        if entries:
            saved[name] = list(entries.values())
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(saved, indent=1))
    os.replace(partial, path)
