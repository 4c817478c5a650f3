"""Preprocessing and dataset reading lose nothing and explain every failure (issue 13, data side).

--overwrite replaces only an earlier output of the tool, never the data or the tokenizer; an
output folder inside the data folder is not read back as a task; file system and template
errors, corrupt .bin/.idx/manifest/tokenizer files and non-UTF-8 file names get one message
naming the file (exit 2 usage, 1 run time); empty and case-colliding tasks are warned about;
a line over the byte limit is rejected without being read.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_fixtures import DEMO_TOKENIZER, cli_args, hf_tokenizer_dir, run_cli, write_jsonl  # noqa: E402

from megatron_mft.config.data import DataConfig  # noqa: E402
from megatron_mft.data.preprocess import main  # noqa: E402
from megatron_mft.errors import UserError  # noqa: E402

GOOD = {"prompt": "add one", "answer": "x + 1"}
SEQ = 64


def _data(root: Path) -> Path:
    data = root / "data"
    write_jsonl(data / "alpha" / "train.jsonl", [GOOD] * 4)
    write_jsonl(data / "beta" / "train.jsonl", [{"prompt": "two", "answer": "y - 2"}] * 3)
    return data


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


# --- item 1: --overwrite -------------------------------------------------------------------
@pytest.mark.parametrize("target", ["data", "parent", "unrelated", "symlink_to_data"])
def test_overwrite_refuses_what_is_not_an_earlier_output(tmp_path, capsys, target):
    data = _data(tmp_path)
    (tmp_path / "sibling.txt").write_text("keep me")
    unrelated = tmp_path / "notes"
    (unrelated / "sub").mkdir(parents=True)
    (unrelated / "sub" / "a.txt").write_text("mine")
    out = {"data": data, "parent": tmp_path, "unrelated": unrelated, "symlink_to_data": tmp_path / "link"}[target]
    if target == "symlink_to_data":
        out.symlink_to(data, target_is_directory=True)
    before = _snapshot(tmp_path)
    rc, err = _run(capsys, *cli_args(data, out, SEQ), "--overwrite")
    assert rc == 2, err
    assert f"--output-dir {out}" in err and "error:" in err
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing added
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", "sibling.txt", "notes"]
                                                                + (["link"] if target == "symlink_to_data" else []))


def test_overwrite_replaces_an_earlier_output_but_not_one_holding_user_files(tmp_path, capsys):
    data = _data(tmp_path)
    out = tmp_path / "out"
    assert _run(capsys, *cli_args(data, out, SEQ))[0] == 0
    rc, err = _run(capsys, *cli_args(data, out, SEQ, "none"), "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "manifest.json").read_text())["packing"] == "none"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # no temp or old folder left

    (out / "my_notes.txt").write_text("mine")  # the user keeps something in the folder
    before = _snapshot(out)
    rc, err = _run(capsys, *cli_args(data, out, SEQ), "--overwrite")
    assert rc == 2 and "my_notes.txt" in err, err
    assert _snapshot(out) == before

    # a damaged manifest is not recognised as an earlier output either
    (out / "my_notes.txt").unlink()
    (out / "manifest.json").write_text('{"format": "megatron-mft/packed-v1", "tasks": [')
    rc, err = _run(capsys, *cli_args(data, out, SEQ), "--overwrite")
    assert rc == 2 and str(out / "manifest.json") in err, err


def test_overwrite_refuses_an_output_holding_the_tokenizer(tmp_path, capsys):
    data = _data(tmp_path)
    out = tmp_path / "out"
    assert _run(capsys, *cli_args(data, out, SEQ))[0] == 0
    tok = hf_tokenizer_dir(out / "tok")  # tokenizer kept inside an earlier output
    before = _snapshot(out)
    rc, err = _run(capsys, "--data-dir", str(data), "--tokenizer-model", str(tok), "--seq-length", str(SEQ),
                   "--packing", "none", "--output-dir", str(out), "--no-progress", "--overwrite")
    assert rc == 2 and "tokenizer" in err, err
    assert _snapshot(out) == before


def test_output_inside_the_data_dir_is_not_read_back_as_a_task(tmp_path, capsys):
    data = _data(tmp_path)
    for out in (data / "packed", data / "alpha" / "packed"):  # beside the tasks, inside a task
        assert _run(capsys, *cli_args(data, out, SEQ, "best-fit", "--skip-bad-samples"))[0] == 0
        rc, err = _run(capsys, *cli_args(data, out, SEQ, "best-fit", "--skip-bad-samples"), "--overwrite")
        assert rc == 0, err
        stats = json.loads((out / "stats.json").read_text())
        assert sorted(stats["tasks"]) == ["alpha", "beta"]
        assert (stats["tasks"]["alpha"]["samples"], stats["tasks"]["beta"]["samples"]) == (4, 3)
        manifest = json.loads((out / "manifest.json").read_text())
        assert all("packed" not in f for t in manifest["tasks"] for f in t["train_files"] + t["val_files"])


def test_failed_swap_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    """An interruption at the very end (the swap) leaves the previous output in place."""
    from megatron_mft.data import outdir, preprocess as pp

    data = _data(tmp_path)
    out = tmp_path / "out"
    assert _run(capsys, *cli_args(data, out, SEQ))[0] == 0
    before = _snapshot(out)
    real_rename = os.rename

    def fail_on_second(src, dst, *a, **k):  # the first rename of a two-step swap succeeds
        fail_on_second.calls += 1
        if fail_on_second.calls == 2:
            raise KeyboardInterrupt
        return real_rename(src, dst, *a, **k)

    fail_on_second.calls = 0
    monkeypatch.setattr(os, "rename", fail_on_second)
    monkeypatch.setattr(outdir, "exchange_paths", lambda a, b: False)  # force the portable two-step path
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(pp.PreprocessArgs(str(data), DEMO_TOKENIZER, SEQ, "none", str(out), overwrite=True,
                                        progress=False))
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def _tmpfs(mnt: Path, options: str):
    """Mount a tmpfs (root only; otherwise skip: test_data_bad_input's injected OSError covers the
    same code path); yields the mount point and unmounts it (lazily: files a failure left open)."""
    import subprocess

    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (64 pages; an output takes 19 files): a real ENOSPC in the middle of writing."""
    yield from _tmpfs(tmp_path / "disk", "size=256k")


