"""Where samples live at training time: one interface, two backends.

A split holds samples in pack order: pack ``p`` is the contiguous sample range
``pack_bounds[p]:pack_bounds[p+1]``. The offline backend (``indexed.IndexedSplit``) reads
megatron ``.bin/.idx`` files through mmap; ``MemorySplit`` holds the same arrays in RAM for
online mode, and preprocessing writes a ``MemorySplit``'s arrays as they are
(``indexed.write_split``). Batching code sees only this interface, so both modes batch
identically.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class SampleStore(Protocol):
    sample_lengths: np.ndarray  # int64 [num_samples]
    sample_tasks: np.ndarray  # int64 [num_samples], global task ids
    sample_uids: np.ndarray  # int64 [num_samples], position in the input enumeration
    pack_bounds: np.ndarray  # int64 [num_packs + 1]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and per-token loss masks of samples ``start..stop-1``, concatenated."""
        ...


class MemorySplit:
    """Samples in RAM, laid out exactly like an offline split (online mode, tests)."""

    def __init__(
        self,
        samples: Sequence[tuple[np.ndarray, np.ndarray]],
        tasks: Sequence[int],
        uids: Sequence[int],
        packs: list[list[int]],
    ):
        order = [i for p in packs for i in p]
        self.sample_lengths = np.asarray([len(samples[i][0]) for i in order], dtype=np.int64)
        self.sample_tasks = np.asarray([tasks[i] for i in order], dtype=np.int64)
        self.sample_uids = np.asarray([uids[i] for i in order], dtype=np.int64)
        self.pack_bounds = np.concatenate([[0], np.cumsum([len(p) for p in packs])]).astype(np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.sample_lengths)]).astype(np.int64)
        if order:
            self._tokens = np.concatenate([samples[i][0] for i in order]).astype(np.int32)
            self._mask = np.concatenate([samples[i][1] for i in order]).astype(np.uint8)
        else:
            self._tokens, self._mask = np.zeros(0, np.int32), np.zeros(0, np.uint8)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self._offsets[start]), int(self._offsets[stop])
        return self._tokens[lo:hi], self._mask[lo:hi]
