"""Packing samples into ``seq_length`` windows (MFTCoder paper section 3.3).

- ``none``: one sample per window (normal SFT; the source rows for dynamic padding).
- ``next-fit``: MFTCoder's pack mode: fill the current window in input order; when the next
  sample does not fit, close the window (the rest is padding) and open a new one.
- ``best-fit``: best-fit-decreasing bin packing: longest sample first, each into the open
  window with the least room that still fits it. Near-zero padding when many small samples
  exist to fill the gaps.
All three are deterministic: ties are broken by input position.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from typing import Callable, Sequence

import numpy as np

Packs = list[list[int]]


def pack_none(lengths: Sequence[int], capacity: int) -> Packs:
    return [[i] for i in range(len(lengths))]


def pack_next_fit(lengths: Sequence[int], capacity: int) -> Packs:
    packs: Packs = []
    room = -1
    for i, n in enumerate(lengths):
        if n > room:
            packs.append([])
            room = capacity
        packs[-1].append(i)
        room -= n
    return packs


def pack_best_fit(lengths: Sequence[int], capacity: int) -> Packs:
    """Best-fit decreasing in O(n log n): open windows are bucketed by their remaining room.

    ``rooms`` is the sorted list of distinct remaining-room values that have an open window
    (at most ``capacity`` values), so finding the tightest fit is one bisect.
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable").tolist()
    sizes_desc = sizes[order].tolist()
    packs: Packs = []
    rooms: list[int] = []
    by_room: dict[int, list[int]] = {}
    for i, n in zip(order, sizes_desc):
        k = bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            bucket = by_room[room]
            b = heapq.heappop(bucket)  # lowest window id: deterministic
            if not bucket:
                del by_room[room]
                rooms.pop(k)
        else:
            b, room = len(packs), capacity
            packs.append([])
        packs[b].append(i)
        left = room - n
        if left > 0:
            if left in by_room:
                heapq.heappush(by_room[left], b)
            else:
                by_room[left] = [b]
                insort(rooms, left)
    return packs


PACKERS: dict[str, Callable[[Sequence[int], int], Packs]] = {
    "none": pack_none,
    "next-fit": pack_next_fit,
    "best-fit": pack_best_fit,
}


def pack(lengths: Sequence[int], capacity: int, algorithm: str) -> Packs:
    """Indices into ``lengths`` grouped into windows of at most ``capacity`` tokens."""
    if algorithm not in PACKERS:
        raise ValueError(f"packing {algorithm!r}: expected one of {', '.join(PACKERS)}")
    too_long = np.flatnonzero(np.asarray(lengths, dtype=np.int64) > capacity)
    if len(too_long):
        raise ValueError(f"{len(too_long)} sample(s) longer than the window {capacity} (first: #{too_long[0]})")
    return PACKERS[algorithm](lengths, capacity)


def padding_ratio(tokens: int, windows: int, capacity: int) -> float:
    """Padding tokens over all tokens of ``windows`` windows of ``capacity`` holding ``tokens``."""
    return 1.0 - tokens / (windows * capacity) if windows else 0.0
