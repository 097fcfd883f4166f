"""The sample order and the loader: global sample number -> window of the token stream -> batch.

A split of `tokens` tokens starting at stream position `base` holds n = (tokens - 1) // seq_len
non-overlapping windows; window i is positions [base + i*seq_len, base + (i+1)*seq_len + 1): inputs
are its first seq_len tokens, labels its last seq_len (the next token of each input).

Global sample number k (0, 1, 2, ... forever) reads window perm_{seed, k // n}(k % n), where perm is
a keyed pseudo-random bijection of [0, n), different every epoch, computed per index in O(1) memory
(n can be 10^9). So the order is a function of (seed, k) only: a run resumes from one integer, the
samples of a step are the same whatever the data-parallel size, and every rank reads only its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from megassm.data.shards import DataError, TokenStream

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive integers over 64 bits
_ROUND_CONSTANTS = [np.uint64(r * _GOLDEN % 2**64) for r in range(1, 7)]  # six Feistel rounds


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 arrays (arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, epoch: np.ndarray) -> np.ndarray:
    """perm_{seed, epoch}(index) for arrays of indices in [0, n) and their epochs: a Feistel network on
    the smallest even number of bits that covers n, cycle-walking until the value falls in [0, n)
    (a bijection of [0, n) because the network is a bijection of the larger power of two)."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    key = _mix(_mix(np.full(np.shape(index), seed % 2**64, np.uint64)) + np.asarray(epoch, np.uint64) * np.uint64(_GOLDEN))
    round_keys = [_mix(key + constant) for constant in _ROUND_CONSTANTS]
    x = np.asarray(index, np.uint64).copy()
    walking = np.ones(x.shape, bool)
    while walking.any():
        left, right = x[walking] >> np.uint64(half), x[walking] & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix(right ^ round_key[walking]) & mask)
        x[walking] = (left << np.uint64(half)) | right
        walking = x >= np.uint64(n)
    return x.astype(np.int64)


def document_numbers(doc_starts: np.ndarray, start: int, length: int) -> np.ndarray:
    """The global document number of each stream position in [start, start + length)."""
    first = int(np.searchsorted(doc_starts, start, side="right")) - 1
    inside = doc_starts[first + 1 : int(np.searchsorted(doc_starts, start + length, side="left"))]
    steps = np.zeros(length, np.int64)
    steps[inside - start] = 1
    return first + np.cumsum(steps)


def rank_samples(consumed: int, micro_step: int, dp_rank: int, dp: int, micro_batch: int, global_batch: int) -> int:
    """The first global sample number of a rank's micro batch in the step that starts after `consumed`
    samples: the step covers samples [consumed, consumed + G) whatever the DP size; micro step m of DP
    rank d reads micro_batch of them from consumed + (m*dp + d)*b."""
    if global_batch % (dp * micro_batch):
        raise ValueError(f"data.global_batch = {global_batch} must be a multiple of data.micro_batch * dp = {micro_batch} * {dp}")
    if not 0 <= micro_step < global_batch // (dp * micro_batch) or not 0 <= dp_rank < dp:
        raise ValueError(f"micro step {micro_step} of DP rank {dp_rank} is outside a step of {global_batch} samples "
                         f"({global_batch // (dp * micro_batch)} micro steps of {micro_batch} samples on {dp} DP ranks)")
    return consumed + (micro_step * dp + dp_rank) * micro_batch


@dataclass
class Batch:
    """One rank's micro batch: int64 tensors of shape (micro_batch, seq_len // cp)."""

    input_ids: Tensor
    labels: Tensor  # the stream's next token after each input
    seq_idx: Tensor  # global document number of each input token: a change marks a document start

    @classmethod
    def stack(cls, batches: list["Batch"]) -> "Batch":
        """The rows of `batches`, in order, as one batch."""
        return cls(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(cls)))

    def to(self, device: torch.device | str) -> "Batch":
        """On `device`; to a GPU from pinned memory, so the copy waits for nothing queued before it."""
        pin = torch.device(device).type == "cuda"
        tensors = (getattr(self, f.name) for f in dataclasses.fields(self))
        return Batch(*((t.pin_memory() if pin else t).to(device, non_blocking=True) for t in tensors))


def _too_short(stream: TokenStream, split: str, tokens: int, seq_len: int) -> str:
    """What to do when a split holds no whole sample: an empty validation split is not a seq_len problem."""
    if split == "val" and tokens == 0:
        return (f"the validation split of {stream.path} is empty: prepare the data again with a --val-fraction above 0 "
                "(tools/prepare_data.py, from two documents or more), or set train.eval_every = 0 to train without validation")
    name, advice = (("validation", "prepare it again with a larger --val-fraction, or set train.eval_every = 0") if split == "val"
                    else ("training", "or prepare more data"))
    return (f"data.seq_len = {seq_len} needs at least {seq_len + 1} tokens, but the {name} split of {stream.path} has {tokens}: "
            f"lower data.seq_len, {advice}")


class SampleLoader:
    """Reads samples of one split of a TokenStream: for CP rank c of cp, columns
    [c*seq_len/cp, (c+1)*seq_len/cp) of each sample (and one token more for the last label)."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, split: str = "train", cp: int = 1, cp_rank: int = 0):
        if seq_len < 1 or seq_len % cp:
            raise ValueError(f"data.seq_len = {seq_len} must be a positive multiple of parallel.cp = {cp}")
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.base, tokens = stream.split(split)
        self.num_windows = (tokens - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(_too_short(stream, split, tokens, seq_len))
        self.columns = seq_len // cp
        self.first_column = cp_rank * self.columns

    def window_starts(self, first_sample: int, count: int) -> np.ndarray:
        """The stream position of the window of each sample first_sample .. first_sample + count - 1."""
        k = np.arange(first_sample, first_sample + count, dtype=np.int64)
        return self.base + permute(k % self.num_windows, self.num_windows, self.seed, k // self.num_windows) * self.seq_len

    def batch(self, first_sample: int, count: int) -> Batch:
        """Samples first_sample .. first_sample + count - 1, this CP rank's columns."""
        starts = self.window_starts(first_sample, count) + self.first_column
        tokens = np.stack([self.stream.read(int(s), self.columns + 1) for s in starts]).astype(np.int64)
        seq_idx = np.stack([document_numbers(self.stream.doc_starts, int(s), self.columns) for s in starts])
        return Batch(torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy()), torch.from_numpy(seq_idx))