@pytest.fixture
def read_only_disk(tmp_path):
    yield from _tmpfs(tmp_path / "ro", "ro,size=64k")


def test_unwritable_output_is_refused_before_any_work(tmp_path, read_only_disk, capsys, monkeypatch):
    from megatron_mft.data import preprocess as pp

    monkeypatch.setattr(pp, "discover_tasks", None)  # would fail loudly if reached
    rc, err = _run(capsys, *cli_args(_data(tmp_path), read_only_disk / "sub" / "out", SEQ))
    assert rc == 2 and f"cannot write in {read_only_disk} (Read-only file system)" in err, err


def test_disk_full_keeps_the_previous_output(tmp_path, tiny_disk, capsys):
    from data_fixtures import demo_subset

    out = tiny_disk / "out"
    assert _run(capsys, *cli_args(_data(tmp_path), out, SEQ))[0] == 0
    before = _snapshot(out)
    big = demo_subset(tmp_path / "big", train=100, val=6)
    rc, err = _run(capsys, *cli_args(big, out, 512, "best-fit", "--overlong", "drop"), "--overwrite")
    assert rc == 1 and f"--output-dir {out}: writing failed" in err and "No space left on device" in err, err
    assert _snapshot(out) == before
    assert [p.name for p in tiny_disk.iterdir()] == ["out"]  # the partial new output is gone


