"""Packing algorithms (megatron_mft.data.packing): correctness, MFTCoder next-fit semantics, padding."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_mft.data.packing import pack, pack_best_fit, pack_next_fit, padding_ratio


def _check(lengths, packs, cap):
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in p) <= cap for p in packs)
    assert all(p for p in packs)


@pytest.mark.parametrize("algo", ["none", "next-fit", "best-fit"])
def test_every_sample_once_and_windows_respected(algo):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=2000).tolist()
    packs = pack(lengths, 512, algo)
    _check(lengths, packs, 512)
    assert pack(lengths, 512, algo) == packs  # deterministic


def test_next_fit_is_mftcoder_pack_mode():
    # fill in order; a sample that does not fit closes the window and opens the next one
    assert pack_next_fit([3, 4, 2, 5, 1, 1], 8) == [[0, 1], [2, 3, 4], [5]]
    assert pack_next_fit([8, 8], 8) == [[0], [1]]


def test_best_fit_decreasing_exact_small_case():
    # sorted desc: 6(#1) 5(#3) 4(#0) 3(#4) 2(#2) 2(#5); best fit = the fullest window that still fits
    assert pack_best_fit([4, 6, 2, 5, 3, 2], 8) == [[1, 2], [3, 4], [0, 5]]
    assert pack_best_fit([5, 5, 3, 3], 8) == [[0, 2], [1, 3]]


def test_best_fit_pads_no_more_than_next_fit():
    rng = np.random.default_rng(1)
    for _ in range(5):
        lengths = np.minimum(rng.lognormal(5.5, 0.9, size=3000).astype(int) + 10, 4096).tolist()
        nf, bf, none = (padding_ratio(sum(lengths), len(pack(lengths, 4096, algo)), 4096)
                        for algo in ("next-fit", "best-fit", "none"))
        assert bf <= nf < none
        lower = 1 - sum(lengths) / (-(-sum(lengths) // 4096) * 4096)
        assert bf <= lower + 0.01


def test_too_long_and_unknown_algorithm():
    with pytest.raises(ValueError, match="longer than the window"):
        pack([5, 9], 8, "best-fit")
    with pytest.raises(ValueError, match="expected one of"):
        pack([1], 8, "first-fit")
