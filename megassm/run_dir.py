"""A run folder belongs to one run: a lock while the run is alive, and checkpoints that only its own history
may replace.

`run.lock` is held with flock by the run's first process for as long as it lives (the kernel lets go when it
dies, however it dies) and says who holds it: host, process, its torchrun launcher, Slurm job, start time, command.
A lock file that nobody holds is stale once its processes are gone and is taken over with a warning; one written on
another host cannot be checked from here, so it is left to the user to delete, unless it is this Slurm job's own
(restarted or requeued after a node failed, its first process may now run on another node; still locked, as NFS may
keep a dead node's lock a while, where Slurm has requeued the job since).

The checkpoints of run.dir that a run neither resumes from nor continues are another history: a run from
scratch, from a checkpoint elsewhere, or from an older checkpoint of the folder stops rather than mixing with
them or rotating them away, unless checkpoint.overwrite lets it delete them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from megassm.checkpoint import (CONFIG_FILE, TRAINER_FILE, CheckpointError, checkpoint_step, checkpoints_folder, checkpoints_in,
                                step_folders)
from megassm.config import CheckpointConfig, Config, ConfigError, load_config
from megassm.errors import UserError
from megassm.host_memory import PROC
from megassm.metrics import METRICS_FILE, holds_records

LOCK_FILE = "run.lock"
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # what flock raises where a file system has none


class RunDirError(UserError, RuntimeError):
    """run.dir cannot be used by this run (another run holds it, or it cannot be written); the message says what to do."""


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def own_newest_checkpoint(run_dir: Path, attempts: list[dict]) -> Path | None:
    """run.dir's newest complete checkpoint where an earlier start of this launch wrote it (`attempts`: Owner.attempt
    of every rank, as a checkpoint's trainer state records them): this process is that run restarted by torchrun or
    requeued by Slurm. Another command in the same Slurm job or on the same host is not."""
    found = checkpoints_in(run_dir)
    if not found or not attempts:
        return None
    try:
        written_by = json.loads((found[-1] / TRAINER_FILE).read_text()).get("attempts", [])
    except (OSError, ValueError):
        return None  # unreadable: resuming from it says so
    return found[-1] if any(restarted(mine, theirs) for mine in attempts for theirs in written_by if isinstance(theirs, dict)) else None


def restarted(attempt: dict, earlier: dict) -> bool:
    """Whether the process of `attempt` is a later start of the launch of `earlier` (Owner.attempt of each): the same
    Slurm job requeued since, or the same torchrun agent restarting its workers."""
    requeued = attempt["slurm_job"] is not None and attempt["slurm_job"] == earlier.get("slurm_job") \
        and attempt["slurm_restart"] > earlier.get("slurm_restart", 0)
    by_agent = attempt["agent"] is not None and attempt["agent"] == earlier.get("agent") \
        and attempt["agent_restart"] > earlier.get("agent_restart", 0)
    return requeued or by_agent


def _started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot: with its pid and host, which agent it is (a container's
    agents may all have the same pid); None where /proc does not say."""
    try:
        return int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class Owner:
    """Who holds a run folder: the process, the torchrun agent that started it (which restarts it after a failure),
    and the Slurm job it belongs to (which keeps its id when requeued)."""

    host: str
    pid: int
    launcher_pid: int | None
    started: str
    command: str
    slurm_job: str | None = None
    slurm_restart: int = 0  # SLURM_RESTART_COUNT: how often Slurm requeued the job
    agent_restart: int = 0  # TORCHELASTIC_RESTART_COUNT: how often the torchrun agent restarted its workers
    launcher_started: int | None = None  # when the launcher started, in clock ticks since boot (Linux)

    @classmethod
    def this_process(cls) -> "Owner":
        launcher = os.getppid() if launched_by_torchrun() else None
        return cls(socket.gethostname(), os.getpid(), launcher,
                   time.strftime("%Y-%m-%d %H:%M:%S"), shlex.join([Path(sys.executable).name, *sys.orig_argv[1:]]),
                   os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                   int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0), _started(launcher) if launcher else None)

    @property
    def attempt(self) -> dict:
        """Which start of its launch this process is, as each checkpoint records it for every rank (restarted): its
        Slurm job and how often Slurm requeued it, its torchrun agent and how often that restarted its workers."""
        return {"slurm_job": self.slurm_job, "slurm_restart": self.slurm_restart,
                "agent": f"{self.host}:{self.launcher_pid}:{self.launcher_started}" if self.launcher_pid is not None else None,
                "agent_restart": self.agent_restart}

    def alive(self) -> bool:
        """Whether a process of that run still lives (on another host: unknown, so yes)."""
        if self.host != socket.gethostname():
            return True
        return any(_alive(pid) for pid in (self.pid, self.launcher_pid) if pid is not None)

    @property
    def launch(self) -> str | None:
        """What a restarted process of this run shares with the one before it: the Slurm job (kept when Slurm requeues
        it), else the torchrun agent (host and process) that restarts its workers; None when started by hand."""
        if self.slurm_job is not None:
            return f"slurm job {self.slurm_job}"
        return f"torchrun {self.host}:{self.launcher_pid}" if self.launcher_pid is not None else None

    def restarts(self, previous: "Owner") -> bool:
        """Whether this process is `previous`'s run started again: by the same torchrun agent, or in the same Slurm job."""
        return self.launch is not None and self.launch == previous.launch

    def requeued_from(self, previous: "Owner") -> bool:
        """Whether this process belongs to `previous`'s Slurm job requeued since: every process of that run is gone."""
        return self.slurm_job is not None and self.slurm_job == previous.slurm_job and self.slurm_restart > previous.slurm_restart

    def __str__(self) -> str:
        launcher = f", launched by pid {self.launcher_pid}" if self.launcher_pid is not None else ""
        return f"pid {self.pid} on {self.host}{launcher}, started {self.started}: {self.command}"


