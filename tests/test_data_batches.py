"""Training-time batches (MFTData, collate, sampler): the micro-batch contract of
docs/architecture.md, exactly-once epochs over DP ranks, exact resume, dynamic padding."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_fixtures import DEMO_TOKENIZER, cli_args, demo_subset  # noqa: E402

from megatron_mft.config.data import DataConfig  # noqa: E402
from megatron_mft.data import MFTData  # noqa: E402
from megatron_mft.data.collate import Row, collate  # noqa: E402
from megatron_mft.data.encode import EncodeSpec, encode_tasks  # noqa: E402
from megatron_mft.data.preprocess import main  # noqa: E402
from megatron_mft.data.sampler import EpochSampler  # noqa: E402
from megatron_mft.data.taskdir import discover_tasks  # noqa: E402
from megatron_mft.data.template import TEMPLATES  # noqa: E402

SEQ = 2048
KEYS = {"tokens", "labels", "loss_mask", "task_ids", "sample_ids", "position_ids", "cu_seqlens", "max_seqlen"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("raw"), train=24, val=7)


@pytest.fixture(scope="module")
def offline(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp") / "out"
    assert main(cli_args(raw, out, SEQ, "best-fit")) == 0
    return out


@pytest.fixture(scope="module")
def by_uid(raw):
    enc = encode_tasks(discover_tasks(raw), EncodeSpec(DEMO_TOKENIZER, TEMPLATES["mftcoder"], SEQ))
    out = []
    for t_id, t in enumerate(enc.tasks):
        out += [(tok, m, t_id) for tok, m in t.train + t.val]
    return out


def data(path, **kw) -> MFTData:
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in DataConfig.__dataclass_fields__}
    cfg = DataConfig(path=str(path), seq_length=cfg_kw.pop("seq_length", SEQ), **cfg_kw)
    args = dict(seed=3, micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1) | kw
    return MFTData(cfg, **args)


def test_collate_exact_small_example():
    rows = [Row.of([(np.array([5, 6, 7]), np.array([0, 1, 1], np.uint8), 0),
                    (np.array([8, 9]), np.array([0, 1], np.uint8), 1)]),
            Row.of([(np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], np.uint8), 2)])]
    b = collate(rows, 6, pad_id=0)
    assert set(b) == KEYS
    assert b["tokens"].tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]]
    assert b["labels"].tolist() == [[6, 7, 0, 9, 0, 0], [11, 12, 13, 0, 0, 0]]
    assert b["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]]
    assert b["task_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]]
    assert b["sample_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 6, 10, 12] and b["max_seqlen"] == 4
    assert (b["tokens"].dtype, b["labels"].dtype, b["loss_mask"].dtype, b["task_ids"].dtype,
            b["sample_ids"].dtype, b["position_ids"].dtype, b["cu_seqlens"].dtype) == (
        torch.int64, torch.int64, torch.float32, torch.int64, torch.int64, torch.int64, torch.int32)


def _check_batch(b: dict, rows_samples: list[list[tuple]], width: int, pad_id: int):
    """Every segment of cu_seqlens is one expected sample (or a row's padding tail)."""
    assert set(b) == KEYS
    bsz, s = b["tokens"].shape
    assert s == width and bsz == len(rows_samples)
    cu = b["cu_seqlens"].tolist()
    assert set(range(0, bsz * s + 1, s)) <= set(cu)  # every row boundary is a segment boundary
    flat = {k: b[k].reshape(-1) for k in KEYS - {"cu_seqlens", "max_seqlen"}}
    segs = iter(zip(cu[:-1], cu[1:]))
    sid = 0
    for r, samples in enumerate(rows_samples):
        used = 0
        for tokens, mask, task in samples:
            a, e = next(segs)
            n = len(tokens)
            assert e - a == n
            assert flat["tokens"][a:e].tolist() == tokens.tolist()
            assert flat["labels"][a:e].tolist() == tokens[1:].tolist() + [0]
            assert flat["loss_mask"][a:e].tolist() == mask[1:].tolist() + [0]
            assert flat["position_ids"][a:e].tolist() == list(range(n))
            assert (flat["sample_ids"][a:e] == sid).all() and (flat["task_ids"][a:e] == task).all()
            sid += 1
            used += n
        if used < s:
            a, e = next(segs)
            assert e - a == s - used and e == (r + 1) * s
            assert (flat["tokens"][a:e] == pad_id).all() and (flat["task_ids"][a:e] == -1).all()
            assert (flat["sample_ids"][a:e] == -1).all() and (flat["loss_mask"][a:e] == 0).all()
            assert (flat["labels"][a:e] == 0).all() and flat["position_ids"][a:e].tolist() == list(range(e - a))
    assert next(segs, None) is None
    assert b["max_seqlen"] == max(e - a for a, e in zip(cu[:-1], cu[1:]))


def test_packed_boundaries_match_the_samples(offline, by_uid):
    d = data(offline, micro_batch_size=2, global_batch_size=4)
    assert d.task_names == ["code-completion", "docstring", "doctest", "text-to-code"]
    assert (d.vocab_size, d.eos_id, d.pad_id) == (2048, 2, 2)
    for consumed in range(0, d.rows_per_epoch, 4):
        mbs = d.train_micro_batches(consumed)
        assert len(mbs) == 2
        for b, rows in zip(mbs, d.train_micro_batch_rows(consumed)):
            expect = [[by_uid[u] for u in d.row_sample_uids(int(r))] for r in rows]
            assert sum(len(x) for x in expect) > len(rows)  # real packs: several samples per row
            _check_batch(b, expect, SEQ, d.pad_id)


def _global_order(ranks: list[MFTData], consumed: int) -> list[int]:
    """Reassemble the global batch from every rank's micro batches (Megatron's order)."""
    d0 = ranks[0]
    mbs, dp = d0.micro_batch_size, d0.dp_size
    order = [None] * d0.global_batch_size
    for r, d in enumerate(ranks):
        for j, ids in enumerate(d.train_micro_batch_rows(consumed)):
            order[(j * dp + r) * mbs:(j * dp + r + 1) * mbs] = ids.tolist()
    return order


@pytest.mark.parametrize("batching,mbs,dp,gbs", [("packed", 1, 2, 4), ("dynamic", 2, 2, 20), ("dynamic", 3, 3, 9)])
def test_every_row_exactly_once_per_epoch_across_dp_ranks(offline, batching, mbs, dp, gbs):
    ranks = [data(offline, batching=batching, group_by_length=False, micro_batch_size=mbs, dp_rank=r,
                  dp_size=dp, global_batch_size=gbs) for r in range(dp)]
    n = ranks[0].rows_per_epoch
    assert n % gbs  # the epoch boundary falls inside a global batch
    seq = []
    for consumed in range(0, 2 * n + gbs, gbs):
        seq += _global_order(ranks, consumed)
    e0, e1 = seq[:n], seq[n:2 * n]
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))
    assert e0 != e1  # reshuffled per epoch
    # and at the sample level: an epoch holds every training sample once
    uids = [u for r in e0 for u in ranks[0].row_sample_uids(r)]
    assert len(uids) == len(set(uids)) == ranks[0].manifest["splits"]["train"]["samples"]


