"""Preference pairs: validation with file:line reasons, --mode preference packing (each pair in one
row, chosen then rejected, loss only on the last answer), stats; and the LoRA reference (the
model with its adapters disabled) against a separate frozen copy of the base model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mft.data.preprocess import PreprocessArgs, preprocess
from megatron_mft.data.records import DataError

ROOT = Path(__file__).resolve().parents[1]
TOK = str(ROOT / "examples/demo_data/tokenizer/demo_sp2048.model")


def _pair(prompt, good, bad, system=None, history=()):
    head = ([{"role": "system", "content": system}] if system else []) + list(history)
    return {"chosen": head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
            "rejected": head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": bad}]}


def _write(folder: Path, lines) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return folder / "train.jsonl"


def _args(data, out, **kw):
    return PreprocessArgs(data_dir=str(data), tokenizer_model=TOK, seq_length=kw.pop("seq_length", 256),
                          packing=kw.pop("packing", "best-fit"), output_dir=str(out), mode="preference",
                          progress=False, val_ratio=0.0, **kw)


GOOD = [_pair(f"add {i} and {i + 1}", f"return {i} + {i + 1}", f"return {i} - {i + 1}") for i in range(9)]
MULTI = _pair("and now times two?", "return 2 * (a + b)", "return a + b",
              history=[{"role": "human", "content": "add a and b"}, {"role": "bot", "content": "return a + b"}])


def test_pairs_stay_together_and_only_the_last_answer_takes_loss(tmp_path):
    from megatron_mft.config.data import DataConfig
    from megatron_mft.data import MFTData
    from megatron_mft.data.tokenizer import load_tokenizer

    _write(tmp_path / "raw/alpha", GOOD[:5])
    _write(tmp_path / "raw/beta", GOOD[5:] + [MULTI])
    stats = preprocess(_args(tmp_path / "raw", tmp_path / "out", seq_length=128))
    assert stats["pairs"] == 10 and stats["tasks"]["beta"]["pairs"] == 5 and stats["tasks"]["alpha"]["train_pairs"] == 5
    assert json.loads((tmp_path / "out/manifest.json").read_text())["mode"] == "preference"
    data = MFTData(DataConfig(path=str(tmp_path / "out")), seed=1, micro_batch_size=1, global_batch_size=1,
                   dp_rank=0, dp_size=1)
    tok = load_tokenizer(TOK)
    lines = GOOD + [MULTI]
    seen = set()
    for row in range(data.rows_per_epoch):
        uids = data.row_sample_uids(row)
        assert len(uids) % 2 == 0 and uids[0::2] == [u - 1 for u in uids[1::2]] and all(u % 2 == 0 for u in uids[0::2])
        seen.update(uids)
        mb = data.train_rows_micro_batch([row])
        sid, lm, labels, toks = mb["sample_ids"][0], mb["loss_mask"][0], mb["labels"][0], mb["tokens"][0]
        for k in range(len(uids) // 2):
            line = lines[uids[2 * k] // 2]
            prompts = []
            for side, s in (("chosen", 2 * k), ("rejected", 2 * k + 1)):
                targets = labels[(sid == s) & (lm > 0)].tolist()
                # the loss takes exactly the last answer and its EOS (not the earlier bot turn of MULTI)
                assert targets[-1] == tok.eos_id and tok.decode(targets[:-1]) == line[side][-1]["content"]
                ids = toks[sid == s].tolist()
                prompts.append(ids[: len(ids) - len(targets)])
            assert prompts[0] == prompts[1]  # the same prompt tokens on both sides
    assert seen == set(range(20))
    # dynamic batching: a row is a pair, collated as two one-sample rows (chosen, rejected)
    dyn = MFTData(DataConfig(path=str(tmp_path / "out"), batching="dynamic"), seed=1, micro_batch_size=2,
                  global_batch_size=4, dp_rank=0, dp_size=1)
    assert dyn.rows_per_epoch == 10
    for mb in dyn.train_micro_batches(0) + [dyn.train_rows_micro_batch([9])]:
        sid, lm = mb["sample_ids"], mb["loss_mask"]
        assert sid.shape[0] == 4 and sid.shape[1] == int((sid >= 0).sum(1).max())  # padded to the longest response
        for r in range(4):
            real = sid[r][sid[r] >= 0]
            assert real.numel() == 0 or (set(real.tolist()) == {r} and lm[r].sum() > 0)
    rows = [u for r in dyn.train_micro_batch_rows(0)[0].tolist() for u in dyn.row_sample_uids(r)]
    assert len(rows) == 4 and rows[0::2] == [u - 1 for u in rows[1::2]] and all(u % 2 == 0 for u in rows[0::2])


def test_bad_pairs_are_named_by_file_line_and_reason(tmp_path):
    path = _write(tmp_path / "raw/t", [
        GOOD[0],
        {"chosen": GOOD[1]["chosen"]},  # 2: not a pair
        _pair("p", "a", "b") | {"rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
        {k: GOOD[2][k] + [{"role": "user", "content": "more?"}] for k in ("chosen", "rejected")},  # 4: ends with the user
        _pair("p", "same", "same"),  # 5
        {"chosen": [{"role": "robot", "content": "x"}], "rejected": []},  # 6: unknown role in chosen
        "{not json",  # 7
    ])
    with pytest.raises(DataError) as e:
        preprocess(_args(tmp_path / "raw", tmp_path / "out"))
    msg = str(e.value)
    for line, reason in ((2, "not_a_pair"), (3, "prompt_mismatch"), (4, "last_turn_not_bot"),
                         (5, "identical_answers"), (6, "unknown_role: chosen"), (7, "invalid_json")):
        assert f"{path}:{line}: {reason}" in msg, msg
    assert f"{path}:1:" not in msg and not (tmp_path / "out").exists()
    stats = preprocess(_args(tmp_path / "raw", tmp_path / "out", skip_bad_samples=True))
    assert stats["pairs"] == 1 and stats["rejected"] == 6
    assert stats["rejected_reasons"]["prompt_mismatch"] == 1


def test_overlong_pairs_drop_or_truncate_as_a_pair(tmp_path):
    long = _pair("write it", "x = 1\n" * 40, "y = 2\n" * 30)
    _write(tmp_path / "raw/t", [GOOD[0], long])
    with pytest.raises(DataError, match=r"train.jsonl:2: overlong: .* > seq_length 64"):
        preprocess(_args(tmp_path / "raw", tmp_path / "o1", seq_length=64))
    s = preprocess(_args(tmp_path / "raw", tmp_path / "o2", seq_length=64, overlong="drop"))
    assert s["pairs"] == 1 and s["dropped"] == 1
    s = preprocess(_args(tmp_path / "raw", tmp_path / "o3", seq_length=64, overlong="truncate"))
    assert s["pairs"] == 2 and s["truncated"] == 1
    assert s["splits"]["train"]["tokens"] <= 2 * 64


def test_a_line_over_max_line_bytes_is_rejected_unread(tmp_path, monkeypatch):
    """The SFT reader's promise holds for pairs: memory stays at one read block however long a
    line is (the block made small here so that a 24 MiB line shows it)."""
    import functools
    import tracemalloc

    from megatron_mft.data import encode

    monkeypatch.setattr(encode, "_line_ends", functools.partial(encode._line_ends, block=1 << 20))
    path = _write(tmp_path / "raw/t", [GOOD[0], json.dumps(GOOD[1]) + " " * (24 << 20), GOOD[2]])
    tracemalloc.start()
    try:
        stats = preprocess(_args(tmp_path / "raw", tmp_path / "out", max_line_bytes=1 << 20, skip_bad_samples=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats["pairs"] == 2 and stats["rejected_reasons"] == {"line_too_long": 1}
    rejected = [json.loads(l) for l in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["reason"]) for r in rejected] == [(str(path), 2, "line_too_long")]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: the long line was read"


def test_errors_stop_reading_across_files(tmp_path):
    """MAX_ERRORS bad lines stop the whole read, not just the current file, and name at most that many."""
    from megatron_mft.data.encode import MAX_ERRORS

    first = _write(tmp_path / "raw/a", ["{not json"] * (MAX_ERRORS + 10))
    second = _write(tmp_path / "raw/b", ["{not json", GOOD[0]])
    with pytest.raises(DataError) as e:
        preprocess(_args(tmp_path / "raw", tmp_path / "out", workers=2))
    msg = str(e.value)
    assert msg.count(": invalid_json") == MAX_ERRORS and f"{first}:{MAX_ERRORS}: invalid_json" in msg
    assert str(second) not in msg and f"reading stopped at {MAX_ERRORS} errors" in msg


# ---------------------------------------------------------------- LoRA reference
@pytest.fixture(scope="module")
def env(tp1_env):
    return tp1_env


def _build(env, lora: bool):
    from megatron_mft.config import ModelConfig, ParallelConfig, PeftConfig
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan

    mcfg = ModelConfig(preset="tiny", precision="fp32")
    torch.manual_seed(5)
    if not lora:
        return build_model_chunks(mcfg, ParallelConfig(), env)
    plan = PeftPlan(PeftConfig(method="lora", rank=4, alpha=8.0), env, seed=5)
    chunks = build_model_chunks(mcfg, ParallelConfig(), env, layer=plan.layer_spec(mcfg))
    plan.prepare(chunks)
    return chunks


def test_lora_reference_is_the_base_model(env, tmp_path):
    from megatron_mft.checkpoint.dist import load_model_weights, save_checkpoint
    from megatron_mft.peft import adapters_disabled, iter_adapters

    frozen = _build(env, lora=False)  # a separate frozen copy of the base
    path = save_checkpoint(tmp_path, 1, frozen, common={}, run_info={})
    chunks = _build(env, lora=True)
    load_model_weights(path, chunks)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, m in iter_adapters(chunks):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    ids = torch.randint(0, 2048, (2, 24), generator=g)
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        base = frozen[0](ids, pos, None)
        adapted = chunks[0](ids, pos, None)
        with adapters_disabled(chunks) as n:
            disabled = chunks[0](ids, pos, None)
        again = chunks[0](ids, pos, None)
    assert n == 16  # 4 layers x 4 targets
    assert torch.equal(disabled, base)
    assert (adapted - base).abs().max() > 1e-3 and torch.equal(again, adapted)


def test_demo_chain_paths_agree():
    """examples/tiny_cpu_dpo.yaml continues from the checkpoint examples/demo.sh writes and reads the
    folder examples/demo_dpo.sh preprocesses (it once pointed at a run the README's demo never made)."""
    from megatron_mft.config import load_config

    sft = load_config(str(ROOT / "examples/tiny_cpu.yaml"), [])
    dpo = load_config(str(ROOT / "examples/tiny_cpu_dpo.yaml"), [])
    demo, chain = ((ROOT / "examples" / f).read_text() for f in ("demo.sh", "demo_dpo.sh"))
    assert 'OUT="${OUT:-outputs/demo}"' in demo and 'output_dir="$OUT/run"' in demo and "train.steps" not in demo
    step = f"step_{sft.train.steps:07d}"
    assert f'SFT="$OUT/run/checkpoints/{step}"' in chain and '--output-dir "$OUT/pairs"' in chain
    assert dpo.train.init_checkpoint == f"outputs/demo/run/checkpoints/{step}" and dpo.data.path == "outputs/demo/pairs"
    assert dpo.train.stage == "dpo" and dpo.data.source == "offline"


def test_demo_scripts_keep_an_earlier_run(tmp_path):
    """examples/demo.sh starts a fresh run folder: an earlier $OUT/run (with anything a user put
    in it) is moved aside, never deleted, even when the new run then stops on a mistyped override.
    (demo_dpo.sh does the same with $OUT/dpo: checked by reading.)"""
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    p = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh"), "bogus.key=1"], cwd=tmp_path,
                       env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 2 and "bogus" in p.stderr, p.stderr[-2000:]
    (kept,) = [d for d in tmp_path.iterdir() if d.name.startswith("run.")]
    assert (kept / "notes.txt").read_text() == "mine\n" and f"is kept as {kept}" in p.stdout
    chain = (ROOT / "examples" / "demo_dpo.sh").read_text()
    assert "rm -rf" not in chain and 'mv "$OUT/dpo" "$KEPT"' in chain


# ---------------------------------------------------------------- stored reference (full-FT dpo)
def _weights(folder: Path, middle: bytes) -> Path:
    """A starting-weights folder whose 3 MiB weight file differs from its siblings' in its middle byte
    only (as two LoRA-merged exports: the embeddings and lm_head at the ends are the base's)."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    data[len(data) // 2] = middle[0]
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


def test_reference_key_tells_apart_weights_that_differ_in_the_middle(tmp_path):
    """The stored reference's key: two runs' exports differing only mid-file got one key (run b then
    trained against run a's reference). Same content -> same key, also copied elsewhere with new
    file times (a requeue that stages the weights to node-local disk must find its reference);
    content that differs mid-file, even rewritten in place with size and mtime kept -> another key.
    A resume finds a reference stored under the key of the earlier version (files' ends only)."""
    import os
    import shutil
    import types

    from megatron_mft.training.reference import PrecomputedReference, _ends_only, checkpoint_fingerprint

    a, b = _weights(tmp_path / "a", b"\1"), _weights(tmp_path / "b", b"\2")
    key = checkpoint_fingerprint(a)
    assert checkpoint_fingerprint(a) == key and checkpoint_fingerprint(str(a) + "/") == key
    assert checkpoint_fingerprint(shutil.copytree(a, tmp_path / "staged")) == key
    assert checkpoint_fingerprint(b) != key
    assert checkpoint_fingerprint(a, _ends_only) == checkpoint_fingerprint(b, _ends_only)  # the collision fixed here
    f = a / "model.safetensors"
    st = f.stat()
    with f.open("r+b") as fh:  # the same path, size and mtime: only the content moved
        fh.seek(st.st_size // 2)
        fh.write(b"\3")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert checkpoint_fingerprint(a) != key

    run = types.SimpleNamespace(model=types.SimpleNamespace(hf_init=None), data=types.SimpleNamespace(path=tmp_path),
                                train=types.SimpleNamespace(init_checkpoint=b))
    data = types.SimpleNamespace(manifest={"splits": {"train": {"samples": 4}, "val": {"samples": 2}}})
    path, _ = PrecomputedReference.file_for(run, data.manifest)
    older = path.with_name(f"{checkpoint_fingerprint(b, _ends_only)}-{path.name.split('-', 1)[1]}")
    older.parent.mkdir()
    np.savez(older, logps=np.arange(6.0))
    resumed = PrecomputedReference.setup([], data, None, run, fresh=False, say=lambda m: None)
    assert resumed.logps.tolist() == list(range(6)) and not path.exists()


def test_a_damaged_stored_reference_is_named(tmp_path):
    """A truncated <data>/_reference_logps/<key>.npz: one message naming it and what to do (was an
    internal error, BadZipFile)."""
    import types

    from megatron_mft.errors import UserError
    from megatron_mft.training.reference import PrecomputedReference

    run = types.SimpleNamespace(model=types.SimpleNamespace(hf_init=None), data=types.SimpleNamespace(path=tmp_path),
                                train=types.SimpleNamespace(init_checkpoint=_weights(tmp_path / "init", b"\1")))
    data = types.SimpleNamespace(manifest={"splits": {"train": {"samples": 4}, "val": {"samples": 2}}})
    path, _ = PrecomputedReference.file_for(run, data.manifest)
    path.parent.mkdir()
    np.savez(path, logps=np.zeros(6))
    for size in (path.stat().st_size // 2, 0):
        path.write_bytes(path.read_bytes()[:size])
        with pytest.raises(UserError) as e:
            PrecomputedReference.setup([], data, None, run, fresh=True, say=lambda m: None)
        assert str(e.value).startswith(f"{path}: unreadable reference log-probs") and "delete it" in str(e.value)
