"""Offline preprocessing end to end: .bin/.idx round trip, manifest and stats, determinism."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_fixtures import DEMO_TOKENIZER, cli_args, demo_subset, run_cli, write_jsonl  # noqa: E402

from megatron_mft.data.encode import EncodeSpec, encode_tasks  # noqa: E402
from megatron_mft.data.preprocess import main  # noqa: E402
from megatron_mft.data.taskdir import discover_tasks, is_val_file  # noqa: E402
from megatron_mft.data.template import TEMPLATES  # noqa: E402

SEQ = 2048


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("raw"), train=40, val=6)


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    """The CLI in a subprocess with 2 worker processes."""
    out = tmp_path_factory.mktemp("pp") / "out"
    p = run_cli(*cli_args(data, out, SEQ, "best-fit", "--workers", "2", "--seed", "7"))
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "tokens/s" in p.stdout
    return out


def _expected_by_uid(data) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Encode the raw files independently; uids enumerate tasks, then train files, then val files."""
    tasks = discover_tasks(data)
    enc = encode_tasks(tasks, EncodeSpec(DEMO_TOKENIZER, TEMPLATES["mftcoder"], SEQ))
    out, uid = {}, 0
    for t_id, t in enumerate(enc.tasks):
        for tokens, mask in t.train + t.val:
            out[uid] = (tokens, mask, t_id)
            uid += 1
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "stats.json"}


def test_bin_idx_round_trip_is_exact(built, data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_mft.data.indexed import IndexedSplit

    expected = _expected_by_uid(data)
    seen = []
    for split in ("train", "val"):
        s = IndexedSplit(built, split)
        raw_tokens = IndexedDataset(str(built / f"{split}_tokens"))  # plain megatron reader works too
        assert len(raw_tokens) == len(s.sample_lengths)
        for p in range(len(s.pack_bounds) - 1):
            a, b = int(s.pack_bounds[p]), int(s.pack_bounds[p + 1])
            tokens, mask = s.read(a, b)
            assert len(tokens) <= SEQ
            off = 0
            for i in range(a, b):
                uid = int(s.sample_uids[i])
                e_tok, e_mask, e_task = expected[uid]
                n = int(s.sample_lengths[i])
                assert np.array_equal(tokens[off:off + n], e_tok)
                assert np.array_equal(raw_tokens[i], e_tok)
                assert np.array_equal(mask[off:off + n], e_mask)
                assert int(s.sample_tasks[i]) == e_task
                off += n
                seen.append(uid)
    assert sorted(seen) == sorted(expected)  # every accepted sample, exactly once, in train or val


def test_manifest_and_stats(built, data):
    m = json.loads((built / "manifest.json").read_text())
    s = json.loads((built / "stats.json").read_text())
    names = ["code-completion", "docstring", "doctest", "text-to-code"]
    assert [t["name"] for t in m["tasks"]] == names and [t["id"] for t in m["tasks"]] == [0, 1, 2, 3]
    assert m["seq_length"] == SEQ and m["packing"] == "best-fit" and m["mode"] == "sft"
    tok = m["tokenizer"]
    assert tok["kind"] == "sentencepiece" and tok["vocab_size"] == 2048 and tok["eos_id"] == 2
    assert tok["sha256"] == hashlib.sha256(Path(DEMO_TOKENIZER).read_bytes()).hexdigest()
    assert tok["marker_ids"] == {"<|role_start|>": [3], "<|role_end|>": [4]}
    assert m["template"]["role_start"] == "<|role_start|>"
    assert m["datasets"]["tokens"]["dtype"] == "uint16" and m["datasets"]["loss_mask"]["dtype"] == "uint8"
    for name in names:
        t = s["tasks"][name]
        for key in ("samples", "tokens", "loss_tokens", "dropped", "truncated", "rejected"):
            assert isinstance(t[key], int)
        assert t["samples"] == 46 and t["train_samples"] == 40 and t["val_samples"] == 6
        assert 0 < t["loss_tokens"] < t["tokens"]
        assert t["val_source"] == "files"
    # totals against what the written datasets hold
    from megatron_mft.data.indexed import IndexedSplit

    on_disk = {sp: IndexedSplit(built, sp) for sp in ("train", "val")}
    total = sum(int(d.sample_lengths.sum()) for d in on_disk.values())
    windows = sum(len(d.pack_bounds) - 1 for d in on_disk.values())
    assert s["tokens"] == total == sum(t["tokens"] for t in s["tasks"].values())
    assert s["sequences"] == windows
    assert s["padding_ratio"] == pytest.approx(1 - total / (windows * SEQ), abs=1e-6)
    assert s["tokens_per_s"] > 0 and s["workers"] == 2
    assert (built / "rejected.jsonl").read_text() == ""
    vp = m["splits"]["val"]["task_packs"]
    assert [vp[n] for n in names][0][0] == 0 and all(vp[a][1] == vp[b][0] for a, b in zip(names, names[1:]))


def test_deterministic_across_workers_and_runs(built, data, tmp_path):
    out1 = tmp_path / "w1"
    assert main(cli_args(data, out1, SEQ, "best-fit", "--workers", "1", "--seed", "7")) == 0
    assert _digest(out1) == _digest(built)  # 1 worker in-process == 2 worker processes, byte for byte


@pytest.mark.parametrize("vocab_size", [2048, 32016, 65536, 65537, 128256])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 1001])
def test_result_transport_round_trip_is_exact(vocab_size, n):
    """Worker results travel as uint16 ids (when the vocabulary fits) and a bit-packed mask."""
    from megatron_mft.data.encode import _pack_arrays, _unpack_arrays

    rng = np.random.default_rng(n)
    ids = rng.integers(0, vocab_size, n).astype(np.int32)
    ids[:1] = vocab_size - 1
    mask = rng.integers(0, 2, n).astype(np.uint8)
    packed = _pack_arrays(ids, mask, vocab_size)
    back_ids, back_mask = _unpack_arrays(packed)
    assert back_ids.dtype == np.int32 and back_mask.dtype == np.uint8
    assert np.array_equal(back_ids, ids) and np.array_equal(back_mask, mask)
    assert packed[0].dtype == (np.uint16 if vocab_size <= 65536 else np.int32)