# --- item 2: file system and template errors ------------------------------------------------
def test_missing_paths_and_unreadable_files_are_messages(tmp_path, capsys, monkeypatch):
    data = _data(tmp_path)
    rc, err = _run(capsys, *cli_args(tmp_path / "nope", tmp_path / "o1", SEQ))
    assert rc == 2 and str(tmp_path / "nope") in err, err
    args = cli_args(data, tmp_path / "o2", SEQ)
    args[args.index("--tokenizer-model") + 1] = str(tmp_path / "no.model")
    rc, err = _run(capsys, *args)
    assert rc == 2 and str(tmp_path / "no.model") in err, err
    (tmp_path / "afile").write_text("x")
    rc, err = _run(capsys, *cli_args(data, tmp_path / "afile" / "out", SEQ))
    assert rc == 2 and str(tmp_path / "afile") in err, err

    # an unreadable data file (root reads anything, so the denial is injected at open())
    locked = data / "beta" / "train.jsonl"
    real_open = builtins.open

    def deny(file, *a, **k):
        if str(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", deny)
    for workers in ("1", "2"):  # with 2, the error crosses a process boundary
        rc, err = _run(capsys, *cli_args(data, tmp_path / "o3", SEQ), "--workers", workers)
        assert rc == 1 and f"error: {locked}: cannot read (Permission denied)" in err, err
    monkeypatch.undo()
    tok = tmp_path / "afile.model"  # an unreadable tokenizer (a fresh path: loaded tokenizers are cached)
    shutil.copy(DEMO_TOKENIZER, tok)
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: (_ for _ in ()).throw(PermissionError(
        13, "Permission denied", str(p))) if p == tok else real_read(p))
    args[args.index("--tokenizer-model") + 1] = str(tok)
    rc, err = _run(capsys, *args)
    monkeypatch.undo()
    assert rc == 2 and f"error: {tok}: cannot read (Permission denied)" in err, err
    tok.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data"]


@pytest.mark.parametrize("content, key", [
    ('{"role_names": "human"}', "role_names"),
    ('{"role_names": {"human": 3, "bot": "b", "system": "s"}}', "role_names"),
    ('{"eos_after_bot": "yes"}', "eos_after_bot"),
    ('{"role_start": 5}', "role_start"),
    ('["not", "an", "object"]', "object"),
    ('{"role_start": "<a>", ', "JSON"),
])
def test_template_json_with_wrong_types_is_a_usage_error(tmp_path, capsys, content, key):
    data = _data(tmp_path)
    tpl = tmp_path / "tpl.json"
    tpl.write_text(content)
    rc, err = _run(capsys, *cli_args(data, tmp_path / "out", SEQ), "--template", str(tpl))
    assert rc == 2 and str(tpl) in err and key in err, err
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_message_and_the_traceback_only_with_debug(tmp_path):
    data = _data(tmp_path)
    tpl = tmp_path / "tpl.json"
    tpl.write_text('{"add_bos": 1}')
    args = [*cli_args(data, tmp_path / "out", SEQ), "--template", str(tpl)]
    p = run_cli(*args)
    assert p.returncode == 2 and p.stderr.startswith(f"error: template {tpl}: 'add_bos' must be a bool"), p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli(*args, "--debug")
    assert p.returncode == 2 and "Traceback" in p.stderr and "TemplateError" in p.stderr, p.stderr


# --- item 3: damaged files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data = _data(root)
    out = root / "out"
    assert main(cli_args(data, out, SEQ, "best-fit", "--val-ratio", "0.3")) == 0
    return out


def _open(path: Path):
    from megatron_mft.data.mft_data import MFTData

    d = MFTData(DataConfig(path=str(path), seq_length=SEQ), seed=1, micro_batch_size=1, global_batch_size=1,
                dp_rank=0, dp_size=1)
    return d


