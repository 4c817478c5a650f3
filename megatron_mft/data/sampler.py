"""Which rows go into which micro batch on which data-parallel rank.

Global row ``g`` (counted from the start of training) is row ``perm_e[g % N]`` of epoch
``e = g // N``, where ``perm_e`` is a permutation seeded by ``(seed, e)``. So every row is used
exactly once per epoch, epochs are shuffled differently, a global batch that crosses an epoch
boundary simply continues into the next epoch, and resuming needs nothing but the consumed-row
count stored in the checkpoint: the same count always yields the same rows.

Within a global batch of ``G = m * mbs * dp`` rows, micro batch ``j`` of rank ``r`` is the slice
``[(j*dp + r)*mbs, (j*dp + r + 1)*mbs)`` (Megatron's order). With length grouping the global
batch is first sorted by row length (longest first, stable), so each micro batch holds rows of
similar length and pads little.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EpochSampler:
    num_rows: int
    seed: int
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            if len(self._cache) >= 4:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = perm
        return perm

    def rows(self, start: int, count: int) -> np.ndarray:
        """Row ids of global rows ``start .. start+count-1``."""
        if self.num_rows <= 0:
            raise ValueError("the training split has no rows")
        if start < 0 or count < 0:
            raise ValueError(f"rows({start}, {count}): negative")
        g = np.arange(start, start + count, dtype=np.int64)
        epochs = g // self.num_rows
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.permutation(e)[g[sel] % self.num_rows]
        return out


def rank_micro_batches(
    rows: np.ndarray,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    lengths: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split one global batch of row ids into this rank's micro batches (see module doc)."""
    per = micro_batch_size * dp_size
    if len(rows) % per:
        raise ValueError(f"global batch of {len(rows)} rows is not a multiple of micro_batch_size*dp = {per}")
    if lengths is not None:
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
    m = len(rows) // per
    return [rows[(j * dp_size + dp_rank) * micro_batch_size:(j * dp_size + dp_rank + 1) * micro_batch_size] for j in range(m)]
