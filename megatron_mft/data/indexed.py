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

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from megatron_mft.data.store import MemorySplit

with warnings.catch_warnings():  # megatron-core warns about missing TE/apex on import
    warnings.simplefilter("ignore")
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


def write_split(directory: str | Path, split: str, store: MemorySplit, *, vocab_size: int, num_tasks: int,
                threads: int = 2) -> None:
    """Write ``store`` (samples already in pack order, as online mode holds them) as the four
    datasets of ``split``: each pack goes to megatron's builder as a view. The datasets are
    independent files, written by ``threads`` threads (numpy copies and file writes release the
    GIL), so the output does not depend on the thread count."""
    dt = dtypes(vocab_size, num_tasks)
    tokens, mask = store.read(0, len(store.sample_lengths))
    lengths = store.sample_lengths.tolist()
    offsets = np.concatenate([[0], np.cumsum(store.sample_lengths)]).tolist()
    packs = list(zip(store.pack_bounds[:-1].tolist(), store.pack_bounds[1:].tolist()))

    def write(part: str) -> None:
        builder = IndexedDatasetBuilder(part_prefix(directory, split, part) + ".bin", dtype=dt[part])
        if part in ("tokens", "loss_mask"):  # a sequence per sample, a document per pack
            flat = (tokens if part == "tokens" else mask).astype(dt[part], copy=False)
            for s, e in packs:
                builder.add_document(flat[offsets[s]:offsets[e]], lengths[s:e])
        else:  # one sequence per pack: its samples' task ids / uids
            flat = (store.sample_tasks if part == "task_ids" else store.sample_uids).astype(dt[part])
            for s, e in packs:
                builder.add_document(flat[s:e], [e - s])
        builder.finalize(part_prefix(directory, split, part) + ".idx")

    if threads <= 1:
        for part in PARTS:
            write(part)
        return
    with ThreadPoolExecutor(min(threads, len(PARTS))) as pool:
        for done in [pool.submit(write, part) for part in PARTS]:
            done.result()


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