class RunLock:
    """Hold run_dir/run.lock for this process (a context manager); RunDirError when another live run holds it. The
    folders it made for run.dir (it and parents that did not exist) that hold nothing when it lets go (a start that
    failed) are removed."""

    def __init__(self, run_dir: Path, say: Callable[[str], None]):
        self.run_dir, self.path, self.say = Path(run_dir), Path(run_dir) / LOCK_FILE, say
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders it made, deepest first

    def __enter__(self) -> "RunLock":
        try:
            self._made = list(itertools.takewhile(lambda folder: not folder.exists(), (self.run_dir, *self.run_dir.absolute().parents)))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while not self._try_lock():
                pass
        except OSError as error:
            raise RunDirError(f"run.dir = {self.run_dir}: cannot write there ({error.strerror}): choose a folder you can write") from None
        return self

    def _try_lock(self) -> bool:
        """Lock the file now at self.path: False when it was replaced meanwhile (the holder let go and deleted it)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_owner(fd)
            os.close(fd)
            if holder is not None and holder.host != socket.gethostname() and Owner.this_process().requeued_from(holder):
                # NFS may keep a dead node's lock for a while: this job's own, from before Slurm requeued it.
                self.say(f"warning: {self.path} is still locked for this Slurm job's run before its requeue ({holder}); "
                         "this run takes it over")
                self.path.unlink(missing_ok=True)
                return False
            raise RunDirError(f"run.dir = {self.run_dir} is in use by another run ({holder or 'unknown'}): wait for it to end, "
                              "stop it, or choose another run.dir") from None
        except OSError as error:
            if error.errno not in NO_FLOCK:
                os.close(fd)
                raise
            # A file system without flock (some Lustre mounts): the owner's processes alone tell whether it runs.
        if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            return False
        me, holder = Owner.this_process(), _read_owner(fd)
        if holder is not None and not me.restarts(holder):
            if holder.alive():
                os.close(fd)
                raise RunDirError(f"run.dir = {self.run_dir} is in use by another run ({holder}): wait for it to end, stop it, "
                                  f"or choose another run.dir; if that run is not running any more, delete {self.path}")
            self.say(f"warning: {self.path} was left by a run that is no longer running ({holder}); this run takes it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me), indent=1) + "\n").encode(), 0)
        self._fd = fd
        return True

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):  # not empty: the run wrote into it
                for folder in self._made:
                    folder.rmdir()


def _read_owner(fd: int) -> Owner | None:
    """The owner a lock file names; None when it is empty (just created) or not one of ours."""
    try:
        return Owner(**json.loads(os.pread(fd, 1 << 16, 0)))
    except (ValueError, TypeError):
        return None


def check_checkpoints_writable(run_dir: Path) -> None:
    """RunDirError unless a file can be made in run.dir's checkpoints folder, or where it is yet to be made, in the
    folder that will hold it: said at start-up, not after the steps up to the first save. Nothing is left behind."""
    folder = checkpoints_folder(run_dir)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryFile(dir=next(path for path in (folder, *folder.parents) if path.exists())).close()
    except OSError as error:
        raise RunDirError(f"{folder}: cannot write checkpoints there ({error.strerror or error}): make it writable, choose another "
                          "run.dir, or set checkpoint.every = -1 to save none") from None


def in_run_dir(checkpoint: Path, run_dir: Path) -> bool:
    """Whether a checkpoint is one of run_dir's checkpoints/step_N."""
    return Path(checkpoint).resolve() in {p.resolve() for p in step_folders(run_dir)}


