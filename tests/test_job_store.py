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


def _check_a_rank_that_never_reports(late_rank: int) -> None:
    """Rank 2 never reports; `late_rank` arrives a timeout after the others (rank 0 late: the others wait for its
    decision from when it began to collect, not from their own arrival)."""
    dist.init_process_group("gloo")
    job_store.DECISION_GRACE = TIMEOUT / 4  # counted from a late rank 0's arrival, it still finds rank 0's decision
    if dist.get_rank() == 2:  # as a rank that died before the decision: the others must not wait for it twice
        time.sleep(3 * TIMEOUT.total_seconds() + 2)  # still alive (rank 0's process holds the store), silent
        return
    if dist.get_rank() == late_rank:
        time.sleep(TIMEOUT.total_seconds())
    started = time.monotonic()
    with pytest.raises(job_store.NotReported, match="^ranks 2 did not report 'test/silent'$") as raised:
        job_store.decided("test/silent", dist.get_rank(), lambda values: values, TIMEOUT)
    waits = 2 if late_rank == 0 and dist.get_rank() == 1 else 1  # timeouts from this rank's arrival to the decision
    assert raised.value.ranks == [2] and time.monotonic() - started < (waits + 0.6) * TIMEOUT.total_seconds()


@pytest.mark.parametrize("late_rank", [0, 1, None], ids=["rank-0-late", "rank-1-late", "none-late"])
def test_a_rank_that_never_reports_is_named_after_one_timeout(late_rank):
    run_distributed(_check_a_rank_that_never_reports, WORLD, late_rank)


def test_ranks_missing_at_start_up_are_one_line_and_a_failure_torchrun_may_restart(monkeypatch):
    from megassm.train import MissingAtStart, TrainingError, decided_at_start

    def never_reported(key, start, timeout):
        raise job_store.NotReported([0, 3], f"{key}/collecting")

    monkeypatch.setattr(job_store, "on_every_rank", never_reported)
    with pytest.raises(MissingAtStart) as raised:
        decided_at_start("megassm/open_data", lambda: None)
    assert isinstance(raised.value, TrainingError) and raised.value.without_rank_0
    assert str(raised.value) == ("ranks 0, 3 did not reach the start-up's step 'megassm/open_data/collecting' within 10 minutes: "
                                 "they stopped or hang, their nodes' output says why")


def test_a_timeout_of_the_step_itself_is_not_a_missing_rank(monkeypatch):
    """An OSError(ETIMEDOUT) of a filesystem is a TimeoutError too: it stays what it is."""
    from megassm.train import decided_at_start

    def stalled():
        raise TimeoutError(110, "Connection timed out", "/nfs/data/tokens_00000.bin")

    with pytest.raises(TimeoutError, match="Connection timed out") as raised:
        decided_at_start("megassm/open_data", stalled)
    assert not isinstance(raised.value, job_store.NotReported)