def test_resume_mid_epoch_gives_the_same_batches(offline):
    kw = dict(batching="dynamic", micro_batch_size=2, global_batch_size=8, dp_size=2)
    first = {r: data(offline, dp_rank=r, **kw) for r in range(2)}
    run = {(r, c): first[r].train_micro_batches(c) for r in range(2) for c in (0, 8, 16, 24)}
    restarted = {r: data(offline, dp_rank=r, **kw) for r in range(2)}  # a fresh process after a restart
    for r in range(2):
        for c in (16, 24):
            again = restarted[r].train_micro_batches(c)
            assert len(again) == len(run[(r, c)]) == 2
            for x, y in zip(again, run[(r, c)]):
                assert all(torch.equal(x[k], y[k]) for k in KEYS - {"max_seqlen"}) and x["max_seqlen"] == y["max_seqlen"]
    # the two ranks never share a row within a global batch
    rows = [set(np.concatenate(first[r].train_micro_batch_rows(16)).tolist()) for r in range(2)]
    assert not rows[0] & rows[1]


def test_shuffle_is_deterministic_per_seed():
    a, b, c = EpochSampler(50, 1), EpochSampler(50, 1), EpochSampler(50, 2)
    assert a.rows(0, 120).tolist() == b.rows(0, 120).tolist() != c.rows(0, 120).tolist()
    assert a.rows(37, 20).tolist() == a.rows(0, 57).tolist()[37:]  # any offset, same rows


