"""Decisions through the job's store in several gloo processes: a mistake of one rank stops every rank with its line,
and a rank that never reports is named after one timeout."""

import datetime
import socket
import time

import pytest
import torch.distributed as dist

from megassm import job_store
from megassm.data import DataError
from megassm.errors import UserError
from tests.distributed import run_distributed

WORLD = 3


def _outcome(step: str) -> tuple[object, str | None, str | None]:
    """on_every_rank of `step` on this rank: (its result, the error's class name and message raised)."""
    rank = dist.get_rank()

    def start() -> str:
        if step == "rank 1 fails" and rank == 1 or step == "every rank fails":
            raise DataError("shard 3 is missing")
        return f"result of rank {rank}"

    try:
        return job_store.on_every_rank(f"test/{step}", start, datetime.timedelta(seconds=60)), None, None
    except UserError as error:
        return None, type(error).__name__, str(error)


def _check_on_every_rank() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert _outcome("none fails") == (f"result of rank {rank}", None, None)
    assert _outcome("every rank fails") == (None, "DataError", "shard 3 is missing")
    assert _outcome("rank 1 fails") == (None, "MetOnAnotherRank", f"on rank 1 ({socket.gethostname()}): shard 3 is missing")


def test_a_mistake_of_one_rank_stops_every_rank_naming_it():
    run_distributed(_check_on_every_rank, WORLD)


TIMEOUT = datetime.timedelta(seconds=2)


def _check_a_rank_that_never_reports() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 2:  # as a rank that died before the decision: the others must not wait for it twice
        time.sleep(2 * TIMEOUT.total_seconds() + 2)  # still alive (rank 0's process holds the store), silent
        return
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="^ranks 2 did not report 'test/silent'$"):
        job_store.decided("test/silent", dist.get_rank(), lambda values: values, TIMEOUT)
    assert time.monotonic() - started < 1.6 * TIMEOUT.total_seconds()


def test_a_rank_that_never_reports_is_named_after_one_timeout():
    run_distributed(_check_a_rank_that_never_reports, WORLD)


def test_a_rank_missing_at_start_up_is_one_line_and_a_failure_torchrun_may_restart(monkeypatch):
    from megassm.train import START_TIMEOUT, TrainingError, decided_at_start

    def never_reported(key, start, timeout):
        assert timeout == START_TIMEOUT
        raise TimeoutError(f"ranks 1 did not report {key!r}")

    monkeypatch.setattr(job_store, "on_every_rank", never_reported)
    with pytest.raises(TrainingError) as raised:
        decided_at_start("megassm/open_data", lambda: None)
    assert str(raised.value) == ("ranks 1 did not report 'megassm/open_data' within 10 minutes of the ranks' joining: it stopped or "
                                 "hangs, its node's output says why")
