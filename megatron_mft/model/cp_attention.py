"""All-gather-KV context-parallel core attention, for every path without Transformer Engine.

Each CP rank holds chunks r and 2cp-1-r of every sequence (megatron_mft.data.cp_shard). Keys and
values are all-gathered over the CP group and put back in sequence order; each rank then attends
its own query chunks to them, with the causal offset of each chunk (query at global position p
sees keys 0..p of its own sequence, and p-left..p with a sliding window). Sequences are the
packed segments of the global ``cu_seqlens`` (THD) or whole rows (SBHD, dynamic padding), so
samples never see each other. Keys past the rank's last query chunk are never read.

The gather's backward is a reduce-scatter of dK/dV (every rank's queries contribute to every
rank's keys), so gradients are exact. Memory: K/V of the whole sequence per layer (GQA keeps
them small next to Q); megatron's TE path (p2p ring, a2a) is the one for the longest contexts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_mft.data.cp_shard import chunk_positions, gather_order


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward: reduce-scatter (sum, this rank's part)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)  # gloo has no reduce-scatter
        return grad.chunk(world, dim=0)[rank].clone(), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


def cp_mask(length: int, cp: int, rank: int, left: Optional[int], device) -> torch.Tensor:
    """Boolean [2c, keys]: which keys (sequence order, trimmed after the last query) each of this
    rank's queries sees; causal, and within ``left`` when windowed."""
    qpos = torch.from_numpy(chunk_positions(length, cp, rank)).to(device)
    keys = (2 * cp - rank) * (length // (2 * cp))
    kpos = torch.arange(keys, device=device)
    d = qpos[:, None] - kpos[None, :]
    allowed = d >= 0
    if left is not None:
        allowed &= d <= left
    return allowed


class ContextParallelAttention:
    """The CP part of ``PackedCoreAttention``: plans per micro batch, attends per run of
    equal-length sequences (one batched SDPA call each)."""

    def __init__(self, group, heads: int, groups: int, head_dim: int, scale: Optional[float],
                 window_left: Optional[int]):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.scale, self.window_left = scale, window_left

    def _sdpa(self, q, k, v, length: int, p: float, cache: dict) -> torch.Tensor:
        """q [n, heads, 2c, d] attends k/v [n, groups, length, d] (sequence order)."""
        key = ("cp", length, self.window_left, self.rank)
        mask = cache.get(key)
        if mask is None:
            mask = cache[key] = cp_mask(length, self.cp, self.rank, self.window_left, q.device)
        keys = mask.shape[1]
        k, v = k[:, :, :keys], v[:, :, :keys]
        gqa = self.groups != self.heads
        if gqa and q.is_cuda:  # masked SDPA with enable_gqa falls back to the math kernel on CUDA
            rep = self.heads // self.groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale,
                                              enable_gqa=gqa)

    def _full(self, x: torch.Tensor, seg_lens: list[int], cache: dict) -> torch.Tensor:
        """All-gather along dim 0 and reorder into sequence order."""
        key = ("cp-order", tuple(seg_lens))
        perm = cache.get(key)
        if perm is None:
            perm = cache[key] = torch.from_numpy(gather_order(seg_lens, self.cp)).to(x.device)
        return gather_sequence(x, self.group).index_select(0, perm)

    def thd(self, q, k, v, runs: list, seg_lens: list[int], p: float, cache: dict) -> torch.Tensor:
        """q [t/cp, heads, d], k/v [t/cp, groups, d]; ``runs`` from the global cu_seqlens."""
        kf, vf = self._full(k, seg_lens, cache), self._full(v, seg_lens, cache)
        outs = []
        for start, count, length in runs:
            local, lstart = length // self.cp, start // self.cp
            qb = q[lstart:lstart + count * local].unflatten(0, (count, local)).transpose(1, 2)
            kb, vb = (x[start:start + count * length].unflatten(0, (count, length)).transpose(1, 2) for x in (kf, vf))
            ob = self._sdpa(qb, kb, vb, length, p, cache)
            outs.append(ob.transpose(1, 2).reshape(count * local, self.heads * self.head_dim))
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

    def sbhd(self, q, k, v, p: float, cache: dict) -> torch.Tensor:
        """q [s/cp, b, heads, d], k/v [s/cp, b, groups, d]: each row is one sequence of s tokens."""
        local, b = q.shape[0], q.shape[1]
        s = local * self.cp
        kf, vf = self._full(k, [s], cache), self._full(v, [s], cache)
        qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, kf, vf))
        out = self._sdpa(qb, kb, vb, s, p, cache)
        return out.permute(2, 0, 1, 3).reshape(local, b, self.heads * self.head_dim)