@pytest.mark.parametrize("max_line_bytes", [1 << 20, 11])
@pytest.mark.parametrize("content", [b"", b"a", b"a\n", b"\n\n\n", b"one\ntwo\n\nfour line is long\nfive",
                                     b"x" * 120 + b"\nshort\n" + b"y" * 30 + b"\n"])
def test_chunks_cover_every_line_once(tmp_path, monkeypatch, content, max_line_bytes):
    """Chunks are runs of whole lines within the line and byte budgets (a longer line alone),
    numbered from 1, covering the file exactly (the main process finds line ends block-wise); a
    line over the byte limit is a chunk of its own that carries its length (bytes without the
    newline) and is never read."""
    from megatron_mft.data import encode
    from megatron_mft.data.taskdir import TaskFiles

    monkeypatch.setattr(encode, "_CHUNK_LINES", 2)
    monkeypatch.setattr(encode, "_CHUNK_BYTES", 40)
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    lines = content.split(b"\n")
    if content.endswith(b"\n"):
        lines.pop()
    lines = lines or [b""]
    chunks = list(encode._chunks([TaskFiles("t", [str(path)], [])], max_line_bytes))
    got, next_line, pos = [], 1, 0
    for t_idx, split, f, first_line, start, end, too_long in chunks:
        assert (t_idx, split, f) == (0, "train", str(path)) and first_line == next_line and start == pos
        part = encode._chunk_lines(str(path), first_line, start, end)
        assert 1 <= len(part) <= 2 and (end - start <= 40 or len(part) == 1)
        raw = content[start:end].split(b"\n")[0]
        assert too_long == (len(raw) if len(raw) > max_line_bytes else 0)
        assert not too_long or len(part) == 1
        got += [raw for _, raw in part]
        next_line, pos = first_line + len(part), end
    assert pos == len(content) and got == lines
    for a, b in zip(encode._line_ends(str(path), block=3), encode._line_ends(str(path))):
        assert a.tolist() == b.tolist()


def test_val_split_by_ratio_is_seeded(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "a" / "train.jsonl", [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(40)])
    outs = {}
    for name, seed in (("s1", 1), ("s1b", 1), ("s2", 2)):
        out = tmp_path / name
        assert main(cli_args(data, out, 64, "next-fit", "--seed", str(seed), "--val-ratio", "0.25")) == 0
        from megatron_mft.data.indexed import IndexedSplit

        outs[name] = sorted(IndexedSplit(out, "val").sample_uids.tolist())
        stats = json.loads((out / "stats.json").read_text())["tasks"]["a"]
        assert (stats["train_samples"], stats["val_samples"], stats["val_source"]) == (30, 10, "ratio")
    assert outs["s1"] == outs["s1b"] != outs["s2"]


def test_val_file_convention():
    for path in ("val.jsonl", "x_val.jsonl", "val-2.jsonl", "valid.jsonl", "dev.jsonl", "val/part1.jsonl",
                 "validation/a.jsonl", "train.val.jsonl"):
        assert is_val_file(Path(path)), path
    for path in ("train.jsonl", "interval.jsonl", "evaluate.jsonl", "devices.jsonl", "train/x.jsonl"):
        assert not is_val_file(Path(path)), path


def test_pretrain_mode_packs_documents_with_eos(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "corpus" / "docs.jsonl", [{"text": "def f():\n    return 1"}, {"text": "x = 2"},
                                                 {"prompt": "q", "answer": "a"}])
    out = tmp_path / "out"
    assert main(cli_args(data, out, 64, "next-fit", "--mode", "pretrain", "--val-ratio", "0")) == 0
    from megatron_mft.data.indexed import IndexedSplit

    s = IndexedSplit(out, "train")
    tokens, mask = s.read(0, len(s.sample_lengths))
    ends = np.cumsum(s.sample_lengths) - 1
    assert (tokens[ends] == 2).all()  # EOS closes every document
    starts = ends - s.sample_lengths + 1
    assert (mask[starts] == 0).all() and mask.sum() == len(mask) - len(starts)  # loss on every real token
    assert json.loads((out / "manifest.json").read_text())["mode"] == "pretrain"
