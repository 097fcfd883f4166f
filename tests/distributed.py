"""Run a function in several CPU processes joined by gloo, as torchrun would start them."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# torchrun's rendezvous on a port the kernel picks as torchrun binds it (as torchrun --standalone does): no other
# process (another pytest-xdist worker's job) can take it between its choice and its use.
RDZV_ENDPOINT = "127.0.0.1:0"


@contextmanager
def reserved_port() -> Iterator[int]:
    """A free port, held while the block runs (bound with SO_REUSEADDR, not listening): no other process binds it or
    connects from it, while rank 0's TCPStore (SO_REUSEADDR too) may listen on it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, environ: dict[str, str], args: tuple) -> None:
    os.environ.clear()  # the caller's environment now, not the fork server's from when it started
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _callers() -> list[str]:
    """The modules imported so far (pytest imports every test module it collects) that call run_distributed."""
    return [name for name, module in list(sys.modules.items()) if getattr(module, "run_distributed", None) is run_distributed]


def run_distributed(fn: Callable, world_size: int, *args) -> None:
    """fn(*args) in world_size processes (RANK, WORLD_SIZE, MASTER_* set); a failure in any re-raises here.
    The processes fork from a server that imported torch and the calling test modules once (with spawn each
    process imports them anew: 2-4 s apiece); the server runs no test, so each process starts as a fresh one would."""
    multiprocessing.set_forkserver_preload(["torch", *_callers()])  # read when the server starts: at the first call
    with reserved_port() as port:
        mp.start_processes(_entry, args=(fn, world_size, port, dict(os.environ), args), nprocs=world_size, start_method="forkserver")
