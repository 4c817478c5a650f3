"""Context parallelism without TE: load-balanced sharding, the all-gather-KV core attention and
per-chunk RoPE, on 2 gloo ranks, against full attention over the whole sequence (float64
brute force, one document at a time) and megatron's own THD RoPE with a CP group."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from megatron_mft.data.collate import Row, collate
from megatron_mft.data.cp_shard import chunk_positions, gather_order, pad_row_for_cp, shard_batch, shard_index
from megatron_mft.launch.env import join_launcher_store, launcher_store

HEADS, GROUPS, DIM = 4, 2, 8
#: packed segments, each divisible by 2 x cp = 4; at cp=2 the chunks are 1..10 tokens, so samples
#: and chunk boundaries interleave (a 4-token sample is 4 chunks of one token)
LENGTHS = [12, 12, 4, 40, 8, 20]


def test_rank_holds_chunks_i_and_2cp_minus_1_minus_i():
    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert chunk_positions(12, 3, 1).tolist() == [2, 3, 8, 9]
    lens = [8, 4, 0, 12]
    held = [shard_index(lens, 2, r) for r in range(2)]
    assert sorted(np.concatenate(held).tolist()) == list(range(24))
    assert held[0].tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 21, 22, 23]
    full = np.arange(24)
    assert (np.concatenate([full[h] for h in held])[gather_order(lens, 2)] == full).all()
    with pytest.raises(ValueError, match="2 x cp = 4"):
        chunk_positions(6, 2, 0)


def test_pad_row_for_cp_pads_each_sample_without_loss_and_counts_it():
    row = Row.of([(np.arange(1, 6), np.ones(5, np.uint8), 0), (np.arange(7, 11), np.ones(4, np.uint8), 1)])
    padded, added = pad_row_for_cp(row, 2, pad_id=0)
    assert added == 3 and padded.lengths.tolist() == [8, 4]
    assert padded.tokens.tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 7, 8, 9, 10]
    a, b = collate([row], 12, 0), collate([padded], 12, 0)
    # the same targets take loss at the same tokens: padding only adds loss-free positions
    assert a["labels"][a["loss_mask"] > 0].tolist() == b["labels"][b["loss_mask"] > 0].tolist()
    shards = [shard_batch(b, 2, r, packed=True) for r in range(2)]
    assert all(s["tokens"].shape == (1, 6) for s in shards)
    assert shards[0]["tokens"].tolist() == [[1, 2, 0, 0, 7, 10]]
    assert shards[0]["cu_seqlens"] is b["cu_seqlens"]  # stays global


def _reference(q, k, v, lengths, left):
    """float64 full attention, one document at a time (causal, optional sliding window)."""
    outs, start, rep = [], 0, HEADS // GROUPS
    for n in lengths:
        qd, kd, vd = (x[start:start + n].double().transpose(0, 1) for x in (q, k, v))
        kd, vd = kd.repeat_interleave(rep, 0), vd.repeat_interleave(rep, 0)
        i = torch.arange(n)
        d = i[:, None] - i[None, :]
        allowed = (d >= 0) & (d <= (left if left is not None else n))
        scores = (qd @ kd.transpose(1, 2) / DIM ** 0.5).masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1).reshape(n, HEADS * DIM))
        start += n
    return torch.cat(outs)


def _attention(cp, left, portable=False):
    """``portable``: the lower-right CausalBias path that runs off CPU, forced on CPU."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mft.model.attention import PackedCoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                            window_size=None if left is None else (left, 0), context_parallel_size=cp)
    attn = PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", use_flash=False,
                               pg_collection=SimpleNamespace(cp=torch.distributed.group.WORLD))
    if portable:
        attn.cp.prefix_kernel_on_cpu = False
    return attn


def _check(got, want, what):
    err = (got.double() - want).abs().max().item()
    assert err < 1e-5, f"{what}: max error {err}"


def _thd_case(rank, cp, left, portable=False):
    from megatron_mft.model import build_packed_seq_params

    g = torch.Generator().manual_seed(11)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, h, DIM, generator=g) for h in (HEADS, GROUPS, GROUPS))
    weights = torch.randn(t, HEADS * DIM, generator=g, dtype=torch.float64)
    idx = torch.from_numpy(shard_index(LENGTHS, cp, rank))
    leaves = [x[idx].clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    out = _attention(cp, left, portable)(*leaves, None,
                                         packed_seq_params=build_packed_seq_params(cu, max(LENGTHS), "cpu"))
    ref = _reference(*ref_leaves, LENGTHS, left)
    _check(out, ref[idx], f"thd forward, left={left}")
    (out.double() * weights[idx]).sum().backward()
    (ref * weights).sum().backward()
    for got, want, name in zip(leaves, ref_leaves, "qkv"):
        _check(got.grad, want.grad[idx], f"thd d{name}, left={left}")


def _sbhd_case(rank, cp, left, portable=False):
    g = torch.Generator().manual_seed(12)
    s, b = 24, 2
    q, k, v = (torch.randn(s, b, h, DIM, generator=g) for h in (HEADS, GROUPS, GROUPS))
    weights = torch.randn(s, b, HEADS * DIM, generator=g, dtype=torch.float64)
    idx = torch.from_numpy(shard_index([s], cp, rank))
    leaves = [x[idx].clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = _attention(cp, left, portable)(*leaves, None)
    ref = torch.stack([_reference(*(x[:, row] for x in ref_leaves), [s], left) for row in range(b)], dim=1)
    _check(out, ref[idx], f"sbhd forward, left={left}")
    (out.double() * weights[idx]).sum().backward()
    (ref * weights).sum().backward()
    for got, want, name in zip(leaves, ref_leaves, "qkv"):
        _check(got.grad, want.grad[idx], f"sbhd d{name}, left={left}")


def _rope_case(rank, cp):
    """Our THD RoPE on this rank's chunks == megatron's own THD RoPE with the CP group, and ==
    the full sequence's RoPE at the positions this rank holds."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    from megatron_mft.model.rope import rope_thd

    g = torch.Generator().manual_seed(13)
    freqs = torch.randn(max(LENGTHS), 1, 1, DIM, generator=g)
    t = torch.randn(sum(LENGTHS), HEADS, DIM, generator=g)
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    idx = torch.from_numpy(shard_index(LENGTHS, cp, rank))
    ours = rope_thd(t[idx], cu, freqs, cp_size=cp, cp_rank=rank)
    megatron = _apply_rotary_pos_emb_thd(t[idx], cu, freqs, cp_group=torch.distributed.group.WORLD)
    assert torch.equal(ours, megatron)
    assert torch.equal(ours, rope_thd(t, cu, freqs)[idx])


def _worker(rank, world, port):
    from megatron_mft.compat import setup_runtime

    setup_runtime()
    join_launcher_store(rank, world, port, backend="gloo")
    try:
        for left in (None, 5, 0):
            _thd_case(rank, world, left)
            _sbhd_case(rank, world, left)
        _thd_case(rank, world, None, portable=True)
        _sbhd_case(rank, world, None, portable=True)
        _rope_case(rank, world)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_gather_kv_attention_equals_full_attention_on_2_ranks():
    store = launcher_store(2)  # noqa: F841 - served until the ranks are done
    mp.spawn(_worker, args=(2, store.port), nprocs=2, join=True)
