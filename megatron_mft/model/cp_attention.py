"""All-gather-KV context-parallel core attention, for every path without Transformer Engine.

Each CP rank holds chunks r and 2cp-1-r of every sequence (megatron_mft.data.cp_shard). Keys and
values are all-gathered over the CP group and put back in sequence order; each rank then attends
each of its query chunks to the causal prefix of the sequence that chunk needs: a chunk at
positions P..P+c-1 sees keys 0..P+c-1, bottom-right-aligned causal (and P-left..P+c-1 with a
sliding window). Sequences are the packed segments of the global ``cu_seqlens`` (THD) or whole
rows (SBHD, dynamic padding), so samples never see each other.

No [queries, keys] mask exists for causal layers: on CPU a chunk is a full block over the earlier
keys plus a causal c x c diagonal block, two calls of the flash kernel merged by log-sum-exp
(``_PrefixCausalAttention``); elsewhere torch's lower-right ``CausalBias`` (flash/efficient
kernels on CUDA). Windowed layers use a [c, c + left] mask per chunk, bounded by the window.

The gather's backward is a reduce-scatter of dK/dV (every rank's queries contribute to every
rank's keys), so gradients are exact. Memory per rank: the rank's own activations plus the whole
sequence's K/V per layer (small with GQA); megatron's TE path (p2p ring, a2a) is the one for the
longest contexts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron_mft.data.cp_shard import gather_order


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


def chunk_starts(length: int, cp: int, rank: int) -> tuple[int, int]:
    """Sequence positions where this rank's two query chunks start (chunks r and 2cp-1-r)."""
    c = length // (2 * cp)
    return rank * c, (2 * cp - 1 - rank) * c


def window_chunk_mask(start: int, c: int, left: int, device) -> tuple[int, torch.Tensor]:
    """First key and boolean [c, keys] mask of a windowed query chunk at ``start``: query p sees
    keys p-left..p; keys before ``start - left`` are not read."""
    lo = max(0, start - left)
    d = torch.arange(start, start + c, device=device)[:, None] - torch.arange(lo, start + c, device=device)[None, :]
    return lo, (d >= 0) & (d <= left)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixCausalAttention(torch.autograd.Function):
    """Query chunks of ``c`` tokens at sequence positions ``starts`` each attend the causal
    prefix of k/v (bottom-right-aligned causal), with no mask: per chunk, the CPU flash kernel
    on the causal diagonal block and on the full block of earlier keys, merged by log-sum-exp.
    Backward runs the kernel's backward on each block with the merged output and log-sum-exp
    (as ring attention does), which gives exactly the full attention's dQ/dK/dV.

    q [n, heads, len(starts) * c, d], k/v [n, groups, length, d]; GQA is native in the kernel.
    The output is a [n, heads, q, d] view of a token-major buffer, so the caller's reshape back
    to [tokens, heads * d] copies nothing."""

    @staticmethod
    def forward(ctx, q, k, v, starts: tuple, scale: Optional[float]):
        n, heads, t, d = q.shape
        c = t // len(starts)
        out = q.new_empty(n, t, heads, d).transpose(1, 2)
        lse = q.new_empty(n, heads, t, dtype=torch.float32)
        for j, start in enumerate(starts):
            rows = slice(j * c, (j + 1) * c)
            qj, diag = q[:, :, rows], slice(start, start + c)
            o, l = _flash_cpu(qj, k[:, :, diag], v[:, :, diag], 0.0, True, scale=scale)
            if start:
                o_before, l_before = _flash_cpu(qj, k[:, :, :start], v[:, :, :start], 0.0, False, scale=scale)
                l_all = torch.logaddexp(l.float(), l_before.float())
                o = (o.float() * (l - l_all).exp().unsqueeze(-1)
                     + o_before.float() * (l_before - l_all).exp().unsqueeze(-1))
                l = l_all
            out[:, :, rows] = o
            lse[:, :, rows] = l
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.starts, ctx.scale = starts, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        c = q.shape[2] // len(ctx.starts)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for j, start in enumerate(ctx.starts):
            rows = slice(j * c, (j + 1) * c)
            g, qj, oj, lj = grad[:, :, rows], q[:, :, rows], out[:, :, rows], lse[:, :, rows]
            diag = slice(start, start + c)
            dqj, dkj, dvj = _flash_cpu_backward(g, qj, k[:, :, diag], v[:, :, diag], oj, lj, 0.0, True,
                                                scale=ctx.scale)
            dk[:, :, diag] += dkj
            dv[:, :, diag] += dvj
            if start:
                dqb, dkb, dvb = _flash_cpu_backward(g, qj, k[:, :, :start], v[:, :, :start], oj, lj, 0.0, False,
                                                    scale=ctx.scale)
                dqj = dqj + dqb
                dk[:, :, :start] += dkb
                dv[:, :, :start] += dvb
            dq[:, :, rows] = dqj
        return dq, dk, dv, None, None


class ContextParallelAttention:
    """The CP part of ``PackedCoreAttention``: gathers K/V once per layer, then attends per run
    of equal-length sequences (batched over the run), each query chunk to its causal prefix."""

    def __init__(self, group, heads: int, groups: int, head_dim: int, scale: Optional[float],
                 window_left: Optional[int]):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.scale, self.window_left = scale, window_left

    #: the mask-free CPU kernel pair (tests switch it off to check the portable path on CPU)
    prefix_kernel_on_cpu = True

    def _sdpa(self, q, k, v, length: int, p: float, cache: dict) -> torch.Tensor:
        """q [n, heads, 2c, d] (this rank's two chunks) attends k/v [n, groups, length, d]
        (sequence order); returns [n, heads, 2c, d]."""
        starts = chunk_starts(length, self.cp, self.rank)
        if self.window_left is None and p == 0.0 and q.device.type == "cpu" and self.prefix_kernel_on_cpu:
            return _PrefixCausalAttention.apply(q, k, v, starts, self.scale)
        c = length // (2 * self.cp)
        gqa = self.groups != self.heads
        if gqa and q.device.type != "cpu":
            # CUDA's kernels take a mask or a lower-right causal bias, but not with enable_gqa
            # (that combination falls back to the O(s^2)-memory math kernel): expand K/V instead.
            rep = self.heads // self.groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        outs = []
        for j, start in enumerate(starts):
            qj, end = q[:, :, j * c:(j + 1) * c], start + c
            if self.window_left is None:
                lo, mask = 0, causal_lower_right(c, end)
            else:
                key = ("cp-window", start, c, self.window_left)
                if key not in cache:
                    cache[key] = window_chunk_mask(start, c, self.window_left, q.device)
                lo, mask = cache[key]
            outs.append(F.scaled_dot_product_attention(qj, k[:, :, lo:end], v[:, :, lo:end], attn_mask=mask,
                                                       dropout_p=p, scale=self.scale, enable_gqa=gqa))
        return torch.cat(outs, dim=2)

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
