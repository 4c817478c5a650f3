"""Packed sequences never attend to each other: THD forward (and backward) == each document run
alone; sliding windows apply within each document."""

import pytest
import torch

from megatron_mft.model.attention import PackedCoreAttention, plan_runs

HEADS, GROUPS, DIM = 4, 2, 8
#: segment lengths of a packed micro batch: equal-length runs, a long document, 1-token documents
LENGTHS = [7, 7, 7, 30, 1, 1, 12, 13, 40]


def test_plan_runs_batches_equal_consecutive_segments():
    cu = [0, 30, 60, 90, 100, 100, 110, 500, 501]
    assert plan_runs(cu) == [(0, 3, 30), (90, 2, 10), (110, 1, 390), (500, 1, 1)]


def _core_attention(window_size, skip_freq=None, layer_number=1):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, kv_channels=DIM, window_size=window_size,
                            window_attn_skip_freq=skip_freq, attention_dropout=0.0)
    return PackedCoreAttention(cfg, layer_number, AttnMaskType.causal, "self", use_flash=False)


def _reference(q, k, v, lengths, left):
    """float64 brute force, one document at a time, with megatron's own sliding-window mask."""
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    outs, start = [], 0
    rep = HEADS // GROUPS
    for n in lengths:
        qd, kd, vd = (x[start:start + n].double().transpose(0, 1) for x in (q, k, v))
        kd, vd = kd.repeat_interleave(rep, 0), vd.repeat_interleave(rep, 0)
        scores = qd @ kd.transpose(1, 2) / DIM ** 0.5
        blocked = get_sliding_window_causal_mask(n, n, (left, 0)) if left is not None else \
            torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(blocked.cpu(), float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1).reshape(n, HEADS * DIM))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("left", [None, 5, 0, 100])
def test_thd_core_attention_equals_documents_alone_forward_and_backward(single_process_group, left):
    from megatron_mft.model import build_packed_seq_params

    attn = _core_attention(None if left is None else (left, 0))
    g = torch.Generator().manual_seed(3)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, h, DIM, generator=g) for h in (HEADS, GROUPS, GROUPS))
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = attn(*leaves, None, packed_seq_params=build_packed_seq_params(cu, max(LENGTHS), "cpu"))
    ref = _reference(*ref_leaves, LENGTHS, left)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    for got, want, name in zip(leaves, ref_leaves, "qkv"):
        assert torch.allclose(got.grad.double(), want.grad, atol=1e-5), (name, (got.grad - want.grad).abs().max())


def test_window_skips_the_layers_megatron_skips(single_process_group):
    assert _core_attention((4, 0), skip_freq=2, layer_number=1).window_left == 4
    assert _core_attention((4, 0), skip_freq=2, layer_number=2).window_left is None
    assert _core_attention((-1, 0)).window_left is None
    with pytest.raises(ValueError, match=r"window_size=\(4, 4\)"):
        _core_attention((4, 4))


def test_sbhd_window_equals_reference(single_process_group):
    attn = _core_attention((6, 0))
    g = torch.Generator().manual_seed(4)
    s, b = 20, 2
    q, k, v = (torch.randn(s, b, h, DIM, generator=g) for h in (HEADS, GROUPS, GROUPS))
    out = attn(q, k, v, None)
    for row in range(b):
        ref = _reference(q[:, row], k[:, row], v[:, row], [s], 6)
        assert torch.allclose(out[:, row].double(), ref, atol=1e-5)


def test_thd_equals_documents_alone(tiny_model):
    model, vocab = tiny_model
    g = torch.Generator().manual_seed(0)
    lengths = [[30, 34], [64], [10, 20, 25, 9]]
    tokens = torch.randint(0, vocab, (3, 64), generator=g)
    cu = torch.tensor([0, 30, 64, 128, 138, 158, 183, 192], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for row in lengths for n in row])[None]
    from megatron_mft.model import build_packed_seq_params

    with torch.no_grad():
        packed = model(tokens.reshape(1, -1), pos, None, labels=tokens.reshape(1, -1),
                       packed_seq_params=build_packed_seq_params(cu, 64, "cpu"))[0]
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                doc = tokens[row:row + 1, start:start + n]
                alone = model(doc, torch.arange(n)[None], None, labels=doc)[0]
                got = packed[row * 64 + start: row * 64 + start + n]
                assert torch.allclose(got, alone, atol=2e-6), (row, start, (got - alone).abs().max())
                start += n


def test_sbhd_rows_are_independent(tiny_model):
    model, vocab = tiny_model
    tokens = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(48).expand(2, 48)
    with torch.no_grad():
        both = model(tokens, pos, None, labels=tokens)
        one = model(tokens[1:], pos[1:], None, labels=tokens[1:])
    assert torch.allclose(both[1], one[0], atol=2e-6)



def _same_values_and_grads(ours, theirs, x, g):
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(a), theirs(b)
    assert torch.equal(out_a, out_b)
    w = torch.randn(out_a.shape, generator=g)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("rot_dim", [DIM, DIM // 2])
def test_rope_equals_megatrons_unfused_rope_bit_for_bit(tp1_env, rot_dim):
    """The torch RoPE in megatron's fused slots (model/rope.py) against megatron's own unfused
    THD (packed, positions restart per document) and BSHD paths: identical values and grads."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.rope_utils import (_apply_rotary_pos_emb_bshd,
                                                                   _apply_rotary_pos_emb_thd)

    from megatron_mft.model.rope import rope_bshd, rope_thd

    g = torch.Generator().manual_seed(5)
    freqs = torch.randn(max(LENGTHS), 1, 1, rot_dim, generator=g)
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    cp = ps.get_context_parallel_group()
    _same_values_and_grads(lambda t: rope_thd(t, cu, freqs), lambda t: _apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=cp),
                           torch.randn(sum(LENGTHS), HEADS, DIM, generator=g), g)
    _same_values_and_grads(lambda t: rope_bshd(t, freqs[:20]), lambda t: _apply_rotary_pos_emb_bshd(t, freqs[:20]),
                           torch.randn(20, 2, HEADS, DIM, generator=g), g)
