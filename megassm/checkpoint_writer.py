"""torch.distributed.checkpoint's save in two halves, so that training goes on while a checkpoint is written.

The first half runs while training waits: DCP's plans (a collective), which give each item replicated over DP x CP
to one rank, then a copy of this rank's items in host memory. The second half runs in a thread: the rank writes its
items from that copy, posts what it wrote to the job's store (megassm/job_store.py), and on the coordinator the
thread collects every rank's results, writes DCP's metadata and completes the checkpoint (`on_complete`); every
rank's thread ends with the outcome, posted by the coordinator.

torch's own dcp.async_save copies every rank's whole state to the host, each DDP replica's included (an 8B model's
weights and AdamW state: 128 GB per rank), and runs its collectives from its thread, which needs a process group
beside the training's (gloo, reaching every node by host name). Here a rank copies only what it writes, and the
thread needs no collective.
"""

from __future__ import annotations

import collections
import datetime
import io
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from megassm import host_memory, job_store

# How long the coordinator's thread waits for the other ranks to report their writes.
WRITE_TIMEOUT = datetime.timedelta(hours=6)


# Host copies are carved out of buffers of this size: page-locked memory comes from torch's caching host allocator in
# sizes rounded up to a power of two, so one buffer per tensor could take up to twice the copies' size.
SLAB_BYTES = 1 << 30
ALIGNMENT = 64

# New host copies take at most this share of the host memory left to each process (megassm/host_memory.py, shared by
# the node's processes); where any rank's would take more, every rank writes from the live state while training waits.
HOST_MEMORY_SHARE = 0.5


class HostCopies:
    """Where a rank's items are copied to before they are written: slabs of host memory, page-locked for CUDA
    tensors, kept from one checkpoint to the next (a rank writes the same items each time; allocating them is slow)."""

    def __init__(self):
        self._layout: list | None = None
        self._views: dict[MetadataIndex, Tensor] = {}

    def new_bytes(self, tensors: dict[MetadataIndex, Tensor]) -> int:
        """The host memory that copies of `tensors` would newly take: none where the last copies fit them."""
        if _layout(tensors) == self._layout:
            return 0
        slabs, _ = _slabs([_aligned(t) for t in tensors.values()])
        return sum(_allocated(size, _pinned(tensors)) for size in slabs)

    def copied(self, tensors: dict[MetadataIndex, Tensor]) -> dict[MetadataIndex, Tensor]:
        """A host copy of each tensor (copies from the GPU are queued on the current stream: synchronize before use)."""
        layout = _layout(tensors)
        if layout != self._layout:
            self.release()
            self._layout, self._views = layout, self._carved(tensors)
        return {index: self._views[index].copy_(t, non_blocking=t.is_cuda) for index, t in tensors.items()}

    def release(self) -> None:
        """The copies let go, page-locked memory back to the system."""
        pinned = any(is_cuda for *_, is_cuda in self._layout or [])
        self._layout, self._views = None, {}
        if pinned:
            torch.accelerator.empty_host_cache()

    @staticmethod
    def _carved(tensors: dict[MetadataIndex, Tensor]) -> dict[MetadataIndex, Tensor]:
        """A tensor for each of `tensors` in slabs of host memory, each with a storage of its own over the slab's
        bytes: DCP's writer clones a tensor whose storage is larger."""
        sizes, pinned = [_aligned(t) for t in tensors.values()], _pinned(tensors)
        slab_sizes, places = _slabs(sizes)
        slabs = [torch.empty(size, dtype=torch.uint8, pin_memory=pinned).untyped_storage() for size in slab_sizes]
        return {index: torch.empty(0, dtype=t.dtype).set_(slabs[slab][offset:offset + t.numel() * t.element_size()], 0, t.shape)
                for (index, t), (slab, offset) in zip(tensors.items(), places)}


def _layout(tensors: dict[MetadataIndex, Tensor]) -> list:
    return [(index, t.shape, t.dtype, t.is_cuda) for index, t in tensors.items()]


def _pinned(tensors: dict[MetadataIndex, Tensor]) -> bool:
    """Whether copies of `tensors` are page-locked: where they come from the GPU."""
    return any(t.is_cuda for t in tensors.values())


