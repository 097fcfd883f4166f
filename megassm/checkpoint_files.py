"""Which file of a damaged checkpoint is missing or cut short, from DCP's own index of its files.

DCP reports an unreadable checkpoint as a CheckpointException holding each rank's traceback, naming
no file; its `.metadata` lists every tensor's file, offset and length, which is enough to name the
file at fault without reading any tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp

METADATA_FILE = ".metadata"


def first_damaged_file(checkpoint: Path) -> str | None:
    """"FILE is missing" or "FILE is cut short (N of M bytes)" for the first such file of the checkpoint
    (.metadata included), None when every file is there and long enough (its bytes may still be wrong)."""
    metadata = checkpoint / METADATA_FILE
    if not metadata.is_file():
        return f"{metadata} is missing"
    try:
        storage = dcp.FileSystemReader(checkpoint).read_metadata().storage_data
    except Exception as error:  # noqa: BLE001 -- an unpickling failure can raise almost anything
        return f"{metadata} cannot be read ({type(error).__name__})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = checkpoint / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size < size:
            return f"{file} is cut short ({file.stat().st_size} of {size} bytes)"
    return None
