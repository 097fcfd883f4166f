"""torchrun with one-line failures, as launch/torchrun.sh runs it:

    python -m megassm.torchrun [torchrun's options] -m megassm.train [the trainer's arguments]

Before any process starts, the trainer's config is checked against the world size about to start
(nnodes x nproc_per_node), so a layout that does not fit stops with the trainer's one line. A trainer
process that fails has printed why itself (rank 0, one line): torchrun's report of the failure (its
traceback and a table per rank) is left out, and the exit code is the process's own. A run stopped by a
mistake the user must fix (a data or checkpoint error found after the start) is not restarted by
--max-restarts: it would stop at it again, after a start's time, as often as restarts remain; nor is one stopped by a
signal to its workers (they saved a checkpoint and exited, as asked).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import determine_local_world_size, parse_args, parse_min_max_nnodes, run

from megassm.config import ConfigError, check_command_line
from megassm.errors import TRAINER_PROGRAM, USER_ERROR_EXIT, imports_done
from megassm.stopping import STOP_SIGNALS

TRAINER = "megassm.train"
SHARED_STORE_OFF = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # seconds torchrun waits for stopped workers before it kills them
PROCESS_LOGGER = "torch.distributed.elastic.multiprocessing.api"  # torchrun's reports of its worker processes
AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"  # its agent's, among them that a signal stops the workers


def world_size(nnodes: str, nproc_per_node: str) -> int | None:
    """The number of processes torchrun will start, or None for an elastic range of nodes ("1:4")."""
    min_nodes, max_nodes = parse_min_max_nnodes(nnodes)
    return max_nodes * determine_local_world_size(nproc_per_node) if min_nodes == max_nodes else None


# A worker's exit codes that end the run rather than restart it: a mistake the user must fix, and a stop asked for by a
# signal to the workers alone (Ctrl-C in one node's terminal, a pod's eviction), after which the run saved and exited.
DELIBERATE_EXITS = {USER_ERROR_EXIT, *(128 + signum for signum in STOP_SIGNALS)}


def restart_only_after_faults() -> None:
    """torchrun's agent restarts failed workers while restarts remain; where a worker stopped deliberately
    (DELIBERATE_EXITS) and every other failed one did too or is one the agent then stopped (SIGTERM, or SIGKILL after
    its grace period), it is told that none remain. (No public hook: the agent's monitor is wrapped.)"""
    monitor = getattr(LocalElasticAgent, "_monitor_workers", None)
    if monitor is None or getattr(monitor, "restart_only_after_faults", False):
        return  # a torch whose agent has no such method restarts as it does

    def monitor_workers(agent: LocalElasticAgent, worker_group: WorkerGroup) -> RunResult:
        result = monitor(agent, worker_group)
        codes = {failure.exitcode for failure in result.failures.values()} if result.is_failed() else set()
        if codes & DELIBERATE_EXITS and codes <= DELIBERATE_EXITS | {-signal.SIGTERM, -signal.SIGKILL}:
            agent._remaining_restarts = 0
        return result

    monitor_workers.restart_only_after_faults = True
    LocalElasticAgent._monitor_workers = monitor_workers


class ProcessReports(logging.Filter):
    """torchrun's reports of each failed or stopped process repeat what the trainer printed: left out. One is kept in
    mind: a worker that did not stop within the grace period after a signal and was killed (its save may be missing)."""

    killed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Unable to shutdown process"):
            ProcessReports.killed = True
        return False


def port_taken(endpoint: str) -> bool:
    """Whether the rendezvous port of a one-node run, host:port, is bound by another program (then torchrun's store
    would wait for a rendezvous that never comes, and fail after its timeout naming no cause). Port 0: the kernel picks."""
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return False
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torchrun's store binds it: a port in TIME_WAIT is free
        try:
            probe.bind((host or "127.0.0.1", int(port)))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def main(argv: list[str] | None = None) -> int:
    imports_done()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.module and args.training_script == TRAINER:
        if {"-h", "--help"} & set(args.training_script_args):
            from megassm.train import main as trainer  # its help, once: not once per process

            return trainer(["--help"])
        try:
            check_command_line(args.training_script_args, world_size(args.nnodes, args.nproc_per_node))
        except ConfigError as error:
            print(f"{TRAINER_PROGRAM}: error: {error}", file=sys.stderr)
            return USER_ERROR_EXIT
        restart_only_after_faults()
    if parse_min_max_nnodes(args.nnodes)[1] == 1 and port_taken(args.rdzv_endpoint):
        print(f"megassm-torchrun: the rendezvous port {args.rdzv_endpoint} is in use by another program (another run on this host?): "
              "set MASTER_PORT to a free port, or leave it unset on one node", file=sys.stderr)
        return USER_ERROR_EXIT
    logging.getLogger(PROCESS_LOGGER).addFilter(ProcessReports())
    # "Received SIGINT death signal, shutting down workers": the workers say where they stopped themselves.
    logging.getLogger(AGENT_LOGGER).addFilter(lambda record: "death signal" not in record.getMessage())
    if parse_min_max_nnodes(args.nnodes)[1] > 1 and args.max_restarts > 0:
        # Several nodes that may restart: each rendezvous round's workers get a store of their own (hosted by rank 0
        # on a port found free), not the agents' shared one, where restarted workers would meet the dead workers' keys
        # under names they cannot tell apart across nodes (parallel/context.py).
        os.environ.setdefault(SHARED_STORE_OFF, "1")
    # On SIGTERM torchrun passes it on and kills its workers after this many seconds (its default: 30): time to end
    # the step in progress and save its checkpoint (megassm/stopping.py).
    os.environ.setdefault(SHUTDOWN_TIMEOUT, "300")
    try:
        run(args)
    except SignalException as signalled:  # torchrun stopped (SIGTERM, SIGINT), its workers after it: they said where
        if ProcessReports.killed:
            print(f"megassm-torchrun: a worker did not stop within {os.environ[SHUTDOWN_TIMEOUT]} s of "
                  f"{signal.Signals(signalled.sigval).name} and was killed: this stop's checkpoint may be missing (the run resumes "
                  f"from its newest complete one); {SHUTDOWN_TIMEOUT} sets the wait", file=sys.stderr)
            return 128 + signal.SIGKILL
        return 128 + signalled.sigval
    except RendezvousError as error:  # the node hosting the rendezvous is gone (it says why, or its node failed)
        print(f"megassm-torchrun: lost the rendezvous at {args.rdzv_endpoint} ({type(error).__name__}): the node hosting it "
              "stopped; its output says why", file=sys.stderr)
        return 1
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(f"megassm-torchrun: rank {rank} (pid {failure.pid}) was killed by signal {-failure.exitcode} ({failure.signal_name()})",
              file=sys.stderr)
        return 128 - failure.exitcode  # as a shell reports a killed command
    return 0


if __name__ == "__main__":
    sys.exit(main())