def _aligned(t: Tensor) -> int:
    return -(-t.numel() * t.element_size() // ALIGNMENT) * ALIGNMENT


def _allocated(size: int, pinned: bool) -> int:
    """The bytes a buffer of `size` takes: torch's pinned allocator rounds it up to a power of two."""
    return 1 << (size - 1).bit_length() if pinned else size


def _slabs(sizes: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Slabs of at most SLAB_BYTES (an item larger than that gets one of its own) for items of `sizes`, in order: the
    slabs' sizes, and each item's (slab, offset)."""
    slabs, places, used, left = [], [], 0, sum(sizes)
    for size in sizes:
        if not slabs or used + size > slabs[-1]:
            slabs.append(max(min(left, SLAB_BYTES), size))
            used = 0
        places.append((len(slabs) - 1, used))
        used, left = used + size, left - size
    return slabs, places


class _CopiedPlanner(DefaultSavePlanner):
    """DCP's default planner, its items resolved once, from host copies where copy_items took them."""

    def resolve_items(self, plan: SavePlan) -> dict[MetadataIndex, Tensor]:
        """This rank's tensors to write, from the live state (where the writer reads them unless they are copied)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's updates, on whichever stream, are done
        self._items = {item.index: super(_CopiedPlanner, self).resolve_data(item) for item in plan.items}
        return {index: item for index, item in self._items.items() if isinstance(item, Tensor)}

    def copy_items(self, tensors: dict[MetadataIndex, Tensor], copies: HostCopies) -> None:
        self._items.update(copies.copied(tensors))
        if torch.cuda.is_available():
            # The copies are done before training changes the state again (nor does the pinned allocator track the
            # streams that use slices of its buffers).
            torch.cuda.synchronize()
        self.state_dict, self.mappings = {}, {}  # the live state (ZeRO: this rank's gathered share) is let go now

    def resolve_data(self, write_item: WriteItem) -> Tensor | io.BytesIO:
        return self._items[write_item.index]


class BackgroundWrite:
    """One checkpoint of `state_dict` into the folder `path`, written by a thread; planned when constructed (every rank
    constructs it: collectives). With `copies`, this rank's items are copied to host memory first (`copied`), and
    training may change the state as soon as the constructor returns; without, or where some rank's host memory
    lacks room for its copies (`short_of_host_memory`), the thread reads the live state: wait before changing it. On
    the coordinator (rank 0) the thread then waits for every rank's writes, writes DCP's metadata and calls
    `on_complete`; on every rank it ends once the coordinator has posted the outcome."""

    def __init__(self, state_dict: dict, path: Path, copies: HostCopies | None, on_complete: Callable[[], object] | None = None):
        self.path, self._on_complete = path, on_complete
        self._distributed = dist.is_initialized()
        self._rank = dist.get_rank() if self._distributed else 0
        self._device = torch.cuda.current_device() if torch.cuda.is_available() else None  # the thread's, for the live state
        # No copying ahead: it synchronizes a CUDA stream every 10 MB, from the thread, while training queues work.
        self._storage = FileSystemWriter(path, per_thread_copy_ahead=0)
        self._planner = DefaultSavePlanner() if copies is None else _CopiedPlanner()
        # Measured before planning, a collective: before any rank makes this checkpoint's copies.
        available = host_memory.available() if copies is not None else None
        self._plan, self._metadata, self._key = self._planned(state_dict)
        self.copied, self.short_of_host_memory = False, None
        if copies is not None:
            tensors = self._planner.resolve_items(self._plan)
            self.short_of_host_memory = self._shortest_of_host_memory(copies.new_bytes(tensors), available)
            if self.short_of_host_memory is None:
                self._planner.copy_items(tensors, copies)
                self.copied = True
            else:
                copies.release()
        self.result = None
        self.started = time.monotonic()
        self._error: BaseException | None = None
        self._abandoned = threading.Event()
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

    def _shortest_of_host_memory(self, needed: int, available: int | None) -> tuple[int, int] | None:
        """(bytes needed, bytes left to the process) of the rank whose new copies would take the largest share of the
        host memory left to it, where some rank's take more than HOST_MEMORY_SHARE; None where every rank has room.
        The same on every rank (a collective): where one waits for the checkpoint, all do, rather than wait for it
        in the next collective. A node's memory is shared by its processes of the job."""
        mine = (socket.gethostname(), needed, available)
        everyone = [mine]
        if self._distributed:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        processes = collections.Counter(host for host, _, _ in everyone)
        shares = [(needed, available // processes[host]) for host, needed, available in everyone if available is not None]
        short = [(needed, share) for needed, share in shares if needed > HOST_MEMORY_SHARE * share]
        return max(short, key=lambda pair: pair[0] / max(pair[1], 1)) if short else None

    def _write(self) -> None:
        try:
            if self._device is not None:
                torch.cuda.set_device(self._device)
            written, error = self._storage.write_data(self._plan, self._planner).wait(), None
        except BaseException as failure:  # reported to the coordinator, which then leaves the checkpoint incomplete
            written, error = [], f"rank {self._rank}: {type(failure).__name__}: {failure}"
        try:
            self._completed(written, error)
        except BaseException as failure:
            self._error = failure

    def _completed(self, written: list, error: str | None) -> None:
        """The checkpoint completed by the coordinator from every rank's (write results, error), or its failure raised,
        on every rank: a rank's part is over once the whole checkpoint is. The outcome comes through the job's store,
        which has no collective's timeout: another rank's write may take longer than NCCL's 10 minutes to end."""
        if not self._distributed:
            return self._complete([(written, error)])
        job_store.decided(self._key, (written, error), self._complete, WRITE_TIMEOUT, self._abandoned)

    def _complete(self, everyone: list[tuple[list, str | None]]) -> None:
        """On the coordinator: DCP's metadata from every rank's write results, then `on_complete`; or the first rank's
        error raised."""
        errors = [e for _, e in everyone if e is not None]
        if errors:
            raise OSError(errors[0] + (f" (and {len(errors) - 1} other ranks)" if len(errors) > 1 else ""))
        self._storage.finish(self._metadata, [results for results, _ in everyone])
        if self._on_complete is not None:
            self.result = self._on_complete()

    def done(self) -> bool:
        """Whether the checkpoint is complete, or has failed on some rank."""
        return not self._thread.is_alive()

    def abandon(self, wait: datetime.timedelta) -> None:
        """On the way out after an error: stop waiting for the other ranks, and give this rank's write up to `wait` to
        end (the thread is a daemon: one still inside torch's writer when the interpreter exits can abort the process,
        an exit code the launcher would take for a fault). The launcher's SIGTERM, sent once another rank has ended,
        is ignored meanwhile; a Ctrl-C ends the wait."""
        self._abandoned.set()
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            self._thread.join(wait.total_seconds())
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)

    def wait(self) -> None:
        """Until the checkpoint is complete; raises what stopped it on any rank."""
        self._thread.join()
        if self._error is not None:
            raise self._error
