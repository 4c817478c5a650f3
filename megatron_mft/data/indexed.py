"""Packed splits on disk as megatron-core indexed datasets (``.bin``/``.idx``).

Four datasets per split prefix ``P`` (layout in FORMAT.md):
  ``P_tokens``       token ids, one sequence per sample, one document per pack
  ``P_loss_mask``    uint8 per token (1 = this token is a loss-taking target); same structure
  ``P_task_ids``     one sequence per pack: the global task id of each of its samples
  ``P_sample_uids``  one sequence per pack: each sample's position in the input enumeration
Megatron's own document index marks the packs, and its sequence lengths the sample
boundaries, so nothing here re-implements the indexed format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

PARTS = ("tokens", "loss_mask", "task_ids", "sample_uids")


def part_prefix(directory: str | Path, split: str, part: str) -> str:
    return str(Path(directory) / f"{split}_{part}")


def dtypes(vocab_size: int, num_tasks: int) -> dict[str, type]:
    return {
        "tokens": DType.optimal_dtype(vocab_size),
        "loss_mask": np.uint8,
        "task_ids": DType.optimal_dtype(max(num_tasks, 1)),
        "sample_uids": np.int64,
    }


def write_split(
    directory: str | Path,
    split: str,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    tasks: Sequence[int],
    uids: Sequence[int],
    packs: list[list[int]],
    *,
    vocab_size: int,
    num_tasks: int,
) -> None:
    """Write ``packs`` (lists of indices into ``samples``) in order.

    Everything is laid out once in pack order (one concatenation, one cast per dataset); each
    pack then goes to megatron's builder as a view.
    """
    dt = dtypes(vocab_size, num_tasks)
    builders = {k: IndexedDatasetBuilder(part_prefix(directory, split, k) + ".bin", dtype=dt[k]) for k in PARTS}
    order = [i for p in packs for i in p]
    if order:
        tokens = np.concatenate([samples[i][0] for i in order]).astype(dt["tokens"], copy=False)
        mask = np.concatenate([samples[i][1] for i in order]).astype(np.uint8, copy=False)
        task_arr = np.asarray([tasks[i] for i in order]).astype(dt["task_ids"])
        uid_arr = np.asarray([uids[i] for i in order], dtype=np.int64)
        lengths = [len(samples[i][0]) for i in order]
        tok_bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        s = 0
        for pack in packs:
            e = s + len(pack)
            a, b = tok_bounds[s], tok_bounds[e]
            pack_lengths = lengths[s:e]
            builders["tokens"].add_document(tokens[a:b], pack_lengths)
            builders["loss_mask"].add_document(mask[a:b], pack_lengths)
            builders["task_ids"].add_document(task_arr[s:e], [e - s])
            builders["sample_uids"].add_document(uid_arr[s:e], [e - s])
            s = e
    for k, b in builders.items():
        b.finalize(part_prefix(directory, split, k) + ".idx")


def _flat(ds: IndexedDataset) -> np.ndarray:
    n = len(ds)
    return np.concatenate(ds[0:n]).astype(np.int64) if n else np.zeros(0, np.int64)


class IndexedSplit:
    """A ``SampleStore`` over the four mmap'd indexed datasets of one split."""

    def __init__(self, directory: str | Path, split: str):
        self._ds = {k: IndexedDataset(part_prefix(directory, split, k)) for k in PARTS}
        tok, mask = self._ds["tokens"], self._ds["loss_mask"]
        self.sample_lengths = tok.sequence_lengths.astype(np.int64)
        self.pack_bounds = tok.document_indices.astype(np.int64)
        self.sample_tasks = _flat(self._ds["task_ids"])
        self.sample_uids = _flat(self._ds["sample_uids"])
        n = len(self.sample_lengths)
        problems = []
        if not np.array_equal(mask.sequence_lengths, tok.sequence_lengths):
            problems.append("loss_mask sequence lengths differ from tokens")
        if not np.array_equal(mask.document_indices, tok.document_indices):
            problems.append("loss_mask packs differ from tokens")
        if len(self.sample_tasks) != n or len(self.sample_uids) != n:
            problems.append(f"task_ids/sample_uids hold {len(self.sample_tasks)}/{len(self.sample_uids)} entries for {n} samples")
        if problems:
            raise ValueError(f"{part_prefix(directory, split, '*')}: inconsistent split: " + "; ".join(problems))

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        # Samples of a pack are contiguous in .bin, so one read from the first sample's pointer
        # returns the whole pack (megatron's ``get`` with an explicit length).
        if stop <= start:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        n = int(self.sample_lengths[start:stop].sum())
        return self._ds["tokens"].get(start, 0, n), self._ds["loss_mask"].get(start, 0, n)
