"""Load-balanced context-parallel sharding of a micro batch (megatron's layout).

Each sequence of length L is cut into 2 x cp chunks of L / (2 cp) tokens; CP rank r holds chunks
r and 2cp-1-r, so under a causal mask every rank does the same attention work. For packed rows
(THD) every segment of ``cu_seqlens`` (each sample, each row's padding tail) is split on its own;
for dynamic padding (one sample per row, SBHD) each row is one sequence. ``cu_seqlens`` and
``max_seqlen`` stay global (megatron's and TE's convention for CP: the attention and RoPE derive
the local layout from them).

Lengths must divide by 2 x cp: ``pad_row_for_cp`` pads each packed sample with pad tokens that
take no loss (a causal model's real tokens never see them, so losses are unchanged).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_mft.data.collate import Row, round_up

#: the micro-batch fields with one entry per token, sharded along the sequence
TOKEN_FIELDS = ("tokens", "labels", "loss_mask", "task_ids", "sample_ids", "position_ids")


def chunk_positions(length: int, cp: int, rank: int) -> np.ndarray:
    """Positions inside one sequence of ``length`` that CP rank ``rank`` holds, in its order."""
    if length % (2 * cp):
        raise ValueError(f"context parallelism: a sequence of {length} tokens does not divide into "
                         f"2 x cp = {2 * cp} chunks")
    c = length // (2 * cp)
    return np.concatenate([np.arange(rank * c, (rank + 1) * c), np.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def shard_index(seg_lens: Sequence[int], cp: int, rank: int) -> np.ndarray:
    """Indices into the concatenated sequences (flattened tokens) that ``rank`` holds."""
    parts, start = [], 0
    for n in seg_lens:
        if n:
            parts.append(start + chunk_positions(int(n), cp, rank))
        start += int(n)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def gather_order(seg_lens: Sequence[int], cp: int) -> np.ndarray:
    """Permutation ``perm`` with ``full = gathered[perm]``, where ``gathered`` is the ranks'
    local tensors concatenated in rank order (an all-gather) and ``full`` is in sequence order."""
    held = np.concatenate([shard_index(seg_lens, cp, r) for r in range(cp)])
    return np.argsort(held, kind="stable")


def seg_lens_of(batch: dict, packed: bool) -> list[int]:
    """The sequences CP splits: ``cu_seqlens`` segments (packed) or whole rows (dynamic)."""
    if packed:
        cu = batch["cu_seqlens"].tolist()
        return [b - a for a, b in zip(cu[:-1], cu[1:])]
    b, s = batch["tokens"].shape
    return [s] * b


def shard_batch(batch: dict, cp: int, rank: int, packed: bool) -> dict:
    """This rank's part of a collated micro batch: token fields [b, s] -> [b, s / cp]."""
    if cp == 1:
        return batch
    b, s = batch["tokens"].shape
    if s % (2 * cp):
        raise ValueError(f"context parallelism: micro-batch width {s} is not divisible by 2 x cp = {2 * cp}")
    idx = torch.from_numpy(shard_index(seg_lens_of(batch, packed), cp, rank))
    out = dict(batch)
    for k in TOKEN_FIELDS:
        if k in batch:
            out[k] = batch[k].reshape(-1)[idx.to(batch[k].device)].reshape(b, s // cp)
    return out


def pad_row_for_cp(row: Row, cp: int, pad_id: int) -> tuple[Row, int]:
    """Each sample of ``row`` padded at its end to a multiple of 2 x cp (pad tokens, no loss);
    returns the row and the number of padding tokens added (counted in the data stats)."""
    if cp == 1 or not len(row):
        return row, 0
    m = 2 * cp
    new_lens = np.asarray([round_up(int(n), m) for n in row.lengths], dtype=np.int64)
    added = int(new_lens.sum() - row.lengths.sum())
    if not added:
        return row, 0
    tokens = np.full(int(new_lens.sum()), pad_id, dtype=row.tokens.dtype)
    mask = np.zeros(int(new_lens.sum()), dtype=row.mask.dtype)
    src = np.cumsum(row.lengths) - row.lengths
    dst = np.cumsum(new_lens) - new_lens
    for a, b, n in zip(src.tolist(), dst.tolist(), row.lengths.tolist()):
        tokens[b:b + n] = row.tokens[a:a + n]
        mask[b:b + n] = row.mask[a:a + n]
    return Row(tokens, mask, new_lens, row.tasks), added
