"""Packed sequences never attend to each other: THD forward == each document run alone."""

import torch

from megatron_mft.model.attention import plan_blocks


def test_plan_blocks_keeps_segments_whole():
    cu = [0, 30, 64, 100, 500, 520]
    blocks = plan_blocks(cu, target=100)
    assert blocks[0][0] == 0 and blocks[-1][1] == 520
    starts_ends = {c for c in cu}
    for a, b, single in blocks:
        assert a in starts_ends and b in starts_ends
    assert (100, 500, True) in blocks  # a long segment gets its own block
    assert all(b2[0] == b1[1] for b1, b2 in zip(blocks, blocks[1:]))


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
                       packed_seq_params=build_packed_seq_params(cu, 64, "cpu", block_target=64))[0]
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
