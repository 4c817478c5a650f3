"""Rows of samples -> one micro batch, exactly as docs/architecture.md specifies.

A row is samples laid side by side (a pack, or a single sample in dynamic mode); each row is
padded at its end to the micro-batch width. Every sample and every row's padding tail is one
segment of ``cu_seqlens`` over the flattened ``b*s`` tokens, so packed attention never lets a
token see another sample. Labels are shifted inside a sample only: the last position of each
sample has no target (label 0, mask 0). Padding positions restart ``position_ids`` at 0 like a
segment of their own. Work is vectorised over the whole micro batch (one scatter per field),
not looped per sample: a 128 x 4096 global batch holds thousands of samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Row:
    tokens: np.ndarray  # int [n]: the row's samples, concatenated
    mask: np.ndarray  # uint8 [n]: 1 = this token is a loss-taking target
    lengths: np.ndarray  # int64 [k]: sample lengths, summing to n
    tasks: np.ndarray  # int64 [k]: global task id per sample

    @classmethod
    def of(cls, samples: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> "Row":
        """From (tokens, mask, task) per sample."""
        if not samples:
            return EMPTY_ROW
        return cls(
            np.concatenate([s[0] for s in samples]),
            np.concatenate([s[1] for s in samples]),
            np.asarray([len(s[0]) for s in samples], dtype=np.int64),
            np.asarray([s[2] for s in samples], dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.tokens)


EMPTY_ROW = Row(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def row_width(rows: Sequence[Row], *, multiple: int = 1, pad_to: int | None = None) -> int:
    """Dynamic padding: the longest row, rounded up to ``multiple``; or ``pad_to`` (rounded up)."""
    longest = max((len(r) for r in rows), default=0)
    if pad_to is not None:
        if longest > pad_to:
            raise ValueError(f"a row of {longest} tokens does not fit pad_to={pad_to}")
        return round_up(pad_to, multiple)
    return round_up(max(longest, 1), multiple)


@functools.cache
def _pin() -> bool:
    return torch.cuda.is_available()


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """In page-locked memory when there is a GPU: only then is ``.to(device, non_blocking=True)``
    an asynchronous copy (from pageable memory it is synchronous)."""
    t = torch.from_numpy(a)
    return t.pin_memory() if _pin() else t


def collate(rows: Sequence[Row], width: int, pad_id: int) -> dict:
    """The micro-batch dict: tokens, labels, loss_mask, task_ids, sample_ids, position_ids,
    cu_seqlens (int32), max_seqlen (int)."""
    b, s = len(rows), width
    n_row = np.asarray([len(r.tokens) for r in rows], dtype=np.int64)
    if b and n_row.max(initial=0) > s:
        raise ValueError(f"a row holds {int(n_row.max())} tokens, micro-batch width is {s}")
    tokens = np.full((b, s), pad_id, dtype=np.int64)
    labels = np.zeros((b, s), dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    task_ids = np.full((b, s), -1, dtype=np.int64)
    sample_ids = np.full((b, s), -1, dtype=np.int64)
    # padding tails count from 0 like a segment of their own; real positions are overwritten below
    position_ids = np.maximum(np.arange(s, dtype=np.int64)[None, :] - n_row[:, None], 0)
    total = int(n_row.sum())
    if total:
        # Rows are left-aligned, so the real positions in row-major order are exactly the
        # concatenation of the rows: one boolean-mask scatter per field.
        valid = np.arange(s, dtype=np.int64)[None, :] < n_row[:, None]
        toks = np.concatenate([r.tokens for r in rows]).astype(np.int64, copy=False)
        mask = np.concatenate([r.mask for r in rows])
        lengths = np.concatenate([r.lengths for r in rows]).astype(np.int64, copy=False)
        tasks = np.concatenate([r.tasks for r in rows]).astype(np.int64, copy=False)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        sid = np.zeros(total, dtype=np.int64)  # sample index of every real token
        sid[starts[1:]] = 1
        np.cumsum(sid, out=sid)
        nxt = np.empty(total, dtype=np.int64)
        nxt[:-1] = toks[1:]
        nxt_mask = np.empty(total, dtype=np.float32)
        nxt_mask[:-1] = mask[1:]
        nxt[ends - 1] = 0  # a sample's last token predicts nothing inside the sample
        nxt_mask[ends - 1] = 0.0
        tokens[valid] = toks
        labels[valid] = nxt
        loss_mask[valid] = nxt_mask
        task_ids[valid] = tasks[sid]
        sample_ids[valid] = sid
        position_ids[valid] = np.arange(total, dtype=np.int64) - starts[sid]
    segs = np.concatenate(
        [np.append(r.lengths, s - n) if n < s else r.lengths for r, n in zip(rows, n_row.tolist())]
    ).astype(np.int64) if b else np.zeros(0, np.int64)
    cu = np.zeros(len(segs) + 1, dtype=np.int32)
    np.cumsum(segs, out=cu[1:])
    return {
        "tokens": host_tensor(tokens),
        "labels": host_tensor(labels),
        "loss_mask": host_tensor(loss_mask),
        "task_ids": host_tensor(task_ids),
        "sample_ids": host_tensor(sample_ids),
        "position_ids": host_tensor(position_ids),
        "cu_seqlens": host_tensor(cu),  # read on the host too (packed-sequence plan)
        "max_seqlen": int(segs.max()) if len(segs) else 0,
    }
