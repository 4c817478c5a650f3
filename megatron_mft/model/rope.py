"""RoPE without Transformer Engine: megatron-core's fused-RoPE slots filled with torch code.

megatron's unfused RoPE, per layer and for q and k separately, recomputes cos/sin of the
frequencies and copies the result once more (``cat`` with an empty pass-through part); on
packed (THD) batches it also reads ``cu_seqlens`` back to the host (a device sync) and rebuilds
the per-token frequencies with a Python loop over documents. That was ~9 ms of a layer's
~60 ms forward+backward on the CPU profile (docs/performance.md). Here the per-token cos/sin
tables are built once per micro batch (cached on the identity of megatron's frequency tensor
and of ``cu_seqlens``) and shared by every layer; the arithmetic is megatron's own
(``t * cos + rotate_half(t) * sin``, cos/sin cast to t's dtype), so results are bit-identical.

Installed only into empty slots: with TE importable its fused kernels stay.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

#: one slot: (freqs, cu_seqlens, rows, dtype) -> (cos, sin); the key holds references, so an
#: identity match cannot be a recycled object
_cache: list = [None, None]


def _tables(freqs: torch.Tensor, cu_seqlens: Optional[torch.Tensor], rows: int, dtype: torch.dtype,
            cp: tuple = (1, 0)):
    key = _cache[0]
    if (key is not None and key[0] is freqs and key[1] is cu_seqlens and key[2] == rows and key[3] == dtype
            and key[4] == cp):
        return _cache[1]
    if cu_seqlens is None:  # [s, b, h, d] with freqs [>=s, 1, 1, d]
        f = freqs[:rows]
    elif cp[0] > 1:  # this CP rank's chunks of each segment (global cu_seqlens; data/cp_shard.py)
        from megatron_mft.data.cp_shard import chunk_positions

        cu = cu_seqlens.tolist()
        pos = torch.from_numpy(np.concatenate([chunk_positions(b - a, *cp) for a, b in zip(cu[:-1], cu[1:]) if b > a]))
        f = freqs.reshape(freqs.shape[0], freqs.shape[-1])[pos.to(freqs.device)].unsqueeze(1)
    else:  # [t, h, d]: positions restart at 0 in each segment (megatron's THD mapping)
        cu = cu_seqlens.to(torch.long)
        starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=rows)
        pos = torch.arange(rows, device=freqs.device) - starts
        f = freqs.reshape(freqs.shape[0], freqs.shape[-1])[pos].unsqueeze(1)  # [t, 1, d]
    tables = torch.cos(f).to(dtype), torch.sin(f).to(dtype)
    _cache[:] = [(freqs, cu_seqlens, rows, dtype, cp), tables]
    return tables


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x = t[..., :rot]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    out = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rot == t.shape[-1] else torch.cat((out, t[..., rot:]), dim=-1)


def rope_bshd(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
              interleaved: bool = False) -> torch.Tensor:
    """Signature of TE's ``fused_apply_rotary_pos_emb`` (t: [s, b, h, d], freqs [s, 1, 1, d])."""
    if interleaved:
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=True)
    cos, sin = _tables(freqs, None, t.shape[0], t.dtype)
    return _rotate(t, cos, sin)


def rope_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, cp_size: int = 1,
             cp_rank: int = 0, **_) -> torch.Tensor:
    """Signature of TE's ``fused_apply_rotary_pos_emb_thd`` (t: [t, h, d], packed)."""
    cos, sin = _tables(freqs, cu_seqlens, t.shape[0], t.dtype, (cp_size, cp_rank))
    return _rotate(t, cos, sin)


def install_torch_rope() -> bool:
    """Fill megatron's empty fused-RoPE slots (no TE) with the functions above; True when
    ``apply_rope_fusion`` may be set (either TE's kernels or these are in place)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = rope_bshd
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = rope_thd
    return True
