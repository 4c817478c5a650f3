"""Bad input: each kind gets its named file:line error, a non-zero exit and no output folder;
--skip-bad-samples logs and counts them instead; over-long samples follow --overlong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_fixtures import DEMO_TOKENIZER, chat, cli_args, run_cli, write_jsonl  # noqa: E402

from megatron_mft.data.preprocess import main  # noqa: E402

GOOD = {"prompt": "add one", "answer": "x + 1"}
LONG = {"prompt": "p", "answer": "word " * 400}

# kind -> (the bad line, reason named in the error)
BAD = {
    "invalid_json": ('{"prompt": "a", "answer": ', "invalid_json"),
    "invalid_utf8": (b'{"prompt": "caf\xe9", "answer": "x"}', "invalid_utf8"),
    "missing_role": (json.dumps({"chat_rounds": [{"content": "hi"}, {"role": "bot", "content": "x"}]}), "missing_role"),
    "unknown_role": (json.dumps(chat(("wizard", "hi"), ("bot", "x"))), "unknown_role"),
    "wrong_type_content": (json.dumps({"prompt": 3, "answer": "x"}), "wrong_type"),
    "wrong_type_rounds": (json.dumps({"chat_rounds": "hello"}), "wrong_type"),
    "wrong_type_line": ("[1, 2]", "wrong_type"),
    "empty_answer": (json.dumps({"prompt": "q", "answer": "   "}), "empty_answer"),
    "no_bot_turn": (json.dumps(chat(("human", "hi"), ("system", "s"))), "no_bot_turn"),
    "unknown_format": (json.dumps({"question": "q"}), "unknown_format"),
    "overlong": (json.dumps(LONG), "overlong"),
}


def _data(tmp_path: Path, bad_line) -> Path:
    data = tmp_path / "data"
    write_jsonl(data / "alpha" / "train.jsonl", [GOOD, GOOD])
    write_jsonl(data / "beta" / "part.jsonl", [GOOD, GOOD, bad_line, GOOD])  # bad line is line 3
    return data


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_input_kind_names_file_line_and_reason(tmp_path, capsys, kind):
    line, reason = BAD[kind]
    data = _data(tmp_path, line)
    out = tmp_path / "out"
    rc = main(cli_args(data, out, 128))
    err = capsys.readouterr().err
    assert rc != 0
    assert f"{data / 'beta' / 'part.jsonl'}:3: {reason}:" in err, err
    assert "alpha" not in err  # only the bad line is named
    assert not out.exists() and list(tmp_path.iterdir()) == [data]  # no partial output, no temp folder


def test_broken_links_are_named_with_their_targets(tmp_path, capsys):
    """A dangling .jsonl link was "task folder has no .jsonl files" (or, next to a good file, silently
    dropped), a dangling task-folder link silently no task: each is now named with where it points."""
    from megatron_mft.data.taskdir import discover_tasks

    data = tmp_path / "data"
    write_jsonl(data / "alpha" / "train.jsonl", [GOOD, GOOD])
    (data / "alpha" / "extra.jsonl").symlink_to(tmp_path / "moved" / "extra.jsonl")  # next to a good file
    (data / "beta").mkdir()
    (data / "beta" / "part.jsonl").symlink_to(tmp_path / "gone.jsonl")  # the task's only file
    (data / "gamma").symlink_to("../mnt/gamma")  # a task folder on a mount that is not there
    (data / "delta").mkdir()
    (data / "delta" / "loop.jsonl").symlink_to("loop.jsonl")
    write_jsonl(tmp_path / "kept.jsonl", [GOOD])
    (data / "epsilon").mkdir()
    (data / "epsilon" / "train.jsonl").symlink_to(tmp_path / "kept.jsonl")  # a working link is data
    out = tmp_path / "out"
    assert main(cli_args(data, out, 128)) == 2
    err = capsys.readouterr().err
    for needle in (f"{data}/alpha/extra.jsonl: symbolic link to {tmp_path}/moved/extra.jsonl, which does not exist",
                   f"{data}/beta/part.jsonl: symbolic link to {tmp_path}/gone.jsonl, which does not exist",
                   f"{data}/gamma: symbolic link to ../mnt/gamma ({tmp_path}/mnt/gamma), which does not exist",
                   f"{data}/delta/loop.jsonl: symbolic link to loop.jsonl ({data}/delta/loop.jsonl), which cannot be "
                   f"reached (Too many levels of symbolic links)"):
        assert needle in err, (needle, err)
    assert "no .jsonl files" not in err and "Traceback" not in err, err
    assert not out.exists()
    for link in ("alpha/extra.jsonl", "beta/part.jsonl", "gamma", "delta/loop.jsonl"):  # without them, the rest is data
        (data / link).unlink()
    (data / "beta").rmdir()
    (data / "delta").rmdir()
    tasks = discover_tasks(data)
    assert [(t.name, t.train) for t in tasks] == [("alpha", (str(data / "alpha" / "train.jsonl"),)),
                                                  ("epsilon", (str(data / "epsilon" / "train.jsonl"),))]


def test_only_broken_links_that_could_be_input_are_refused(tmp_path, capsys, caplog):
    """Any broken link at the top refused the folder (a README.md -> ../moved.md: exit 2), while a
    task's link to a missing sub-folder was skipped silently (not .jsonl): now a name without a
    suffix (a task folder or sub-folder) or ending in .jsonl is refused, at both levels, and any
    other broken link is ignored with one warning naming it (stderr and stats.json; the logger when
    no one else prints it, as for online data)."""
    from megatron_mft.data.taskdir import DataDirError, discover_tasks

    data = tmp_path / "data"
    write_jsonl(data / "alpha" / "train.jsonl", [GOOD, GOOD])
    (data / "README.md").symlink_to("../moved.md")
    (data / "alpha" / "notes.txt").symlink_to(tmp_path / "gone.txt")
    (data / "alpha" / "_old").symlink_to(tmp_path / "old")  # named as a skipped folder: skipped
    (data / ".cache").symlink_to(tmp_path / "cache")
    ignored = [f"{data}/README.md: symbolic link to ../moved.md ({tmp_path}/moved.md), which does not exist; ignored "
               f"(a .md file is no task folder or data file)",
               f"{data}/alpha/notes.txt: symbolic link to {tmp_path}/gone.txt, which does not exist; ignored "
               f"(a .txt file is no task folder or data file)"]
    out = tmp_path / "out"
    assert main(cli_args(data, out, 128)) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "symbolic link" in line] == [f"warning: {w}" for w in ignored], err
    assert json.loads((out / "stats.json").read_text())["warnings"] == ignored
    with caplog.at_level("WARNING", logger="megatron_mft.data.taskdir"):
        assert [t.train for t in discover_tasks(data)] == [(str(data / "alpha" / "train.jsonl"),)]
    assert [r.getMessage() for r in caplog.records] == ignored

    (data / "alpha" / "part2").symlink_to(tmp_path / "mnt" / "part2")  # a sub-folder on a missing mount
    (data / "alpha" / "deep").mkdir()
    (data / "alpha" / "deep" / "more").symlink_to("../../../nowhere")
    (data / "beta.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (data / "py3.10").symlink_to(tmp_path / "mnt" / "py3.10")  # a task folder with a dot in its name
    warned: list[str] = []
    with pytest.raises(DataDirError) as e:
        discover_tasks(data, warned.append)
    assert str(e.value).splitlines() == [
        f"{data}/beta.jsonl: symbolic link to {tmp_path}/gone.jsonl, which does not exist",
        f"{data}/py3.10: symbolic link to {tmp_path}/mnt/py3.10, which does not exist",
        f"{data}/alpha/part2: symbolic link to {tmp_path}/mnt/part2, which does not exist",
        f"{data}/alpha/deep/more: symbolic link to ../../../nowhere ({tmp_path}/nowhere), which does not exist"]
    assert warned == ignored


def test_cli_exit_codes_via_subprocess(tmp_path):
    data = _data(tmp_path, BAD["invalid_json"][0])
    write_jsonl(data / "gamma" / "train.jsonl", [GOOD, LONG])
    p = run_cli(*cli_args(data, tmp_path / "out", 128))
    assert p.returncode == 1, p.stderr
    assert f"{data / 'beta' / 'part.jsonl'}:3: invalid_json: column" in p.stderr
    assert f"{data / 'gamma' / 'train.jsonl'}:2: overlong:" in p.stderr  # every bad line is reported at once
    assert "--skip-bad-samples" in p.stderr
    assert not (tmp_path / "out").exists()
    p = run_cli("--data-dir", str(data))  # missing required flags: argparse's usage error
    assert p.returncode == 2 and "--tokenizer-model" in p.stderr


def test_skip_bad_samples_logs_and_counts_per_reason(tmp_path):
    data = tmp_path / "data"
    kinds = [k for k in sorted(BAD) if k != "overlong"]
    write_jsonl(data / "alpha" / "train.jsonl", [GOOD] * 3)
    write_jsonl(data / "beta" / "train.jsonl", [GOOD] + [BAD[k][0] for k in kinds] + [LONG, GOOD])
    out = tmp_path / "out"
    assert main(cli_args(data, out, 128, "best-fit", "--skip-bad-samples", "--val-ratio", "0")) == 0
    stats = json.loads((out / "stats.json").read_text())
    beta = stats["tasks"]["beta"]
    expected = {}
    for k in kinds + ["overlong"]:
        expected[BAD[k][1]] = expected.get(BAD[k][1], 0) + 1
    assert beta["rejected_reasons"] == expected
    assert beta["rejected"] == len(kinds) + 1 and beta["samples"] == 2
    assert stats["tasks"]["alpha"]["rejected"] == 0 and stats["tasks"]["alpha"]["samples"] == 3
    assert stats["rejected"] == len(kinds) + 1 and stats["rejected_reasons"] == expected
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"], r["action"]) for r in rejected] == [
        (i + 2, BAD[k][1], "rejected") for i, k in enumerate(kinds)] + [(len(kinds) + 2, "overlong", "rejected")]
    assert all(r["file"] == str(data / "beta" / "train.jsonl") for r in rejected)
    assert rejected[kinds.index("invalid_json")]["raw"] == BAD["invalid_json"][0]


def test_rejected_raw_is_the_line_the_parser_saw(tmp_path):
    """A byte-order mark and a CRLF ending are not part of the line: rejected.jsonl shows it as parsed."""
    data = tmp_path / "data"
    (data / "t").mkdir(parents=True)
    (data / "t" / "train.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": 1, "answer": "x"}\r\n'
                                             + json.dumps(GOOD).encode() + b"\r\n")
    out = tmp_path / "out"
    assert main(cli_args(data, out, 128, "best-fit", "--skip-bad-samples", "--val-ratio", "0")) == 0
    (rej,) = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert (rej["line"], rej["reason"], rej["raw"]) == (1, "wrong_type", '{"prompt": 1, "answer": "x"}')


def test_overlong_drop_and_truncate(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "t" / "train.jsonl", [GOOD, LONG, GOOD, {"text": "word " * 400}])
    out = tmp_path / "drop"
    assert main(cli_args(data, out, 64, "next-fit", "--overlong", "drop", "--val-ratio", "0")) == 0
    s = json.loads((out / "stats.json").read_text())["tasks"]["t"]
    assert (s["samples"], s["dropped"], s["truncated"], s["rejected"]) == (2, 2, 0, 0)
    logged = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["action"]) for r in logged] == [(2, "dropped"), (4, "dropped")]

    out = tmp_path / "trunc"
    assert main(cli_args(data, out, 64, "none", "--overlong", "truncate", "--val-ratio", "0")) == 0
    s = json.loads((out / "stats.json").read_text())
    assert (s["tasks"]["t"]["samples"], s["tasks"]["t"]["truncated"]) == (4, 2)
    from megatron_mft.data.indexed import IndexedSplit

    split = IndexedSplit(out, "train")
    assert sorted(split.sample_lengths.tolist())[-2:] == [64, 64]


def test_no_partial_output_when_writing_fails(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_jsonl(data / "t" / "train.jsonl", [GOOD] * 4)
    out = tmp_path / "out"
    assert main(cli_args(data, out, 64, "best-fit")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    from megatron_mft.data import indexed

    real = indexed.write_split

    def boom(directory, split, *a, **k):
        real(directory, split, *a, **k)  # some files are on disk when the failure happens
        raise OSError("disk full")

    monkeypatch.setattr(indexed, "write_split", boom)
    from megatron_mft.errors import UserError

    with pytest.raises(UserError, match=f"--output-dir {out}: writing failed at .*disk full"):
        from megatron_mft.data.preprocess import PreprocessArgs, preprocess

        preprocess(PreprocessArgs(str(data), DEMO_TOKENIZER, 64, "none", str(out), overwrite=True, progress=False))
    # the previous output is untouched and nothing else is left in the parent folder
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]
    # and an existing folder is never replaced silently (a usage error)
    assert main(cli_args(data, out, 64, "best-fit")) == 2


# Lines where a strict parser and the stdlib's json may disagree: the stdlib's verdict must win.
EDGE_LINES = [
    b'{"prompt": "q", "answer": NaN}',  # stdlib accepts NaN; a strict parser does not
    b'{"prompt": "q", "answer": "\\ud800"}',  # lone surrogate escape
    b'{"prompt": "q", "answer": "a", "id": 123456789012345678901234567890}',  # beyond 64 bits
    b'{"prompt": "q", "answer": "a", "answer": "b"}',  # duplicate key: the last one counts
    b'\xef\xbb\xbf{"prompt": "q", "answer": "a"}',  # BOM inside a line
    b'   ', b'', b'\t',  # blank
    b'{"prompt": "caf\xe9", "answer": "x"}',  # invalid UTF-8
    b'{"prompt": "q", "answer": "a"} trailing',
    b'{"prompt": "q",\n "answer": "a"}',
    b'{"chat_rounds": [{"role": "user", "content": "\\u00e9 \\n"}, {"role": "bot", "content": "ok"}]}',
    b'[' * 2000 + b']' * 2000,  # deeper than the strict parser's limit
]


@pytest.mark.parametrize("raw", EDGE_LINES, ids=range(len(EDGE_LINES)))
def test_fast_json_path_agrees_with_the_stdlib(raw, monkeypatch):
    from megatron_mft.data import records

    assert records._strict_loads is not None, "orjson (requirements.txt) is not installed"

    def outcome():
        try:
            return ("ok", records.parse_line(raw))
        except records.RecordError as e:
            return ("error", e.reason, e.detail)
        except RecursionError:
            return ("recursion",)

    fast = outcome()
    monkeypatch.setattr(records, "_strict_loads", None)
    assert fast == outcome()


def test_workers_are_capped_at_the_cpus_this_process_may_use(tmp_path, capsys):
    """--workers 100000 started that many processes and the kernel killed them for memory, with no
    message: at most one worker per CPU of this process's affinity, said once."""
    import os

    from megatron_mft.data.preprocess import PreprocessArgs, preprocess

    cpus = len(os.sched_getaffinity(0))
    write_jsonl(tmp_path / "raw" / "a" / "train.jsonl",
                [{"chat_rounds": [{"role": "human", "content": f"Q{i}?"}, {"role": "bot", "content": "A."}]}
                 for i in range(8)])
    stats = preprocess(PreprocessArgs(str(tmp_path / "raw"), str(DEMO_TOKENIZER), 64, "best-fit", str(tmp_path / "out"),
                                      progress=False, workers=100_000, val_ratio=0.0))
    assert stats["workers"] == cpus
    assert f"note: --workers 100000: {cpus} used, one per CPU this process may run on" in capsys.readouterr().err


