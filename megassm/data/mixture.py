"""A weighted mixture of prepared data folders: global sample number -> (folder, that folder's sample number).

Samples come in blocks of `block` consecutive numbers; each block holds round(weight * block) samples of each folder
(largest remainders, so exactly `block` in all), at positions given by a keyed permutation of the block, different in
every block. Folder s's samples of block b are its numbers b * count_s .. (b + 1) * count_s - 1 in increasing order, so
each folder reads its own order (megassm.data.loader's, with its own epochs) without gaps or repeats. As that order,
the mixture is a function of (seed, sample number) only: a run resumes from one integer and every data-parallel size
reads the same samples. Within a block the shares are exact; a single global batch holds what its place in the
block's permutation gives.
"""

from __future__ import annotations

import numpy as np

from megassm.data.loader import Batch, SampleLoader, permute

MIX_BLOCK = 2**16  # samples per block of the training mixture: each weight is kept to 1/65,536 within every block
_MIX_SEED = 0x6D6978  # keeps the block permutations apart from the samples' order of the same run.seed


def block_counts(weights: list[float], block: int) -> np.ndarray:
    """Samples of each folder per block: weight * block rounded so that they sum to `block` (largest remainders)."""
    scaled = np.asarray(weights, np.float64) / max(weights)  # no overflow in the sum of huge weights
    exact = scaled / scaled.sum() * block
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: block - counts.sum()]] += 1
    return counts


class Mixture:
    """Which folder each global sample number reads, and which of that folder's samples."""

    def __init__(self, weights: list[float], seed: int, block: int = MIX_BLOCK):
        self.block, self.seed = block, seed
        self.counts = block_counts(weights, block)
        if not self.counts.all():
            raise ValueError(f"weights {weights}: each needs at least 1/{block} of their sum")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # folder s holds positions starts[s] .. starts[s+1] - 1
        self._last_block: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, block_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(folder, index among the block's samples of that folder) of each sample of a block: its folder from where a
        keyed permutation puts it in the block's folder-ordered layout, its index counting that folder's samples in the
        block in order. The last block's are kept: steps read a block at a time."""
        if self._last_block is None or self._last_block[0] != block_index:
            index = np.arange(self.block, dtype=np.int64)
            positions = permute(index, self.block, self.seed ^ _MIX_SEED, np.full(self.block, block_index))
            folders = np.searchsorted(self.starts, positions, side="right") - 1
            by_folder = np.argsort(folders, kind="stable")  # each folder's samples in their order in the block
            ranks = np.empty_like(index)
            ranks[by_folder] = index - self.starts[folders[by_folder]]
            self._last_block = block_index, folders, ranks
        return self._last_block[1:]

    def assign(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(folder, the folder's sample number) of each global sample number (the same number where there is one folder)."""
        samples = np.asarray(samples, np.int64)
        if len(self.counts) == 1:
            return np.zeros_like(samples), samples
        blocks, within = samples // self.block, samples % self.block
        folders, numbers = np.empty_like(samples), np.empty_like(samples)
        for b in np.unique(blocks):
            block_folders, ranks = self._block(int(b))
            inside = blocks == b
            folders[inside] = block_folders[within[inside]]
            numbers[inside] = b * self.counts[folders[inside]] + ranks[within[inside]]
        return folders, numbers

    def read_by(self, samples: int) -> np.ndarray:
        """How many of each folder's samples the global samples 0 .. samples - 1 read."""
        if len(self.counts) == 1:
            return np.array([samples])
        blocks, within = divmod(samples, self.block)
        return blocks * self.counts + np.bincount(self._block(blocks)[0][:within], minlength=len(self.counts))


class MixedLoader:
    """SampleLoader's `batch` over a Mixture of folders' SampleLoaders (one split of each; one folder's samples in its
    own order)."""

    def __init__(self, loaders: list[SampleLoader], mixture: Mixture):
        self.loaders, self.mixture = loaders, mixture

    def batch(self, first_sample: int, count: int) -> Batch:
        """Samples first_sample .. first_sample + count - 1, each read from its folder."""
        if len(self.loaders) == 1:  # the folder's own numbers: its batch at once
            return self.loaders[0].batch(first_sample, count)
        folders, numbers = self.mixture.assign(np.arange(first_sample, first_sample + count, dtype=np.int64))
        return Batch.stack([self.loaders[f].batch(int(k), 1) for f, k in zip(folders, numbers)])