def _damaged(packed: Path, tmp_path: Path, name: str, edit) -> tuple[Path, str]:
    out = tmp_path / "copy"
    shutil.copytree(packed, out)
    edit(out / name)
    with pytest.raises(UserError) as e:
        d = _open(out)
        for row in range(d.rows_per_epoch):
            d.train_micro_batches(row)
    return out / name, str(e.value)


def _truncate(path: Path, keep: int | None = None):
    data = path.read_bytes()
    path.write_bytes(data[: (len(data) // 2 if keep is None else keep)])


@pytest.mark.parametrize("name", ["train_tokens.bin", "train_loss_mask.bin", "val_tokens.bin",
                                  "train_sample_uids.bin"])
def test_truncated_bin_names_the_file(packed, tmp_path, name):
    _open(packed)  # the intact copy opens
    path, msg = _damaged(packed, tmp_path, name, lambda p: _truncate(p, os.path.getsize(p) - 1))
    assert str(path) in msg and "truncated" in msg and "bytes" in msg, msg


@pytest.mark.parametrize("keep", [0, 5, 20, None])
def test_truncated_idx_names_the_file(packed, tmp_path, keep):
    path, msg = _damaged(packed, tmp_path, "train_tokens.idx", lambda p: _truncate(p, keep))
    assert str(path) in msg and ("truncated" in msg or "not a" in msg), msg


def test_corrupt_token_ids_name_the_file(packed, tmp_path):
    def flip(p: Path):
        a = np.fromfile(p, dtype=np.uint16)
        a[3] = 65000  # beyond the 2048-token vocabulary
        a.tofile(p)

    path, msg = _damaged(packed, tmp_path, "train_tokens.bin", flip)
    assert str(path) in msg and "65000" in msg and "vocab" in msg, msg


@pytest.mark.parametrize("text, words", [
    ('{"format": "megatron-mft/packed-v1", "seq_length": 6', "not valid JSON"),
    ("", "not valid JSON"),
    ('{"format": "megatron-mft/packed-v1"}', "seq_length"),
    ('[1, 2]', "object"),
])
def test_damaged_manifest_names_the_file(packed, tmp_path, text, words):
    path, msg = _damaged(packed, tmp_path, "manifest.json", lambda p: p.write_text(text))
    assert str(path) in msg and words in msg, msg


def test_corrupt_tokenizer_json_names_the_file(tmp_path, capsys):
    data = _data(tmp_path)
    tok = hf_tokenizer_dir(tmp_path / "tok")
    _truncate(tok / "tokenizer.json")
    rc, err = _run(capsys, "--data-dir", str(data), "--tokenizer-model", str(tok), "--seq-length", str(SEQ),
                   "--packing", "none", "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert rc == 2 and str(tok / "tokenizer.json") in err and "JSON" in err, err


def test_non_utf8_file_names_are_named(tmp_path, capsys):
    data = _data(tmp_path)
    bad = os.fsencode(data / "alpha") + b"/caf\xe9.jsonl"
    with open(bad, "wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
    rc, err = _run(capsys, *cli_args(data, tmp_path / "out", SEQ, "best-fit", "--skip-bad-samples"))
    assert rc == 2 and "caf\\xe9.jsonl" in err and "UTF-8" in err, err
    assert not (tmp_path / "out").exists()


# --- item 4: empty and case-colliding tasks -----------------------------------------------------
def test_empty_and_case_colliding_tasks_are_warned_and_recorded(tmp_path, capsys):
    data = _data(tmp_path)
    write_jsonl(data / "Alpha" / "train.jsonl", [GOOD] * 2)
    write_jsonl(data / "empty" / "train.jsonl", [])
    write_jsonl(data / "skipped" / "train.jsonl", ["{not json", {"question": "q"}])
    out = tmp_path / "out"
    rc, err = _run(capsys, *cli_args(data, out, SEQ, "best-fit", "--skip-bad-samples"))
    assert rc == 0, err
    warnings = json.loads((out / "stats.json").read_text())["warnings"]
    assert len(warnings) == 3, warnings
    case = [w for w in warnings if "case" in w]
    assert len(case) == 1 and "'Alpha'" in case[0] and "'alpha'" in case[0]
    assert any("'empty'" in w and "0 samples" in w for w in warnings)
    assert any("'skipped'" in w and "0 samples" in w and "2 rejected" in w for w in warnings)
    for w in warnings:
        assert f"warning: {w}" in err


def test_empty_splits_and_empty_tasks_open_for_training(tmp_path, capsys):
    """--val-ratio 0 writes empty val datasets (an empty .bin cannot be mmap'd) and an empty task
    has no packs: both open, and training and validation batches come out."""
    data = _data(tmp_path)
    write_jsonl(data / "empty" / "train.jsonl", [])
    out = tmp_path / "out"
    assert _run(capsys, *cli_args(data, out, SEQ, "best-fit", "--val-ratio", "0"))[0] == 0
    assert os.path.getsize(out / "val_tokens.bin") == 0
    d = _open(out)
    assert d.task_names == ["alpha", "beta", "empty"] and d.rows_per_epoch >= 1
    assert int(d.train_micro_batches(0)[0]["loss_mask"].sum()) > 0
    assert all(d.val_micro_batches(t) == [] for t in d.task_names)


# --- item 5: the line byte limit ------------------------------------------------------------------
def test_line_over_the_byte_limit_is_rejected_unread(tmp_path, capsys, monkeypatch):
    from megatron_mft.data import encode

    data = _data(tmp_path)
    huge = json.dumps({"prompt": "p", "answer": "z" * 5000})
    write_jsonl(data / "beta" / "train.jsonl", [GOOD, huge, GOOD])
    limit = 1000
    read_sizes = []
    real = encode._chunk_lines

    def spy(path, first_line, start, end):
        read_sizes.append(end - start)
        return real(path, first_line, start, end)

    monkeypatch.setattr(encode, "_chunk_lines", spy)
    rc, err = _run(capsys, *cli_args(data, tmp_path / "o1", SEQ), "--max-line-bytes", str(limit))
    assert rc == 1 and f"{data / 'beta' / 'train.jsonl'}:2: line_too_long:" in err and "--max-line-bytes" in err, err
    out = tmp_path / "o2"
    rc, err = _run(capsys, *cli_args(data, out, SEQ, "best-fit", "--skip-bad-samples"), "--max-line-bytes",
                   str(limit))
    assert rc == 0, err
    assert max(read_sizes) < limit  # the long line was never read
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tasks"]["beta"]["rejected_reasons"] == {"line_too_long": 1}
    assert stats["tasks"]["beta"]["samples"] == 2
    (rej,) = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert (rej["file"], rej["line"], rej["reason"], rej["raw"]) == (
        str(data / "beta" / "train.jsonl"), 2, "line_too_long", "")
    assert str(len(huge)) in rej["detail"]
    # at the limit exactly, the line is read (and here rejected as over seq_length instead)
    rc, err = _run(capsys, *cli_args(data, tmp_path / "o3", SEQ), "--max-line-bytes", str(len(huge)))
    assert rc == 1 and ":2: overlong:" in err, err


def test_online_mode_applies_data_max_line_bytes(tmp_path):
    from megatron_mft.data.mft_data import MFTData

    data = _data(tmp_path)
    write_jsonl(data / "beta" / "train.jsonl", [GOOD, json.dumps({"prompt": "p", "answer": "z" * 3000}), GOOD])
    assert "data.max_line_bytes: must be >= 1" in DataConfig(path="x", max_line_bytes=0).validate()
    cfg = DataConfig(path=str(data), source="online", tokenizer=DEMO_TOKENIZER, seq_length=SEQ,
                     skip_bad_samples=True, max_line_bytes=1000, val_ratio=0.0)
    d = MFTData(cfg, seed=1, micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1)
    assert d.manifest["splits"]["train"]["samples"] == 6
