"""Encoded tasks -> train and validation splits, packed. Shared by offline and online modes.

- Sample uids enumerate accepted samples task by task (manifest order); within a task, samples
  of training files then of validation files, each in file and line order.
- Validation: a task's validation files when it has any; otherwise ``round(val_ratio * n)``
  of its samples (at least one when ``val_ratio > 0`` and the task has two or more), chosen by
  a permutation seeded with ``(seed, task id)``, so the split is deterministic per seed.
- Training windows mix tasks (next-fit in input order; best-fit over everything). Validation
  windows are packed per task, because validation loss is reported per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_mft.data.encode import Encoded
from megatron_mft.data.packing import Packs, pack, padding_ratio

Sample = tuple[np.ndarray, np.ndarray]


@dataclass
class SplitPlan:
    samples: list[Sample] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)
    packs: Packs = field(default_factory=list)
    #: task name -> [first pack, end pack) (validation split only).
    task_packs: dict[str, list[int]] = field(default_factory=dict)

    lengths: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def padding_ratio(self, seq_length: int) -> float:
        return padding_ratio(self.tokens, len(self.packs), seq_length)


def held_out(n: int, val_ratio: float, seed: int, task_id: int) -> set[int]:
    """Indices of a task's ``n`` training items held out for validation (tasks without validation
    files): ``round(val_ratio * n)``, at least one when ``val_ratio > 0`` and ``n >= 2``, never all;
    a permutation seeded with ``(seed, task id)``. Items are samples, or pairs in preference data."""
    k = int(round(val_ratio * n))
    if val_ratio > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return set(np.random.default_rng([seed, task_id]).permutation(n)[:k].tolist()) if k else set()


def plan_splits(
    encoded: Encoded, *, seq_length: int, packing: str, val_ratio: float, seed: int
) -> tuple[SplitPlan, SplitPlan]:
    train, val = SplitPlan(), SplitPlan()
    uid = 0
    val_parts: list[tuple[str, list[Sample], list[int], int]] = []
    for t_id, task in enumerate(encoded.tasks):
        n = len(task.train)
        uids = list(range(uid, uid + n + len(task.val)))
        uid += n + len(task.val)
        if task.val:
            held = set()
            v_samples, v_uids = list(task.val), uids[n:]
        else:
            held = held_out(n, val_ratio, seed, t_id)
            v_samples = [task.train[i] for i in sorted(held)]
            v_uids = [uids[i] for i in sorted(held)]
        keep = [i for i in range(n) if i not in held] if held else range(n)
        train.samples += [task.train[i] for i in keep]
        train.tasks += [t_id] * len(keep)
        train.uids += [uids[i] for i in keep]
        val_parts.append((task.files.name, v_samples, v_uids, t_id))
    train.lengths = [len(s[0]) for s in train.samples]
    train.packs = pack(train.lengths, seq_length, packing)
    for name, samples, uids, t_id in val_parts:
        base = len(val.samples)
        start = len(val.packs)
        lengths = [len(s[0]) for s in samples]
        val.packs += [[base + i for i in p] for p in pack(lengths, seq_length, packing)]
        val.samples += samples
        val.lengths += lengths
        val.tasks += [t_id] * len(samples)
        val.uids += uids
        val.task_packs[name] = [start, len(val.packs)]
    return train, val
