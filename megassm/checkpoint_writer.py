"""torch.distributed.checkpoint's save in two halves, so that training goes on while a checkpoint is written.

The first half runs while training waits: DCP's plans (a collective), which give each item replicated over DP x CP
to one rank, then a copy of this rank's items in host memory. The second half runs in a thread: the rank writes its
items from that copy, posts what it wrote to the job's store (megassm/job_store.py), and on the coordinator the
thread collects every rank's results, writes DCP's metadata and completes the checkpoint (`on_complete`).

torch's own dcp.async_save copies every rank's whole state to the host, each DDP replica's included (an 8B model's
weights and AdamW state: 128 GB per rank), and runs its collectives from its thread, which needs a process group
beside the training's (gloo, reaching every node by host name). Here a rank copies only what it writes, and the
thread needs no collective.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from megassm import job_store

# How long the coordinator's thread waits for the other ranks to report their writes.
WRITE_TIMEOUT = datetime.timedelta(hours=6)


class HostCopies:
    """Where a rank's items are copied to before they are written: buffers kept from one checkpoint to the next (a rank
    writes the same items each time; allocating them is slow), page-locked for CUDA tensors."""

    def __init__(self):
        self._buffers: dict[MetadataIndex, Tensor] = {}

    def copy(self, index: MetadataIndex, tensor: Tensor) -> Tensor:
        buffer = self._buffers.get(index)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[index] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        return buffer.copy_(tensor, non_blocking=tensor.is_cuda)

    def keep_only(self, indices: set[MetadataIndex]) -> None:
        """Let go of the buffers of items this rank no longer writes."""
        self._buffers = {index: buffer for index, buffer in self._buffers.items() if index in indices}


class _CopiedPlanner(DefaultSavePlanner):
    """DCP's default planner, its items resolved from the host copies `copy_items` took, not from the live state."""

    def copy_items(self, plan: SavePlan, copies: HostCopies) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's updates, on whichever stream, are done
        self._copies = {item.index: self._copied(item, copies) for item in plan.items}
        copies.keep_only(set(self._copies))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are, before training changes the state again

    def _copied(self, item: WriteItem, copies: HostCopies):
        data = super().resolve_data(item)
        return copies.copy(item.index, data) if isinstance(data, Tensor) else data

    def resolve_data(self, write_item: WriteItem):
        return self._copies[write_item.index]


class BackgroundWrite:
    """One checkpoint of `state_dict` into the folder `path`: plans and copies this rank's items when constructed
    (every rank constructs it: collectives), then writes them in a thread. On the coordinator (rank 0) the thread
    then waits for every rank's writes, writes DCP's metadata and calls `on_complete`."""

    def __init__(self, state_dict: dict, path: Path, copies: HostCopies, on_complete: Callable[[], object] | None = None):
        self.path, self._on_complete = path, on_complete
        self._distributed = dist.is_initialized()
        self._rank = dist.get_rank() if self._distributed else 0
        self._storage = FileSystemWriter(path)
        self._planner = _CopiedPlanner()
        self._plan, self._metadata, self._key = self._planned(state_dict)
        self._planner.copy_items(self._plan, copies)
        self.result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name=f"checkpoint {path}", daemon=True)
        self._thread.start()

    def _planned(self, state_dict: dict) -> tuple[SavePlan, Metadata | None, str]:
        """This rank's final plan, the metadata (on the coordinator) and the store key for this write's results."""
        coordinator = self._rank == 0
        self._planner.set_up_planner(state_dict, self._storage.storage_meta(), coordinator)
        self._storage.set_up_storage_writer(coordinator)
        local = self._storage.prepare_local_plan(self._planner.create_local_plan())
        if self._distributed:
            gathered = [None] * dist.get_world_size() if coordinator else None
            dist.gather_object(local, gathered, dst=0)
        else:
            gathered = [local]
        metadata, outgoing = None, None
        if coordinator:
            plans, metadata = self._planner.create_global_plan(gathered)
            key = f"megassm/checkpoint/{uuid.uuid4().hex}"
            outgoing = [(plan, key) for plan in self._storage.prepare_global_plan(plans)]
        if self._distributed:
            received = [None]
            dist.scatter_object_list(received, outgoing, src=0)
            plan, key = received[0]
        else:
            plan, key = outgoing[0]
        return self._planner.finish_plan(plan), metadata, key

    def _write(self) -> None:
        try:
            written, error = self._storage.write_data(self._plan, self._planner).wait(), None
        except Exception as failure:  # reported to the coordinator, which then leaves the checkpoint incomplete
            written, error = [], f"rank {self._rank}: {type(failure).__name__}: {failure}"
        try:
            everyone = self._reported(written, error)
            if everyone is None:
                return
            errors = [e for _, e in everyone if e is not None]
            if errors:
                raise OSError("; ".join(errors))
            self._storage.finish(self._metadata, [results for results, _ in everyone])
            if self._on_complete is not None:
                self.result = self._on_complete()
        except BaseException as failure:
            self._error = failure

    def _reported(self, written: list, error: str | None) -> list | None:
        """Every rank's (write results, error) on the coordinator; None elsewhere, once this rank's are posted."""
        if not self._distributed:
            return [(written, error)]
        job_store.post(self._key, (written, error))
        if self._rank != 0:
            return None
        everyone = job_store.collect(self._key, WRITE_TIMEOUT)
        job_store.forget(self._key)
        return everyone

    def done(self) -> bool:
        """Whether this rank's part is over (on the coordinator: the whole checkpoint, or its failure on any rank)."""
        return not self._thread.is_alive()

    def wait(self) -> None:
        """Until this rank's part is over; raises what stopped it (on the coordinator: a failure on any rank)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
