"""NF4 quantise/dequantise (megatron_mft.peft.nf4, bitsandbytes underneath) against an independent
float64 reference built from the papers' definitions:

- the 16 NF4 levels (Dettmers et al. 2023, QLoRA, section 3 and appendix E): normal quantiles
  at 8 evenly spaced probabilities from 0.9677083 down to 0.5 for the positive half, 7 for the
  negative half, plus an exact 0, scaled to [-1, 1];
- blocks of 64 consecutive elements (of the flat weight), each scaled by its absmax, each
  element mapped to the nearest level;
- double quantisation: the fp32 absmax values minus their mean, in blocks of 256, scaled by
  each block's absmax and mapped to the nearest value of the signed 8-bit dynamic map
  (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": dynamic tree
  quantisation, exponents 10^-6..10^0, linear fractions in [0.1, 1]).

The chosen level must be exact: element by element, except where the float64 normalised value
lies within float32 rounding of a midpoint between two levels (either is right; counted)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from megatron_mft.peft.nf4 import NF4_BYTES_PER_PARAM, NF4Weight  # noqa: E402

#: the levels as printed in the QLoRA paper, appendix E
QLORA_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
               -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
               0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0]
TIE = 1e-6  # |normalised - midpoint| below this: float32 arithmetic may pick either neighbour


def nf4_levels() -> np.ndarray:
    normal, offset = statistics.NormalDist(), 0.9677083  # = mean of 1 - 1/(2*15) and 1 - 1/(2*16)
    pos = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    v = np.array(sorted(pos + [0.0] + neg))
    return v / v.max()


def dynamic_map() -> np.ndarray:
    """Signed 8-bit dynamic tree map: for exponent 10^(i-6), i = 0..6, 2^i linear fractions
    (midpoints of 2^i + 1 points in [0.1, 1]) of either sign; plus 0 and 1. 256 values."""
    vals = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1)
        frac = (edges[:-1] + edges[1:]) / 2
        vals += list(10.0 ** (i - 6) * frac) + list(-(10.0 ** (i - 6)) * frac)
    return np.sort(np.array(vals))


def nearest(x: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest level, and whether x is within TIE of a midpoint (ambiguous)."""
    idx = np.abs(x[:, None] - levels[None, :]).argmin(1)
    mids = (levels[:-1] + levels[1:]) / 2
    ambiguous = np.abs(x[:, None] - mids[None, :]).min(1) < TIE
    return idx, ambiguous


def blocks(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_nf4_levels_are_the_papers():
    levels = nf4_levels()
    assert levels == pytest.approx(QLORA_TABLE, abs=2e-7)  # the table is float32-rounded
    assert len(set(levels.tolist())) == 16 and levels[7] == 0.0
    assert len(dynamic_map()) == 256 and len(set(dynamic_map().tolist())) == 256


def weight_under_test() -> torch.Tensor:
    """A frozen-weight-like tensor: rows not a multiple of 64, more than 256 blocks (two nested
    blocks, the last partial), heavy tails, exact zeros, an all-zero block, a one-spike block."""
    g = torch.Generator().manual_seed(0)
    # an even element count: bitsandbytes' CPU dequantiser sends odd ones to a torch.compile'd
    # fallback (tens of seconds to compile here)
    w = torch.randn(37, 530, generator=g, dtype=torch.float32) * 0.02
    w[3, :40] *= 50.0  # outliers
    flat = w.view(-1)
    flat[640:704] = 0.0  # block 10: all zero
    flat[704:768] = 0.0
    flat[730] = -0.7  # block 11: one spike
    flat[1000:1010] = 0.0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantise_dequantise_equal_the_float64_reference(dtype):
    dense = weight_under_test().to(dtype)
    q = NF4Weight.quantize(dense)
    st = q.state
    x = dense.float().reshape(-1).double().numpy()
    n = x.size
    levels, dmap = nf4_levels(), dynamic_map()
    # the code books held are the references' (float32-rounded)
    assert st.code.double().numpy() == pytest.approx(levels, abs=2e-7)
    assert st.state2.code.double().numpy() == pytest.approx(dmap, abs=1e-7)
    assert (st.blocksize, st.state2.blocksize) == (64, 256)

    # 1. absmax per block of 64, each element's level
    absmax = np.array([np.abs(b).max() for b in blocks(x, 64)])
    scale = np.repeat(np.where(absmax > 0, absmax, 1.0), 64)[:n]
    want, tie = nearest(x / scale, levels)
    packed = q.packed.reshape(-1).to(torch.int64).numpy()
    got = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]  # first element: high nibble
    assert np.array_equal(got[~tie], want[~tie]), np.flatnonzero((got != want) & ~tie)[:10]
    assert tie.sum() <= n // 1000  # only float32 ties may differ (and then by one level)
    assert np.all(np.abs(got[tie] - want[tie]) <= 1)

    # 2. double quantisation of the absmax values: mean offset, blocks of 256, 8-bit dynamic map
    offset = absmax.mean()
    assert float(st.offset) == pytest.approx(offset, rel=1e-6)
    centred = absmax - float(st.offset)
    absmax2 = np.array([np.abs(b).max() for b in blocks(centred, 256)])
    assert st.state2.absmax.double().numpy() == pytest.approx(absmax2, rel=1e-6)
    scale2 = np.repeat(absmax2, 256)[: len(centred)]
    want8, tie8 = nearest(centred / scale2, dmap)
    got8 = st.absmax.to(torch.int64).numpy()
    assert np.array_equal(got8[~tie8], want8[~tie8]), np.flatnonzero((got8 != want8) & ~tie8)[:10]

    # 3. dequantised = level x (dynamic value x absmax2 + offset), in float64, with the codes chosen
    block_scale = dmap[got8] * scale2 + float(st.offset)
    ref = levels[got] * np.repeat(block_scale, 64)[:n]
    out = q.dequantize(torch.float32).reshape(-1).double().numpy()
    assert q.dequantize().dtype == dtype and q.dequantize().shape == dense.shape
    if dtype == torch.float32:
        assert out == pytest.approx(ref, rel=1e-6, abs=1e-9)
    else:  # the dense weight comes back in its own dtype: the reference rounded to it, within 1 ulp
        ref_rounded = torch.from_numpy(ref).to(dtype).double().numpy()
        assert out == pytest.approx(ref_rounded, rel=2**-7, abs=1e-9)
        assert np.mean(out == ref_rounded) > 0.99
    # the double-quantised block scale stays near the true absmax
    assert np.abs(block_scale - absmax).max() <= 0.01 * absmax.max()
    # storage: 4-bit codes, one 8-bit absmax per 64, one fp32 absmax per 256 x 64, the offset,
    # the two code books (16 and 256 fp32): NF4_BYTES_PER_PARAM per element plus fixed tables
    blocks64 = -(-n // 64)
    held = -(-n // 2) + blocks64 + 4 * -(-blocks64 // 256) + 4 + 4 * (16 + 256)
    assert q.nbytes() == held
    assert abs(held - NF4_BYTES_PER_PARAM * n) <= 4 * (16 + 256) + 4 + 4 + 1 + 1
