"""Small values exchanged through the job's store (the rendezvous connection every rank already has), not a collective.

Collectives of the default group time out after NCCL's 10 minutes and may not run from a second thread beside the
training's; a gloo group beside NCCL needs host names that resolve to an address the other nodes reach. The store
has neither limit. Values are polled for rather than waited on: a store wait holds the store's connection for its
whole length, which every other use of the store in the process would queue behind.
"""

from __future__ import annotations

import datetime
import pickle
import threading
import time
from typing import Callable, Sequence, TypeVar

import torch.distributed as dist

# Polls start quick and slow down to one per POLL_SECONDS: a short wait ends soon, a long one loads the store little.
FIRST_PAUSE_SECONDS = 0.001
POLL_SECONDS = 0.2

T = TypeVar("T")


def _post(key: str, value: object) -> None:
    """This rank's value under `key`."""
    dist.distributed_c10d._get_default_store().set(f"{key}/{dist.get_rank()}", pickle.dumps(value))


def _keys(key: str, ranks: Sequence[int] | None) -> list[str]:
    return [f"{key}/{rank}" for rank in (range(dist.get_world_size()) if ranks is None else ranks)]


def _collect(key: str, timeout: datetime.timedelta, abandoned: threading.Event | None = None,
             ranks: Sequence[int] | None = None) -> list:
    """The values of `ranks` (every rank where None) under `key`, in their order, once all have posted one;
    TimeoutError after `timeout`, or once `abandoned` is set."""
    store = dist.distributed_c10d._get_default_store()
    keys = _keys(key, ranks)
    deadline, pause = time.monotonic() + timeout.total_seconds(), FIRST_PAUSE_SECONDS
    while not store.check(keys):
        if time.monotonic() > deadline or (abandoned is not None and abandoned.is_set()):
            missing = [k.rsplit("/", 1)[1] for k in keys if not store.check([k])]
            raise TimeoutError(f"ranks {', '.join(missing)} did not report {key!r}")
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
    result: outside torchrun (whose agent holds the store) the store lives in rank 0's process."""
    _post(key, mine)
    outcome = None
    if dist.get_rank() == 0:
        try:
            values = _collect(key, timeout, abandoned)
            _forget(key)
            outcome = (decide(values), None)
        except Exception as error:  # a rank that never posted included: the others learn it too
            outcome = (None, error)
    result, error = _from_first(f"{key}/decided", outcome, timeout, abandoned)
    if error is not None:
        raise error
    return result


def _from_first(key: str, value: object, timeout: datetime.timedelta, abandoned: threading.Event | None) -> object:
    """Rank 0's `value` on every rank (the others' are not used)."""
    others = range(1, dist.get_world_size())
    if dist.get_rank() != 0:
        value = _collect(key, timeout, abandoned, ranks=[0])[0]
        _post(f"{key}/read", True)
        return value
    _post(key, value)
    _collect(f"{key}/read", timeout, abandoned, ranks=others)
    _forget(key, ranks=[0])
    _forget(f"{key}/read", ranks=others)
    return value