def test_dynamic_padding_pads_to_the_longest_row(offline, by_uid):
    d = data(offline, batching="dynamic", group_by_length=False, micro_batch_size=4, global_batch_size=8)
    for consumed in (0, 8, 16):
        for b, rows in zip(d.train_micro_batches(consumed), d.train_micro_batch_rows(consumed)):
            expect = [[by_uid[u] for u in d.row_sample_uids(int(r))] for r in rows]
            longest = max(len(x[0][0]) for x in expect)
            assert b["tokens"].shape == (4, longest)  # one sample per row, no padding beyond the longest
            _check_batch(b, expect, longest, d.pad_id)
    m8 = data(offline, batching="dynamic", micro_batch_size=4, global_batch_size=8, pad_to_multiple_of=8)
    for b in m8.train_micro_batches(0):
        s = b["tokens"].shape[1]
        lens = (b["task_ids"] >= 0).sum(1)
        assert s % 8 == 0 and s - 8 < int(lens.max()) <= s
    fixed = data(offline, batching="dynamic", micro_batch_size=4, global_batch_size=8, fixed_seq_length=True,
                 pad_to_multiple_of=8)
    assert all(b["tokens"].shape == (4, SEQ) for b in fixed.train_micro_batches(0))


def test_length_grouping_reduces_padding_without_changing_the_rows(offline):
    kw = dict(batching="dynamic", micro_batch_size=2, global_batch_size=16)
    grouped, plain = data(offline, group_by_length=True, **kw), data(offline, group_by_length=False, **kw)
    g_pad = p_pad = 0
    for c in range(0, 64, 16):
        gb, pb = grouped.train_micro_batches(c), plain.train_micro_batches(c)
        assert sorted(np.concatenate(grouped.train_micro_batch_rows(c)).tolist()) == sorted(
            np.concatenate(plain.train_micro_batch_rows(c)).tolist())
        g_pad += sum(int((b["task_ids"] < 0).sum()) for b in gb)
        p_pad += sum(int((b["task_ids"] < 0).sum()) for b in pb)
        # the first micro batch holds the longest rows of the global batch
        first = (gb[0]["task_ids"] >= 0).sum(1).tolist()
        longest = sorted(((b["task_ids"] >= 0).sum(1).tolist() for b in gb), key=max)[-1]
        assert sorted(first) == sorted(longest) and len(gb) == 8  # 16 rows in micro batches of 2
    assert g_pad < p_pad


@pytest.mark.parametrize("batching", ["packed", "dynamic"])
def test_val_micro_batches_shard_a_task_over_ranks(offline, batching):
    ranks = [data(offline, batching=batching, micro_batch_size=2, global_batch_size=4, dp_rank=r, dp_size=2)
             for r in range(2)]
    name = "doctest"
    start, end = ranks[0].manifest["splits"]["val"]["task_packs"][name]
    per_rank = [d.val_micro_batches(name) for d in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) >= 1  # same count on every rank
    assert all(b["tokens"].shape[0] == 2 for mb in per_rank for b in mb)  # always micro_batch_size rows
    n_rows = end - start if batching == "packed" else 7
    real_rows = sum(int(((b["task_ids"] >= 0).sum(1) > 0).sum()) for mb in per_rank for b in mb)
    assert real_rows == n_rows
    assert all(int(b["task_ids"].max()) in (-1, 2) for mb in per_rank for b in mb)
    assert len(ranks[0].val_micro_batches(name, max_batches=1)) == 1
    with pytest.raises(KeyError, match="unknown task"):
        ranks[0].val_micro_batches("nope")


def test_online_mode_matches_offline(raw, offline):
    kw = dict(micro_batch_size=2, global_batch_size=4)
    off = data(offline, **kw)
    on = data(raw, source="online", tokenizer=DEMO_TOKENIZER, packing="best-fit", **kw)
    assert on.task_names == off.task_names and on.rows_per_epoch == off.rows_per_epoch
    for c in (0, 4, 40):
        for x, y in zip(on.train_micro_batches(c), off.train_micro_batches(c)):
            assert all(torch.equal(x[k], y[k]) for k in KEYS - {"max_seqlen"})
    on_val, off_val = on.val_micro_batches("docstring"), off.val_micro_batches("docstring")
    assert len(on_val) == len(off_val) > 0
    for x, y in zip(on_val, off_val):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["loss_mask"], y["loss_mask"])


def test_mftdata_argument_and_path_errors(offline, tmp_path):
    with pytest.raises(ValueError, match="global_batch_size 6 must be a positive multiple"):
        data(offline, micro_batch_size=2, dp_size=2, global_batch_size=6)
    with pytest.raises(ValueError, match="dp_rank 2 not in"):
        data(offline, dp_rank=2, dp_size=2)
    from megatron_mft.errors import UsageError

    with pytest.raises(UsageError, match="no manifest.json"):  # a config error: exit 2
        data(tmp_path)
    with pytest.raises(UsageError, match="< the preprocessed seq_length"):
        data(offline, seq_length=512)
    cfg = DataConfig(path="", seq_length=4, val_ratio=1.5, source="online")
    assert len(cfg.validate()) == 4 and all(p.startswith("data.") for p in cfg.validate())