def checkpoints_to_replace(run_dir: Path, ckpt: CheckpointConfig) -> list[Path]:
    """run.dir's complete checkpoints outside the history of a run that resumes as ckpt.resume says: all of them for a
    run from scratch or from a checkpoint elsewhere, the later ones for a run from an older one of the folder, none
    for "auto" (the newest). CheckpointError naming them and the ways on, unless ckpt.overwrite allows deleting them."""
    if ckpt.resume == "auto":
        return []
    found = checkpoints_in(run_dir)
    start = Path(ckpt.resume)
    rewinds = ckpt.resume != "none" and in_run_dir(start, run_dir)
    if rewinds:
        found = [p for p in found if checkpoint_step(p) > checkpoint_step(start)]
    if not found or ckpt.overwrite:
        return found
    names = ", ".join(p.name for p in found[:3]) + (f", ... {found[-1].name} ({len(found)})" if len(found) > 3 else "")
    ways = "choose another run.dir, or set checkpoint.overwrite = true to delete them"
    if rewinds:
        raise CheckpointError(f"run.dir = {run_dir} holds checkpoints after {start.name} ({names}) that a run resumed from it "
                              f"would mix with: continue from the newest with checkpoint.resume = 'auto', {ways}")
    started = "= 'none' starts a new run" if ckpt.resume == "none" else f"= {ckpt.resume} continues another run"
    raise CheckpointError(f"run.dir = {run_dir} holds the checkpoints of another run ({names}) and checkpoint.resume {started}: "
                          f"continue that run with checkpoint.resume = 'auto', {ways}")


def check_log_not_replaced(run_dir: Path, cfg: Config, checkpoints: list[Path]) -> None:
    """CheckpointError where this run, which continues none of run.dir's checkpoints (`checkpoints`: those it resumes
    from), would take over the log of another run: run.dir's metrics.jsonl logs steps and its config.toml is not this
    run's (a run without checkpoints, e.g. a benchmark with checkpoint.every = -1). The same run started again before
    its first checkpoint goes on; checkpoint.overwrite = true replaces the log."""
    if cfg.checkpoint.overwrite or any(in_run_dir(p, run_dir) for p in checkpoints) or not holds_records(run_dir):
        return
    try:
        theirs = _flat(load_config(run_dir / CONFIG_FILE, world_size=None).to_dict())
        ours = _flat(cfg.to_dict())
        differ = [f"{key} {theirs.get(key)} -> {ours.get(key)}" for key in sorted(set(theirs) | set(ours))
                  if theirs.get(key) != ours.get(key)]
    except ConfigError as error:
        differ = [f"its {CONFIG_FILE} cannot be read: {error}"]
    if differ:
        raise CheckpointError(f"run.dir = {run_dir} holds the log of another run ({METRICS_FILE}; {', '.join(differ[:4])}"
                              f"{', ...' if len(differ) > 4 else ''}) and no checkpoint of it to continue from: choose another "
                              "run.dir, or set checkpoint.overwrite = true to replace that log")


def _flat(sections: dict) -> dict:
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}

