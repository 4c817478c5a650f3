"""Checkpoints lose nothing (issue 13): a re-save keeps the old step until the new one is durable
(SIGKILL in the window), `latest` that is dangling / unreadable / outside is refused with the
steps found, train.resume_from picks one, a truncated shard is named with the intact step to use,
a full disk says so and leaves no partial step, and resume refuses a config that does not
continue the checkpoint's run."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import ROOT, env, run_many

SAVER = str(ROOT / "tests" / "scripts" / "save_tiny_checkpoint.py")


def _tiny_chunks(env_, seed: int):
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2"])
    init_parallel(cfg.parallel, env_, seed)
    return build_model_chunks(cfg.model, cfg.parallel, env_)


def _save(root: Path, step: int, chunks) -> Path:
    from megatron_mft.checkpoint.dist import save_checkpoint

    return save_checkpoint(root, step, chunks, common={"step": step}, run_info={"step": step})


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tp1_env, tmp_path_factory):
    """Checkpoints step 1 and step 2 of a tiny model (different weights), and that model."""
    root = tmp_path_factory.mktemp("saved") / "checkpoints"
    _save(root, 1, _tiny_chunks(tp1_env, seed=1))
    chunks = _tiny_chunks(tp1_env, seed=2)
    _save(root, 2, chunks)
    return root, chunks


def _copy(saved_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "out" / "checkpoints"
    shutil.copytree(saved_root, root)
    return root


def test_killed_resave_keeps_the_old_step(saved, tmp_path):
    """Re-saving step 2 (a re-run of a finished job, a stop signal at a save step) and SIGKILL
    after the new shards are written, before publication: step 2 is still the old, whole copy."""
    root = _copy(saved[0], tmp_path)
    before = _digest(root / "step_0000002")
    e = env(2)
    e["MFT_FAULT_SLEEP_IN_SAVE"] = "2:120"
    proc = subprocess.Popen([sys.executable, SAVER, str(root), "2", "7"], cwd=ROOT, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tmp = root / "step_0000002.tmp"
    deadline = time.time() + 240
    while not (tmp / "rng").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the re-save ended early: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert _digest(root / "step_0000002") == before  # the old copy, untouched
    from megatron_mft.checkpoint.dist import checkpoint_problems, resume_checkpoint

    assert checkpoint_problems(root / "step_0000002") == []
    assert resume_checkpoint(root) == root / "step_0000002"


def test_resave_replaces_atomically_with_and_without_rename_exchange(tp1_env, saved, tmp_path, monkeypatch):
    """Both publication paths end with the new copy and no leftovers; with the fallback, a crash
    between its two renames leaves step_N.old, which `latest` readers use and the next save puts back."""
    from megatron_mft.checkpoint import dist

    def shards():  # the weights (the metadata and RNG files differ from save to save)
        return {k: v for k, v in _digest(root / "step_0000002").items() if k.endswith(".distcp")}

    root = _copy(saved[0], tmp_path)
    old = shards()
    _save(root, 2, _tiny_chunks(tp1_env, seed=5))  # renameat2(RENAME_EXCHANGE) here
    assert shards() != old and sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"]
    monkeypatch.setattr(dist, "exchange_paths", lambda a, b: False)
    _save(root, 2, saved[1])  # the step-2 weights again, through the two-rename fallback
    assert shards() == old
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"]
    # a crash between "step_2 -> step_2.old" and "step_2.tmp -> step_2":
    os.replace(root / "step_0000002", root / "step_0000002.old")
    assert dist.resume_checkpoint(root) == root / "step_0000002.old"
    _save(root, 3, saved[1])
    assert (root / "step_0000002" / "run.json").is_file() and not (root / "step_0000002.old").exists()


def test_resave_keeps_the_files_it_did_not_write(tp1_env, saved, tmp_path, monkeypatch):
    """A user's files in a step folder (an HF export, notes) survive a re-save of that step by
    either publication path, and an interrupted re-save's leftover copy holding them is not
    deleted with them: they move into the step."""
    from megatron_mft.checkpoint import dist

    root = _copy(saved[0], tmp_path)
    step = root / "step_0000002"

    def put_mine(folder: Path) -> None:
        (folder / "hf_export").mkdir()
        (folder / "hf_export" / "config.json").write_text("{}")
        (folder / "NOTES.md").write_text("mine")

    def mine_kept() -> bool:
        return ((step / "hf_export" / "config.json").read_text() == "{}" and (step / "NOTES.md").read_text() == "mine"
                and (step / "run.json").is_file())

    put_mine(step)
    _save(root, 2, saved[1])  # renameat2(RENAME_EXCHANGE)
    assert mine_kept()
    monkeypatch.setattr(dist, "exchange_paths", lambda a, b: False)
    _save(root, 2, saved[1])  # the two-rename fallback
    assert mine_kept()
    # killed after publication, before the old copy (holding the user's files) was removed
    shutil.rmtree(step / "hf_export"), (step / "NOTES.md").unlink()
    leftover = root / "step_0000002.tmp"
    shutil.copytree(saved[0] / "step_0000002", leftover)
    put_mine(leftover)
    _save(root, 3, saved[1])  # the next save clears leftovers
    assert mine_kept() and not leftover.exists()
    # no step to take them: the leftover stays, and a later save of that step names it
    orphan = root / "step_0000009.tmp"
    orphan.mkdir()
    (orphan / "NOTES.md").write_text("mine")
    (root / "step_0000008.old").write_text("a file, not a leftover folder")  # ignored, not a crash
    (root / "export.tmp").mkdir()  # not a step's leftover: untouched
    (root / "export.tmp" / "x").write_text("x")
    _save(root, 4, saved[1])
    assert (orphan / "NOTES.md").read_text() == "mine" and (root / "export.tmp" / "x").is_file()
    with pytest.raises(dist.CheckpointError, match="step_0000009.tmp is left from an interrupted save and holds "
                                                   "NOTES.md"):
        _save(root, 9, saved[1])
    assert (orphan / "NOTES.md").read_text() == "mine"
    # the two-rename path meets a kept step_N.old whose user file is also in step_N: refused
    # before anything moves
    shutil.copytree(step, root / "step_0000002.old")
    with pytest.raises(dist.CheckpointError, match="step_0000002.old, left by an interrupted re-save, holds "
                                                   "NOTES.md, hf_export"):
        _save(root, 2, saved[1])
    assert mine_kept() and (root / "step_0000002.old" / "NOTES.md").is_file()
    shutil.rmtree(root / "step_0000002.old")
    monkeypatch.undo()

    # after publication nothing deletes them: not a failing pointer update (disk full) ...
    def full(*_a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dist, "_write_latest", full)
    with pytest.raises(dist.CheckpointError, match="no space left"):
        _save(root, 2, saved[1])
    assert mine_kept()
    monkeypatch.undo()
    # ... nor an entry the file system refuses to move (it stays in the old copy, which stays)
    real_replace = os.replace

    def refuse_notes(a, b):
        if Path(a).name == "NOTES.md":
            raise PermissionError(13, "Permission denied", str(a))
        return real_replace(a, b)

    monkeypatch.setattr(dist.os, "replace", refuse_notes)
    _save(root, 2, saved[1])
    monkeypatch.undo()
    leftovers = [p for p in root.iterdir() if p.name.startswith("step_0000002.")]
    assert (step / "hf_export" / "config.json").is_file() and (step / "run.json").is_file()
    assert [(p / "NOTES.md").read_text() for p in leftovers] == ["mine"]


def test_truncated_shard_names_the_file_and_the_intact_step(tp1_env, saved, tmp_path):
    from megatron_mft.checkpoint.dist import load_checkpoint

    root = _copy(saved[0], tmp_path)
    shard = max((root / "step_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    chunks = _tiny_chunks(tp1_env, seed=0)
    with pytest.raises(BaseException) as err:  # was a bare EOFError / dcp CheckpointException
        load_checkpoint(root / "step_0000002", chunks)
    msg = str(err.value)
    assert type(err.value).__name__ == "CheckpointError" and err.value.exit_code == 1
    assert "damaged" in msg and str(shard) in msg and "truncated" in msg
    assert str(root / "step_0000001") in msg and "train.resume_from=1" in msg


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tiny tmpfs at path; None when this machine does not allow it (then the reason)."""
    path.mkdir(parents=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or f"mount exit {p.returncode}")


