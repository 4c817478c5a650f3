"""Byte-level BPE ``tokenizer.json`` files of Llama-3, Qwen2.5 and StarCoder2 through the HF
tokenizer backend (megatron_mft.data.tokenizer.HFBackend). The real files are not on the package
registries; the stand-ins of tests/test_families_fixtures.py have each family's pre-tokenizer
(split regex / single digits), byte-level decoder, and special tokens at their real ids in a
vocabulary of the real size (Llama-3's above 65535). Checked against transformers' own tokenizer of
the same file: ids of code text, vocabulary size and BOS/EOS ids, special tokens typed in text kept
as text, decode round trip (ids above 65535 in the stored data: tests/test_data_preprocess.py). Throughput against the raw
tokenizer: tools/bench/family_tokenizer_bench.py (docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_families_fixtures import TOKENIZER_SPECS, demo_texts, family_tokenizer

FAMILIES = ("llama3", "qwen2", "starcoder2")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    return {name: family_tokenizer(name, tmp_path_factory) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_byte_level_bpe_equals_transformers(stand_ins, name):
    from megatron_mft.data.tokenizer import load_tokenizer
    from transformers import AutoTokenizer

    first, specials, size, bos, eos = TOKENIZER_SPECS[name]
    hf = AutoTokenizer.from_pretrained(str(stand_ins[name]))
    ours = load_tokenizer(str(stand_ins[name]))
    assert ours.kind == "huggingface" and ours.vocab_size == len(hf) == size
    assert ours.eos_id == hf.eos_token_id == first + specials.index(eos)
    assert ours.bos_id == (None if bos is None else first + specials.index(bos)) == hf.bos_token_id
    texts = demo_texts(per_task=8) + ["naïve café — 日本語 ≠ ascii\r\n\t tabs   and 1234567 digits", "  x\n\n\n  y  "]
    got = ours.encode_batch(texts)
    want = [hf.encode(t, add_special_tokens=False) for t in texts]
    assert got == want
    assert [ours.decode(ids) for ids in got] == texts  # byte level: every text round-trips
    assert max(max(ids) for ids in got) > 255  # merges, not bytes only
    # the family's special tokens typed in text stay text (never their ids)
    typed = f"a {specials[0]} b {eos}"
    ids = ours.encode(typed)
    assert not set(ids) & ours.protected_ids() and ours.decode(ids) == typed
    assert first + specials.index(eos) in hf.encode(typed, add_special_tokens=False)  # where HF's matches it