def test_linked_sub_folders_of_a_task_are_read_once(tmp_path):
    """A sub-folder linked into a task (alpha/more -> /elsewhere) was silently not read (os.walk
    does not follow links); now it is, each folder once. Not read through a link, with a warning:
    a folder inside the task (a held-out val/ folder linked elsewhere in the task would have
    become training data), a folder holding the task (an endless walk; / too), another task's
    folder (its files would count twice), a folder already read through another link. Two task
    folders that are one folder are refused."""
    from megatron_mft.data.taskdir import DataDirError, discover_tasks

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write_jsonl(data / "alpha" / "train.jsonl", [GOOD])
    write_jsonl(data / "alpha" / "deep" / "val" / "v.jsonl", [GOOD])
    write_jsonl(elsewhere / "c.jsonl", [GOOD])
    (elsewhere / "loop").symlink_to(elsewhere)  # outside the task, back to itself
    write_jsonl(data / "beta" / "train.jsonl", [GOOD])
    (data / "alpha" / "more").symlink_to(elsewhere)
    (data / "alpha" / "more2").symlink_to(elsewhere)
    (data / "alpha" / "heldout").symlink_to(data / "alpha" / "deep" / "val")
    (data / "alpha" / "deep" / "up").symlink_to(data)
    (data / "alpha" / "root").symlink_to("/")
    (data / "alpha" / "b").symlink_to(data / "beta")
    warned: list[str] = []
    alpha, beta = discover_tasks(data, warned.append)
    assert alpha.train == tuple(str(data / "alpha" / f) for f in ("more/c.jsonl", "train.jsonl"))
    assert alpha.val == (str(data / "alpha" / "deep" / "val" / "v.jsonl"),)
    assert beta.train == (str(data / "beta" / "train.jsonl"),)
    a = data / "alpha"
    assert sorted(warned) == sorted([
        f"{a}/b: links to {data}/beta, task beta's folder: its files would count for two tasks; not read through this link",
        f"{a}/deep/up: links to {data}, a folder that holds this task; not read through this link",
        f"{a}/heldout: links to {a}/deep/val, inside this task, read there; not read through this link",
        f"{a}/more/loop: links to {elsewhere}, a folder this task already reads; not read through this link",
        f"{a}/more2: links to {elsewhere}, a folder this task already reads; not read through this link",
        f"{a}/root: links to /, a folder that holds this task; not read through this link"]), warned

    # linked files: a val/ file linked among the training files, another task's file
    (data / "alpha" / "extra.jsonl").symlink_to(data / "alpha" / "deep" / "val" / "v.jsonl")
    (data / "alpha" / "b.jsonl").symlink_to(data / "beta" / "train.jsonl")
    warned.clear()
    alpha, beta = discover_tasks(data, warned.append)
    assert alpha.train == tuple(str(data / "alpha" / f) for f in ("more/c.jsonl", "train.jsonl"))
    assert alpha.val == (str(data / "alpha" / "deep" / "val" / "v.jsonl"),)
    assert f"{a}/extra.jsonl: links to {a}/deep/val/v.jsonl, a file this task already reads; not read through " \
           f"this link" in warned
    assert f"{a}/b.jsonl: links to {data}/beta/train.jsonl, a file of task beta: it would count for two tasks; not " \
           f"read through this link" in warned

    (data / "gamma").symlink_to(data / "alpha")
    (data / "all").symlink_to("/")  # holds the data folder: refused before any walk
    with pytest.raises(DataDirError) as e:
        discover_tasks(data, warned.append)
    assert str(e.value).splitlines() == [
        f"{data}/all: links to /, a folder that holds the data folder itself",
        f"{data}/gamma: the same folder as task alpha (or one inside the other, through a symbolic link): one task "
        f"per folder, or its samples count twice"]