def test_disk_full_names_the_path_and_removes_the_partial_step(tp1_env, saved, tmp_path, monkeypatch):
    small = tmp_path / "small"
    why_not = _mount_tmpfs(small, "1m")  # the tiny model's shards alone are ~2.5 MB
    if why_not:  # not root / no CAP_SYS_ADMIN: the project's fault hook raises ENOSPC instead
        print(f"tmpfs not available ({why_not}); using MFT_FAULT_ENOSPC_IN_SAVE")
        monkeypatch.setenv("MFT_FAULT_ENOSPC_IN_SAVE", "3")
    try:
        root = small / "checkpoints"
        with pytest.raises(BaseException) as err:
            _save(root, 3, saved[1])
        msg = str(err.value)
        assert type(err.value).__name__ == "CheckpointError"
        assert "no space left on device" in msg and str(root / "step_0000003") in msg
        assert not (root / "step_0000003.tmp").exists() and not (root / "step_0000003").exists()
    finally:
        if not why_not:
            subprocess.run(["umount", str(small)], check=False)


# ------------------------------------------------------------------ which checkpoint to resume
def _fake_steps(root: Path, steps=(1, 2)) -> None:
    for s in steps:
        d = root / f"step_{s:07d}"
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"step": s}))


@pytest.mark.parametrize("pointer", [b"step_0000009\n", b"\xff\xfe\x00garbage", b"", b"../elsewhere/step_0000001",
                                     b"/abs/step_0000001"])
