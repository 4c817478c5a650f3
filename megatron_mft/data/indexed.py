"""Packed splits on disk as megatron-core indexed datasets (``.bin``/``.idx``).

Four datasets per split prefix ``P`` (layout in FORMAT.md):
  ``P_tokens``       token ids, one sequence per sample, one document per pack
  ``P_loss_mask``    uint8 per token (1 = this token is a loss-taking target); same structure
  ``P_task_ids``     one sequence per pack: the global task id of each of its samples
  ``P_sample_uids``  one sequence per pack: each sample's position in the input enumeration
Megatron's own document index marks the packs, and its sequence lengths the sample
boundaries, so nothing here re-implements the indexed format. Reading checks what megatron's
reader assumes (header, file sizes, value ranges) and names the damaged file instead of failing
later with a bare numpy or struct error.
"""

from __future__ import annotations

import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from megatron_mft.data.records import DataError
from megatron_mft.data.store import MemorySplit

with warnings.catch_warnings():  # megatron-core warns about missing TE/apex on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import (
        _INDEX_HEADER,
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
    )

_REDO = "the preprocessed folder is damaged; run tools/preprocess/preprocess_mft.py again (--overwrite)"
#: header, version, dtype code, sequence count, document count
_IDX_HEAD = struct.Struct("<9sQBQQ")

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


def _damaged(path: str, what: str) -> DataError:
    return DataError([f"{path}: {what}; {_REDO}"])


def _check_idx(idx: str) -> tuple[int, int, int]:
    """(dtype size, sequences, documents) of a well-formed ``.idx``; DataError naming it otherwise."""
    try:
        size = os.path.getsize(idx)
        with open(idx, "rb") as f:
            head = f.read(_IDX_HEAD.size)
    except OSError as e:
        raise _damaged(idx, f"cannot be read ({e.strerror or e})") from None
    if len(head) < _IDX_HEAD.size:
        raise _damaged(idx, f"truncated: {size} bytes, shorter than the {_IDX_HEAD.size}-byte header")
    magic, version, code, n_seq, n_doc = _IDX_HEAD.unpack(head)
    if magic != _INDEX_HEADER or version != 1:
        raise _damaged(idx, "not a megatron index file (bad header or version)")
    try:
        item = DType.size(code)
    except (ValueError, KeyError):
        raise _damaged(idx, f"not a megatron index file (unknown dtype code {code})") from None
    want = _IDX_HEAD.size + n_seq * (4 + 8) + n_doc * 8
    if size != want:
        raise _damaged(idx, f"{'truncated' if size < want else 'too long'}: {size} bytes, its header "
                            f"({n_seq} sequences, {n_doc} documents) needs {want} bytes")
    return item, n_seq, n_doc


def _open(prefix: str) -> IndexedDataset:
    """Megatron's reader over a checked ``.idx``/``.bin`` pair (an empty ``.bin`` cannot be mmap'd)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise _damaged(path, "missing")
    item, n_seq, _ = _check_idx(idx)
    try:
        ds = IndexedDataset(prefix, mmap=n_seq > 0)
    except (AssertionError, ValueError, struct.error, OSError) as e:
        raise _damaged(idx, f"cannot be read ({e})") from None
    lengths, pointers, docs = ds.index.sequence_lengths, ds.index.sequence_pointers, ds.document_indices
    if (lengths < 0).any() or (n_seq and (pointers[0] != 0 or (np.diff(pointers) != lengths[:-1] * item).any())):
        raise _damaged(idx, "sequence lengths and pointers disagree")
    if not len(docs) or docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
        raise _damaged(idx, f"document index does not cover its {n_seq} sequences")
    want = int(lengths.sum(dtype=np.int64)) * item
    size = os.path.getsize(bin_)
    if size != want:
        raise _damaged(bin_, f"{'truncated' if size < want else 'too long'}: {size} bytes, its index "
                             f"({n_seq} sequences) describes {want} bytes")
    return ds


def _flat(ds: IndexedDataset) -> np.ndarray:
    n = len(ds)
    return np.concatenate(ds[0:n]).astype(np.int64) if n else np.zeros(0, np.int64)


class IndexedSplit:
    """A ``SampleStore`` over the four mmap'd indexed datasets of one split. With ``vocab_size``
    and ``num_tasks`` (from the manifest), values out of range name the damaged file: task ids
    and uids when opening, token ids and mask values of each read (cheap next to collation)."""

    def __init__(self, directory: str | Path, split: str, vocab_size: int | None = None,
                 num_tasks: int | None = None):
        self._prefix = {k: part_prefix(directory, split, k) for k in PARTS}
        self._ds = {k: _open(self._prefix[k]) for k in PARTS}
        self._vocab_size = vocab_size
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
        if num_tasks is not None and n and not (0 <= self.sample_tasks.min() and self.sample_tasks.max() < num_tasks):
            problems.append(f"{self._prefix['task_ids']}.bin: task ids outside 0..{num_tasks - 1}")
        if problems:
            raise DataError([f"{part_prefix(directory, split, '*')}: inconsistent split: " + "; ".join(problems)
                             + f"; {_REDO}"])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        # Samples of a pack are contiguous in .bin, so one read from the first sample's pointer
        # returns the whole pack (megatron's ``get`` with an explicit length).
        if stop <= start:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        n = int(self.sample_lengths[start:stop].sum())
        tokens, mask = self._ds["tokens"].get(start, 0, n), self._ds["loss_mask"].get(start, 0, n)
        if self._vocab_size is not None and n and tokens.max() >= self._vocab_size:
            raise _damaged(self._prefix["tokens"] + ".bin", f"token id {int(tokens.max())} >= vocab_size "
                                                            f"{self._vocab_size} in samples {start}..{stop - 1}")
        if n and mask.max() > 1:
            raise _damaged(self._prefix["loss_mask"] + ".bin", f"loss mask value {int(mask.max())} (not 0/1) in "
                                                               f"samples {start}..{stop - 1}")
        return tokens, mask
