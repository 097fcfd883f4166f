"""How a run stops other than at its last step: on SIGINT, SIGTERM or SIGHUP, and with its launcher.

The first SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption, torchrun passing any of them on) or SIGHUP (the terminal
closed: an ssh session dropped; not where it is ignored, as under nohup) asks the run to stop after the step in
progress: every rank learns of it at the end of that step, so all of them save the same checkpoint before they exit.
A second SIGINT (Ctrl-C again) stops the process at once, and so does a SIGTERM after a SIGINT (torchrun passes a
second Ctrl-C on as SIGTERM); a second SIGTERM alone does not, as one stop brings several: Slurm signals every process
of the job step, and torchrun passes its own on.

torchrun starts each worker in a session of its own, so a `kill -9` of torchrun (or of its process group) would
leave the workers training and writing into run.dir; here they die with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

from megassm.errors import UserError
from megassm.host_scalar import HostScalar

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """The run stopped on a signal; the message says where, and how to go on."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


# The stop flag a rank with a failure adds to its signal's number (signal numbers are below it).
FAILED = 256


class FailedElsewhere(UserError):
    """Another rank stops the run with a failure of its own, which it reports."""


class StopSignals:
    """While active (a context manager, in the main thread): the first of STOP_SIGNALS is recorded for
    `requested`; a SIGINT after it, or a SIGTERM after a SIGINT, raises Stopped with immediate_stop(SIGINT)'s message,
    wherever the run is: a second Ctrl-C, also where torchrun passed it on as SIGTERM."""

    def __init__(self, immediate_stop: Callable[[int], str]):
        self.immediate_stop = immediate_stop
        self.received: int | None = None
        self._reduced: HostScalar | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        elif signal.SIGINT in (signum, self.received):
            raise Stopped(signal.SIGINT, self.immediate_stop(signal.SIGINT))

    def requested(self, device: torch.device, failure: UserError | None = None) -> int | None:
        """The signal any rank received, on every rank, else None; with a `failure` on some rank (a mistake found
        while training goes on: a checkpoint that could not be written), every rank raises it instead (this rank's own
        where it has one, else FailedElsewhere). Distributed, a collective over all ranks, called once per step: the
        flags reduced at the previous call, so that reading them waits only for the work queued before that call (all
        ranks stop after the same step, the one after the signal's or the failure's)."""
        if not dist.is_initialized():
            if failure is not None:
                raise failure
            return self.received
        # Filled on the device: a tensor copied from the host would wait for the step just queued.
        flags = torch.full((), (FAILED if failure is not None else 0) + (self.received or 0), dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        previous, self._reduced = self._reduced, HostScalar(flags)
        reduced = 0 if previous is None else int(previous.item())
        if reduced >= FAILED:
            raise failure or FailedElsewhere("stopped with an error another rank reports")
        return reduced or None

    def __enter__(self) -> "StopSignals":
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS
                          if not (signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN)}  # nohup's stays
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def die_with_launcher() -> None:
    """End this process as soon as its parent, the torchrun agent, is gone: on Linux the kernel sends SIGKILL
    (PR_SET_PDEATHSIG), elsewhere a thread watches the parent."""
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=exit_when_orphaned, args=(launcher,), daemon=True).start()
    if os.getppid() != launcher:  # it died before the kernel was asked
        os._exit(1)


def exit_when_orphaned(parent: int, every_s: float = 0.5) -> None:
    """Poll until this process is no longer `parent`'s child, then exit at once."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)