def test_unusable_latest_is_refused_with_the_steps_found(tmp_path, pointer):
    from megatron_mft.checkpoint.dist import CheckpointError, resume_checkpoint

    root = tmp_path / "run" / "checkpoints"
    _fake_steps(root)
    _fake_steps(tmp_path / "run" / "elsewhere", (1,))  # a real checkpoint, but outside this folder
    (root / "latest").write_bytes(pointer)
    with pytest.raises(CheckpointError) as err:
        resume_checkpoint(root)
    msg = str(err.value)
    assert str(root) in msg and "step_0000001, step_0000002" in msg and "train.resume_from=2" in msg


def test_resume_from_picks_a_step_or_a_folder(tmp_path):
    from megatron_mft.checkpoint.dist import CheckpointError, resume_checkpoint
    from megatron_mft.config import ConfigError, load_config

    root = tmp_path / "checkpoints"
    assert resume_checkpoint(root) is None  # nothing there: a fresh start
    _fake_steps(root)
    with pytest.raises(CheckpointError, match="no `latest` file"):
        resume_checkpoint(root)  # checkpoints without a pointer: never a silent restart
    assert resume_checkpoint(root, "1") == root / "step_0000001"
    assert resume_checkpoint(tmp_path / "new", str(root / "step_0000002")) == root / "step_0000002"
    with pytest.raises(CheckpointError) as err:
        resume_checkpoint(root, "7")
    assert err.value.exit_code == 2 and "step_0000001, step_0000002" in str(err.value)
    with pytest.raises(ConfigError, match="train.resume_from"):
        load_config(None, ["data.path=/x", "train.resume_from=none"])


def test_train_refuses_a_dangling_latest_and_changes_nothing(refused_runs):
    out, before, (stdout, stderr) = refused_runs["dangling"]  # exit 1: checked by run_many
    assert "Traceback" not in stderr
    assert str(out / "checkpoints") in stderr and "step_0000001, step_0000002" in stderr
    assert "train.resume_from=2" in stderr
    assert _digest(out) == before and not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------ does the config continue the run
def _run_json(train_overrides: list, demo_data: Path) -> dict:
    from megatron_mft.config import load_config
    from megatron_mft.config.base import to_dict
    from train_helpers import CONFIG

    manifest = json.loads((Path(demo_data) / "manifest.json").read_text())
    return {"config": to_dict(load_config(CONFIG, train_overrides + ["train.steps=4"])),
            "task_names": [t["name"] for t in manifest["tasks"]], "manifest": manifest, "peft": "none", "step": 2}


