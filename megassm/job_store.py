"""Small values exchanged through the job's store (the rendezvous connection every rank already has), not a collective.

Collectives of the default group time out after NCCL's 10 minutes and may not run from a second thread beside the
training's; a gloo group beside NCCL needs host names that resolve to an address the other nodes reach. The store
has neither limit. Values are polled for rather than waited on: a store wait holds the store's connection for its
whole length, which every other use of the store in the process would queue behind.
"""

from __future__ import annotations

import datetime
import pickle
import socket
import threading
import time
from typing import Callable, Sequence, TypeVar

import torch.distributed as dist

from megassm.errors import UserError

# Polls start quick and slow down to one per POLL_SECONDS: a short wait ends soon, a long one loads the store little.
FIRST_PAUSE_SECONDS = 0.001
POLL_SECONDS = 0.2
# How much longer than rank 0's wait to collect every rank's value the others wait for its decision.
DECISION_GRACE = datetime.timedelta(seconds=30)

T = TypeVar("T")


class NotReported(TimeoutError):
    """Ranks that posted nothing under a key within the wait (they died, or hang)."""

    def __init__(self, ranks: list[int], key: str):
        super().__init__(f"ranks {', '.join(map(str, ranks))} did not report {key!r}")
        self.ranks, self.key = ranks, key

    def __reduce__(self) -> tuple:  # sent to the other ranks through the store
        return NotReported, (self.ranks, self.key)


def _post(key: str, value: object) -> None:
    """This rank's value under `key`."""
    dist.distributed_c10d._get_default_store().set(f"{key}/{dist.get_rank()}", pickle.dumps(value))


def _keys(key: str, ranks: Sequence[int] | None) -> list[str]:
    return [f"{key}/{rank}" for rank in (range(dist.get_world_size()) if ranks is None else ranks)]


def _collect(key: str, timeout: datetime.timedelta, abandoned: threading.Event | None = None,
             ranks: Sequence[int] | None = None) -> list:
    """The values of `ranks` (every rank where None) under `key`, in their order, once all have posted one;
    NotReported after `timeout`, or once `abandoned` is set."""
    store = dist.distributed_c10d._get_default_store()
    keys = _keys(key, ranks)
    deadline, pause = time.monotonic() + timeout.total_seconds(), FIRST_PAUSE_SECONDS
    while not store.check(keys):
        if time.monotonic() > deadline or (abandoned is not None and abandoned.is_set()):
            raise NotReported([int(k.rsplit("/", 1)[1]) for k in keys if not store.check([k])], key)
        time.sleep(pause)
        pause = min(2 * pause, POLL_SECONDS)
    return [pickle.loads(store.get(k)) for k in keys]


def _forget(key: str, ranks: Sequence[int] | None = None) -> None:
    """Delete the values of `ranks` (every rank's where None) under `key` (the store keeps what a long run posts
    otherwise)."""
    store = dist.distributed_c10d._get_default_store()
    for k in _keys(key, ranks):
        store.delete_key(k)


def decided(key: str, mine: object, decide: Callable[[list], T], timeout: datetime.timedelta,
            abandoned: threading.Event | None = None) -> T:
    """decide(every rank's `mine`, in rank order) on rank 0, its result on every rank, or the exception that collecting
    them or deciding raised on rank 0 raised on every rank. Rank 0 polls the others' keys, each other rank one key
    (not every rank every key: thousands of ranks poll one store). Rank 0 returns last, once every rank has read the
    result: outside torchrun (whose agent holds the store) the store lives in rank 0's process. The others wait for
    rank 0's decision from when rank 0 began to collect (it says so), not from their own arrival: ranks that arrive long
    before rank 0 would give up on it while it still waits for a missing rank."""
    _post(key, mine)
    outcome, readers = None, None
    if dist.get_rank() == 0:
        _post(f"{key}/collecting", True)
        try:
            values = _collect(key, timeout, abandoned)
        except NotReported as error:  # a rank that never posted: the others learn it, and it will not read the outcome
            store, others = dist.distributed_c10d._get_default_store(), range(1, dist.get_world_size())
            readers = [rank for rank in others if store.check([f"{key}/{rank}"])]
            _forget(key, [0, *readers])
            outcome = (None, error)
        else:
            _forget(key)
            try:
                outcome = (decide(values), None)
            except Exception as error:
                outcome = (None, error)
    else:
        _collect(f"{key}/collecting", timeout + DECISION_GRACE, abandoned, ranks=[0])
    result, error = _from_first(f"{key}/decided", outcome, timeout, abandoned, readers)
    if dist.get_rank() == 0:
        _forget(f"{key}/collecting", ranks=[0])
    if error is not None:
        raise error
    return result


def _from_first(key: str, value: object, timeout: datetime.timedelta, abandoned: threading.Event | None,
                readers: Sequence[int] | None = None) -> object:
    """Rank 0's `value` on every rank (the others' are not used); rank 0 waits for `readers` (every other rank where
    None) to have read it."""
    others = range(1, dist.get_world_size()) if readers is None else readers
    if dist.get_rank() != 0:  # rank 0 may take the whole timeout collecting before it has a value to give
        value = _collect(key, timeout + DECISION_GRACE, abandoned, ranks=[0])[0]
        _post(f"{key}/read", True)
        return value
    _post(key, value)
    _collect(f"{key}/read", timeout, abandoned, ranks=others)
    _forget(key, ranks=[0])
    _forget(f"{key}/read", ranks=others)
    return value


class MetOnAnotherRank(UserError):
    """A mistake some ranks met and this one did not (their node's copy of the data, say): said by rank 0."""


def on_every_rank(key: str, start: Callable[[], T], timeout: datetime.timedelta) -> T:
    """start() on every rank, each rank's result on it; where it raised a UserError on any rank, every rank raises the
    first rank's, naming that rank and its host unless every rank met the same: a rank alone with a mistake stops the
    others, where they would wait for it in the next collective until its timeout."""
    if not dist.is_initialized():
        return start()
    try:
        result, mistake = start(), None
    except UserError as error:
        result, mistake = None, error
    decided(key, (mistake, socket.gethostname()), _first_mistake, timeout)
    return result


def _first_mistake(everyone: list) -> None:
    """on_every_rank's decision: the first mistake of every rank's (mistake, host), as it is where all ranks met it."""
    met = [(rank, host, mistake) for rank, (mistake, host) in enumerate(everyone) if mistake is not None]
    if not met:
        return
    rank, host, mistake = met[0]
    if len(met) == len(everyone) and len({str(m) for _, _, m in met}) == 1:
        raise mistake
    others = f" (and {len(met) - 1} more rank(s))" if len(met) > 1 else ""
    raise MetOnAnotherRank(f"on rank {rank} ({host}){others}: {mistake}")