def test_resume_differences_refuse_and_allow(train_overrides, demo_data, tmp_path):
    from megatron_mft.checkpoint.resume_check import resume_differences
    from megatron_mft.config import load_config
    from train_helpers import CONFIG

    saved = _run_json(train_overrides, demo_data)
    manifest, tasks = saved["manifest"], saved["task_names"]
    same = load_config(CONFIG, train_overrides + ["train.steps=9", "parallel.tp=2", "train.log_interval=3"])
    refused, changed = resume_differences(saved, same, manifest, tasks)
    assert refused == []
    assert set(changed) == {"train.steps 4 -> 9", "parallel.tp 1 -> 2", "train.log_interval 1 -> 3"}

    other = load_config(CONFIG, train_overrides + ["peft.method=lora", "loss.mode=sample", "model.num_layers=2"])
    moved = json.loads(json.dumps(manifest))
    moved["tasks"][0]["train_files"] = ["other.jsonl"]
    refused, _ = resume_differences(saved, other, moved, tasks)
    text = "\n".join(refused)
    for what in ("model shape num_layers: checkpoint 4, config 2", "peft.method", "loss.mode: checkpoint",
                 "data tasks: checkpoint"):
        assert what in text, (what, text)
    assert len(refused) == 4
    refused, _ = resume_differences(saved, same, manifest, tasks[::-1])
    assert refused == [f"task names: checkpoint {tasks}, data {tasks[::-1]}"]
    lora = load_config(CONFIG, train_overrides + ["peft.method=lora"])
    lora_saved = {**saved, "peft": "lora", "config": {**saved["config"], "peft": {**saved["config"]["peft"],
                                                                                   "method": "lora"}}}
    moved_base = load_config(CONFIG, train_overrides + ["peft.method=lora", f"train.init_checkpoint={tmp_path}",
                                                        "peft.rank=4"])
    assert resume_differences(lora_saved, lora, manifest, tasks)[0] == []
    text = "\n".join(resume_differences(lora_saved, moved_base, manifest, tasks)[0])
    assert "train.init_checkpoint (the frozen base" in text and "peft.rank: checkpoint 8, config 4" in text


def test_resume_accepts_an_in_memory_manifest_with_tuples(train_overrides, demo_data):
    """Online data keeps its manifest in memory, where sequences are tuples; run.json has lists."""
    from megatron_mft.checkpoint.resume_check import resume_differences
    from megatron_mft.config import load_config
    from train_helpers import CONFIG

    saved = _run_json(train_overrides, demo_data)
    in_memory = json.loads(json.dumps(saved["manifest"]))
    in_memory["template"] = {"specials": (), **{k: v for k, v in (in_memory.get("template") or {}).items()
                                                 if k != "specials"}}
    saved["manifest"]["template"] = {**in_memory["template"], "specials": []}
    in_memory["tasks"][0]["train_files"] = tuple(in_memory["tasks"][0]["train_files"])
    same = load_config(CONFIG, train_overrides + ["train.steps=4"])
    assert resume_differences(saved, same, in_memory, saved["task_names"]) == ([], [])


def test_train_refuses_an_incompatible_resume_in_one_message(refused_runs):
    """A full checkpoint resumed as LoRA with another loss mode (was a 60-key KeyError): one
    message listing both, before the model is built."""
    out, _, (stdout, stderr) = refused_runs["incompatible"]  # exit 2: checked by run_many
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stdout[-2000:] + stderr[-2000:]
    assert "peft.method: a full-model checkpoint" in stderr and "loss.mode: checkpoint 'task-token'" in stderr
    assert not (out / "metrics.jsonl").exists()


def test_a_refused_resume_leaves_no_output_dir_it_created(refused_runs):
    """A resume refused at start-up into a new output_dir (here: a step folder of another run with
    another PEFT method) left behind the empty folder (and its parent) the trainer had made for its
    lock; now both are gone. An empty output_dir that existed before is kept, empty."""
    fresh, _, (_, stderr) = refused_runs["fresh"]  # exit 2: checked by run_many
    assert "peft.method: a full-model checkpoint" in stderr
    assert not fresh.exists() and not fresh.parent.exists() and fresh.parent.parent.is_dir()
    kept, _, (_, stderr) = refused_runs["kept"]
    assert "peft.method: a full-model checkpoint" in stderr
    assert kept.is_dir() and list(kept.iterdir()) == []


@pytest.fixture(scope="module")
def refused_runs(tp1_env, tmp_path_factory, train_overrides, demo_data):
    """The training CLI refusing to start, every refusal in one process (tests/train_many.py, which
    checks each exit code): a ``latest`` naming a missing step (exit 1), a full checkpoint resumed
    as LoRA with another loss mode (exit 2), and that checkpoint's step folder resumed so into a new
    output_dir (``fresh``, below a folder that does not exist either) and into an existing empty one
    (``kept``). name -> (output_dir, digest before, (stdout, stderr))."""
    from megatron_mft.checkpoint.dist import save_checkpoint
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel
    from train_helpers import CONFIG

    tmp = tmp_path_factory.mktemp("refused")
    dangling = tmp / "dangling"
    _fake_steps(dangling / "checkpoints")
    (dangling / "checkpoints" / "latest").write_text("step_0000009\n")
    before = _digest(dangling)

    cfg = load_config(CONFIG, train_overrides)
    init_parallel(cfg.parallel, tp1_env, cfg.seed)
    incompatible = tmp / "incompatible"
    info = _run_json(train_overrides, demo_data)
    save_checkpoint(incompatible / "checkpoints", 2, build_model_chunks(cfg.model, cfg.parallel, tp1_env),
                    common={"step": 2, "consumed_rows": 8}, run_info={k: v for k, v in info.items() if k != "step"})
    as_lora = ["train.steps=4", "peft.method=lora", "loss.mode=sample"]
    other_run = f"train.resume_from={incompatible / 'checkpoints' / 'step_0000002'}"
    fresh, kept = tmp / "new_parent" / "fresh", tmp / "kept"
    kept.mkdir()
    logs = run_many({
        "dangling": {"argv": train_overrides + [f"output_dir={dangling}", "train.steps=1"], "rc": 1},
        "incompatible": {"argv": train_overrides + [f"output_dir={incompatible}", *as_lora], "rc": 2},
        "fresh": {"argv": train_overrides + [f"output_dir={fresh}", other_run, *as_lora], "rc": 2},
        "kept": {"argv": train_overrides + [f"output_dir={kept}", other_run, *as_lora], "rc": 2},
    }, tmp, timeout=300)
    return {"dangling": (dangling, before, logs["dangling"]), "incompatible": (incompatible, None, logs["incompatible"]),
            "fresh": (fresh, None, logs["fresh"]), "kept": (kept, None, logs["kept"])}


@pytest.mark.slow
def test_optimizer_state_is_gathered_on_data_parallel_rank_0_only():
    """At DP=2 a save gathers the distributed optimizer's state to DP rank 0 (one gloo gather in
    host memory); DP rank 1 holds no copy. megatron's default all-gathered it to every rank through
    a GPU buffer of the whole chunk, which only DP rank 0's copy was written from (a 7B full
    fine-tune at DP=8 ran out of GPU memory at its first save). The checkpoint still restores
    every rank's moments exactly."""
    from train_helpers import torchrun

    run = subprocess.run(torchrun(2) + [str(ROOT / "tests" / "scripts" / "optimizer_state_ranks.py")], cwd=ROOT,
                         env=env(threads=1), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rank0, rank1 = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert rank0["numel"] == 3 * rank0["params"]  # fp32 parameter, exp_avg, exp_avg_sq of every parameter
    assert rank1["tensors"] == 0 and rank1["numel"] == 0
    assert rank0["calls"] == rank1["calls"] == ["gather"]  # no all_gather
    assert rank0["restored"] and rank1["restored"] and rank0["moments"] > 0
    assert "common state dict differs" not in run.stderr
