"""What a user owns or means is respected (a new user's sweep, ninth session): the trainer keeps a
config.yaml it did not write, refuses a run folder inside online task data, a starting checkpoint
of another shape or of adapters only, validation-driven features without validation rows, and
settings that offline data fixed at preprocessing and that would otherwise be ignored without a
word. (Re-saves keeping a user's files in a step folder: test_reliability_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from train_helpers import CONFIG, ROOT

TOKENIZER = ROOT / "examples/demo_data/tokenizer/demo_sp2048.model"


def _cfg(*overrides: str):
    from megatron_mft.config import load_config

    return load_config(CONFIG, list(overrides))


def test_resolved_config_never_replaces_a_config_yaml_the_trainer_did_not_write(tmp_path):
    from megatron_mft.training.recipe import RESOLVED_CONFIG_HEADER, Recipe

    out = tmp_path / "run"
    out.mkdir()

    def start(config_file=None):
        recipe = Recipe(_cfg(f"output_dir={out}", "train.steps=7"), config_file=config_file)
        recipe._write_resolved_config()

    def resolved(path: Path) -> dict:
        text = path.read_text()
        assert text.startswith(RESOLVED_CONFIG_HEADER)
        return yaml.safe_load(text)

    start()  # a fresh folder: config.yaml is the resolved config
    assert resolved(out / "config.yaml")["train"]["steps"] == 7 and not (out / "config.resolved.yaml").exists()
    start()  # its own file: replaced at each start
    assert resolved(out / "config.yaml")["train"]["steps"] == 7

    # written before the header existed: a full dump of every section is the trainer's, replaced
    from megatron_mft.config.base import to_dict

    dump = to_dict(_cfg())
    dump["train"].pop("stage"), dump["loss"].pop("preference")  # an older version's dump lacked a few
    (out / "config.yaml").write_text(yaml.safe_dump(dump, sort_keys=False))
    start()
    assert resolved(out / "config.yaml")["train"]["steps"] == 7 and not (out / "config.resolved.yaml").exists()

    # the user's own config.yaml (a partial config with a comment): kept byte for byte
    mine = CONFIG.read_text() + "# my notes\n"
    (out / "config.yaml").write_text(mine)
    start()
    assert (out / "config.yaml").read_text() == mine
    assert resolved(out / "config.resolved.yaml")["train"]["steps"] == 7

    # the very file passed as --config, even when it is a resolved config the trainer once wrote:
    # as config.yaml, and as config.resolved.yaml beside a config.yaml of the user's
    (out / "config.resolved.yaml").unlink()
    ours = RESOLVED_CONFIG_HEADER + "train:\n  steps: 3\n"
    (out / "config.yaml").write_text(ours)
    start(config_file=str(out / "config.yaml"))
    assert (out / "config.yaml").read_text() == ours and (out / "config.resolved.yaml").is_file()
    (out / "config.yaml").write_text(mine)
    (out / "config.resolved.yaml").write_text(ours)
    start(config_file=str(out / "config.resolved.yaml"))
    assert (out / "config.yaml").read_text() == mine and (out / "config.resolved.yaml").read_text() == ours
    # nor a config.resolved.yaml of the user's own (no header)
    (out / "config.resolved.yaml").write_text("train:\n  steps: 3\n")
    start()
    assert (out / "config.yaml").read_text() == mine and (out / "config.resolved.yaml").read_text() == "train:\n  steps: 3\n"


def _ckpt(root: Path, name: str, meta: dict) -> Path:
    root.mkdir(parents=True)
    (root / "metadata.json").write_text("{}")
    (root / name).write_text(json.dumps(meta))
    return root


def test_a_resume_sets_the_later_metrics_lines_aside_and_keeps_every_other_line(tmp_path, monkeypatch):
    """Lines of steps after the resume step go to a new side file (never over an existing one);
    lines without a step and unparseable ones (a hopelessly nested one too) stay in metrics.jsonl,
    in order. A torn last line (a crash while writing it) moves as well, also when nothing else
    does: kept, the next record would have been glued onto it; a whole last record that lost only
    its newline stays, ended. Only rank 0's log touches the file. A metrics.jsonl that is a
    symbolic link (a run folder copied with cp -as) becomes this run's own file: the file it
    pointed to, another run's log, is not changed."""
    from megatron_mft.training.metrics import MetricsLog

    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000")
    other = tmp_path / "other_run_metrics.jsonl"
    path = tmp_path / "metrics.jsonl"
    path.symlink_to(other.name)
    nested = "[" * 100_000 + "]" * 100_000
    text = ('{"step": 1, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"note": "no step"}\nnot json {\n'
            f'{nested}\n{{"step": 2, "val_loss/a": 1.5}}\n{{"step": 4, "loss": 0.5}}\n{{"step": 5, "lo')
    other.write_text(text)
    assert MetricsLog(tmp_path, enabled=False).set_aside_after(2) is None and path.read_text() == text
    taken = tmp_path / "metrics.superseded.20260101-000000.jsonl"
    taken.write_text("mine\n")
    log = MetricsLog(tmp_path, enabled=True)
    assert log.own_file() == f"a symbolic link to {other.name}" and not path.is_symlink()
    assert log.set_aside_after(2) == (3, tmp_path / "metrics.superseded.20260101-000000-1.jsonl")
    assert taken.read_text() == "mine\n" and other.read_text() == text
    assert (tmp_path / "metrics.superseded.20260101-000000-1.jsonl").read_text() == (
        '{"step": 3, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 5, "lo\n')
    assert not path.is_symlink() and path.read_text() == (
        f'{{"step": 1, "loss": 2.0}}\n{{"note": "no step"}}\nnot json {{\n{nested}\n{{"step": 2, "val_loss/a": 1.5}}\n')
    assert log.set_aside_after(2) is None  # nothing later: the file is left as it is
    log.write({"step": 3, "loss": 0.9})
    assert path.read_text().splitlines()[-1] == '{"step": 3, "loss": 0.9}'

    # a link with nothing to move (a run saved and stopped at its last logged step, then copied
    # with cp -as): the next lines went into the other run's log; a hard link (cp -al) alike
    for name, link in (("sym", lambda src, dst: dst.symlink_to(src)), ("hard", lambda src, dst: os.link(src, dst))):
        run = tmp_path / name
        run.mkdir()
        original = tmp_path / f"{name}_original.jsonl"
        original.write_text('{"step": 1, "loss": 2.0}\n')
        link(original, run / "metrics.jsonl")
        log = MetricsLog(run, enabled=True)
        assert log.own_file() and log.set_aside_after(1) is None
        log.write({"step": 2, "loss": 1.0})
        assert original.read_text() == '{"step": 1, "loss": 2.0}\n'
        assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n'

    # a torn line alone is moved too (before, it stayed and the next record joined it); a whole
    # record without its newline stays, ended (with a step or without)
    for name, last, moved, kept in (("torn", '{"step": 2, "lo', 1, ""), ("whole", '{"step": 2, "loss": 1.0}', None,
                                                                         '{"step": 2, "loss": 1.0}\n'),
                                    ("note", '{"note": "x"}', None, '{"note": "x"}\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n' + last)
        log = MetricsLog(tmp_path / name, enabled=True)
        assert (log.set_aside_after(2) or [None])[0] == moved
        log.write({"step": 3, "loss": 0.9})
        assert (tmp_path / name / "metrics.jsonl").read_text() == (
            '{"step": 1, "loss": 2.0}\n' + kept + '{"step": 3, "loss": 0.9}\n')


def test_preflight_refuses_what_cannot_start_before_anything_is_built(tmp_path, tiny_init):
    from megatron_mft.training.preflight import PreflightError, check_run

    def problems(*overrides: str) -> list[str]:
        try:
            check_run(_cfg(*overrides), world_size=1)
        except PreflightError as e:
            return e.problems
        return []

    # a run folder inside online task data would be read back as a task (and left there)
    data = tmp_path / "raw"
    shutil.copytree(ROOT / "examples/demo_data/raw", data)
    [p] = problems(f"data.path={data}", f"output_dir={data}/run1")
    assert "output_dir" in p and str(data) in p and "inside data.path" in p
    assert not (data / "run1").exists()
    assert problems(f"data.path={data}", f"output_dir={tmp_path}/run1") == []

    # a starting checkpoint of another shape, told by each kind of checkpoint's description:
    # `checkpoint init` (init.json, the session fixture), a training step (run.json), a conversion
    out = f"output_dir={tmp_path}/out"
    assert problems(f"train.init_checkpoint={tiny_init}", out) == []
    [p] = problems(f"train.init_checkpoint={tiny_init}", "model.num_layers=2", out)
    assert "num_layers: checkpoint 4, config 2" in p and str(tiny_init / "init.json") in p
    step = _ckpt(tmp_path / "step", "run.json", {"config": {"model": {"preset": "tiny", "hidden_size": 64}}})
    [p] = problems(f"train.init_checkpoint={step}", out)
    assert "hidden_size: checkpoint 64, config 128" in p
    conv = _ckpt(tmp_path / "conv", "conversion.json", {"model": {"preset": "tiny", "ffn_hidden_size": 256}})
    [p] = problems(f"train.init_checkpoint={conv}", out)
    assert "ffn_hidden_size: checkpoint 256, config 352" in p
    # settings that do not change the weights may differ (e.g. a context extension), and a size given
    # explicitly equal to the one derived is the same shape
    assert problems(f"train.init_checkpoint={tiny_init}", "model.rotary_base=500000", "model.kv_channels=32",
                    out) == []
    # a LoRA step holds adapters only: not a model to start from
    lora = _ckpt(tmp_path / "lora", "run.json", {"peft": "lora", "config": {"model": {"preset": "tiny"},
                                                                           "peft": {"method": "lora"}}})
    [p] = problems(f"train.init_checkpoint={lora}", out)
    assert "adapters only" in p and "--merge-lora" in p

    # an output_dir (or a folder on its way) that is a dangling symbolic link: exists() is False for
    # it, so it passed, and the lock's mkdir then failed as an internal error (rank 0 only: the
    # other ranks waited for it)
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    for out_dir in (tmp_path / "gone", tmp_path / "gone" / "run"):
        [p] = problems(f"output_dir={out_dir}")
        assert p == (f"output_dir: {out_dir} cannot be created: {tmp_path / 'gone'} is a symbolic link to "
                     f"{tmp_path / 'unmounted'}, which does not exist"), p


def test_make_dirs_refuses_a_part_that_is_no_folder_and_removes_what_it_made(tmp_path, monkeypatch):
    from megatron_mft.compat.fsops import make_dirs

    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    with pytest.raises(NotADirectoryError, match="gone is symbolic link to .*unmounted, which does not exist"):
        make_dirs(tmp_path / "gone")
    real_mkdir, calls = Path.mkdir, []

    def mkdir(self, *a, **k):  # the third folder fails (a quota, say): the two made before go again
        calls.append(self)
        if len(calls) == 3:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(PermissionError):
        make_dirs(tmp_path / "a" / "b" / "c")
    assert not (tmp_path / "a").exists()


def test_replace_file_atomically_keeps_modes_other_runs_files_and_is_not_blocked_by_a_stale_temporary(tmp_path):
    """A file replaced whole (latest, config.yaml, metrics.jsonl at a resume, results): the new file
    keeps the old one's permissions (a read-only one too); a temporary left by a killed writer with
    this PID (a requeued job in a container often gets the same one) does not block the write (it
    did: the name was fixed, opened exclusively); a symbolic link (a run folder copied with cp -as)
    is replaced by the new file, and the file it pointed to, another run's, is left as it was."""
    import os

    from megatron_mft.compat.fsops import replace_file_atomically

    run = tmp_path / "run"
    run.mkdir()
    mine = run / "results.json"
    mine.write_text("old\n")
    mine.chmod(0o444)
    stale = run / f".results.{os.getpid()}.tmp.json"
    stale.write_text("half")
    replace_file_atomically(str(mine), lambda tmp: Path(tmp).write_text("new\n"))
    assert mine.read_text() == "new\n" and (mine.stat().st_mode & 0o777) == 0o444
    assert sorted(p.name for p in run.iterdir()) == [stale.name, "results.json"]

    other = tmp_path / "other_run" / "latest"
    other.parent.mkdir()
    other.write_text("step_0000100\n")
    (run / "latest").symlink_to(other)
    (run / "config.yaml").symlink_to(tmp_path / "missing_mount" / "config.yaml")
    replace_file_atomically(str(run / "latest"), lambda tmp: Path(tmp).write_text("step_0000200\n"))
    replace_file_atomically(str(run / "config.yaml"), lambda tmp: Path(tmp).write_text("x: 1\n"))
    assert other.read_text() == "step_0000100\n" and (run / "latest").read_text() == "step_0000200\n"
    assert not (run / "latest").is_symlink() and not (tmp_path / "missing_mount").exists()


def test_a_read_only_result_file_is_replaced_by_its_owner(request):
    """As a user who is not root (root ignores file modes, so the suite's root runs would not see
    it; a forked child drops to 'nobody'): a 0444 file is replaced and stays 0444 (the mode was set
    on the temporary before the write, which then failed with PermissionError)."""
    import os
    import pwd

    from megatron_mft.compat.fsops import replace_file_atomically

    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mft-read-only-"))  # pytest's tmp_path is not open to others
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    out = folder / "results.json"
    out.write_text("old")
    out.chmod(0o444)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        os.chown(out, nobody.pw_uid, nobody.pw_gid)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                replace_file_atomically(str(out), lambda tmp: Path(tmp).write_text("new"))
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
    else:
        replace_file_atomically(str(out), lambda tmp: Path(tmp).write_text("new"))
    assert out.read_text() == "new" and (out.stat().st_mode & 0o777) == 0o444


def _data(manifest: dict, val_rows: dict[str, int]):
    """What check_against_data reads of an open MFTData."""
    return SimpleNamespace(task_names=list(val_rows), vocab_size=2048, manifest=manifest,
                           val_rows=lambda name: val_rows[name])


def test_data_checks_validation_rows_and_settings_fixed_by_preprocessing(demo_data, tmp_path, capsys):
    from megatron_mft.training.preflight import PreflightError, check_against_data

    manifest = json.loads((demo_data / "manifest.json").read_text())
    offline = ["data.source=offline", f"data.path={demo_data}"]

    def problems(val_rows: dict, *overrides: str) -> list[str]:
        try:
            check_against_data(_cfg(*offline, *overrides), _data(manifest, val_rows))
        except PreflightError as e:
            return e.problems
        return []

    both = {"a": 3, "b": 2}
    assert problems(both) == [] and problems(both, "loss.balancer=coba") == []
    # a balancer weighs every task by its validation loss: each task needs validation rows
    [p] = problems({"a": 3, "b": 0}, "train.eval_interval=0", "loss.balancer=famo")
    assert p.startswith("loss.balancer: famo") and "task(s) b " in p and "--val-ratio" in p
    # validation and early stopping need some
    assert problems({"a": 3, "b": 0}, "train.early_stopping_patience=2") == []
    found = problems({"a": 0, "b": 0}, "train.eval_interval=5", "train.early_stopping_patience=2")
    assert [p.split(":")[0] for p in found] == ["train.eval_interval", "train.early_stopping_patience"]
    assert problems({"a": 0, "b": 0}, "train.eval_interval=0") == []

    # offline data fixed mode, packing, split and template: a changed data.mode that disagrees is
    # refused (the loss would not cover what the user believes); the others are only unused: warned
    assert manifest["mode"] == "sft" and manifest["packing"] == "best-fit"
    capsys.readouterr()
    found = problems(both, "data.mode=pretrain", "data.packing=none", "data.val_ratio=0.5", "data.template=llama3")
    assert [p.split(":")[0] for p in found] == ["data.mode"]
    assert "preprocessed with mode 'sft'" in found[0] and str(demo_data) in found[0]
    warned = capsys.readouterr().out
    assert all(f"warning: data.{k} " in warned for k in ("packing", "val_ratio", "template")), warned
    agree = (f"data.val_ratio={manifest['val_ratio']}", "data.packing=best-fit")
    template = tmp_path / "mine.json"  # the data's template as a .json file of its own
    template.write_text(json.dumps(manifest["template"]))
    assert problems(both, *agree, f"data.template={template}") == [] and "warning" not in capsys.readouterr().out
    # the data's own tokenizer (the same file anywhere, or a folder holding it) is fine; another
    # file or a missing path is not
    copy = tmp_path / "tok.model"
    shutil.copy(TOKENIZER, copy)
    assert problems(both, f"data.tokenizer={copy}") == []
    (tmp_path / "spdir").mkdir()
    shutil.copy(TOKENIZER, tmp_path / "spdir" / "tokenizer.model")
    assert problems(both, f"data.tokenizer={tmp_path / 'spdir'}") == []
    copy.write_bytes(copy.read_bytes()[:-1] + b"x")
    [p] = problems(both, f"data.tokenizer={copy}")
    assert p.startswith("data.tokenizer") and "not the tokenizer" in p
    [p] = problems(both, f"data.tokenizer={tmp_path}/nope.model")
    assert "does not exist" in p


def test_settings_that_would_be_ignored_or_crash_later_are_named_at_load():
    """Preference settings in an SFT run (unused silently before) and model sizes that ended in a
    ZeroDivisionError are refused; adapter settings with peft.method none (a LoRA recipe run as full
    fine-tuning on purpose, or a forgotten method) and epochs beside steps (a recipe's epochs with
    an EXTRA_ARGS train.steps) are warned."""
    from megatron_mft.config.base import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg("loss.preference.beta=7", "loss.preference.lambda=0.5", "model.num_query_groups=0",
             "model.norm_epsilon=0", "peft.method=lora", "peft.target_modules=[bogus]")
    found = {p.split(":")[0]: p for p in e.value.problems}
    assert set(found) == {"loss.preference.beta", "loss.preference.lambda", "model.num_query_groups",
                          "model.norm_epsilon", "peft.target_modules"}
    assert "train.stage is sft" in found["loss.preference.beta"]
    warned = _cfg("peft.rank=64", "peft.alpha=128", "train.epochs=5").warnings()
    assert len(warned) == 2 and "peft.rank, peft.alpha set, but peft.method is none" in warned[0]
    assert "train.epochs 5 is not used: train.steps 60" in warned[1]
    assert _cfg("peft.method=lora", "peft.rank=64").warnings() == []
    assert _cfg("train.steps=0", "train.epochs=5").warnings() == []
    _cfg("train.stage=dpo", "loss.preference.beta=7", "data.mode=preference")  # tiny_cpu.yaml: online data


def test_preference_settings_of_another_stage_and_online_data_of_another_mode_are_refused_at_load():
    """ORPO reads neither beta nor rpo_alpha (it trained exactly as with the defaults), DPO not lambda:
    refused as preference settings in an SFT run are; online pairs for dpo/orpo without
    data.mode=preference gave 50 per-line unknown_format errors, now one message."""
    from megatron_mft.config.base import ConfigError

    online = ["data.source=online", "data.tokenizer=tok.model"]  # as CONFIG
    with pytest.raises(ConfigError) as e:
        _cfg("train.stage=orpo", "loss.preference.beta=0.5", "loss.preference.rpo_alpha=1",
             "loss.preference.lambda=0.5", *online)
    found = {p.split(":")[0]: p for p in e.value.problems}
    assert set(found) == {"loss.preference.beta", "loss.preference.rpo_alpha", "train.stage orpo"}, found
    assert "train.stage is orpo" in found["loss.preference.beta"] and "loss.preference.lambda" in found[
        "loss.preference.beta"]
    assert "set data.mode=preference" in found["train.stage orpo"]
    with pytest.raises(ConfigError) as e:
        _cfg("train.stage=dpo", "loss.preference.lambda=0.5", "data.mode=preference")
    [p] = e.value.problems
    assert p.startswith("loss.preference.lambda: set, but train.stage is dpo (lambda is read by train.stage orpo")
    with pytest.raises(ConfigError, match="train.stage sft: data.mode preference"):
        _cfg(*online, "data.mode=preference")
    _cfg("train.stage=orpo", "loss.preference.lambda=0.5", *online, "data.mode=preference")
    _cfg("train.stage=dpo", "loss.preference.beta=0.5", "loss.preference.rpo_alpha=1", "data.mode=preference")


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """A run resumed at step 2 writes a new events file; its purge marker (TensorBoard's own) hides
    the earlier file's steps 3-4, so the curves show the resumed run's values once (they showed both)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_mft.training.metrics import MetricsLog

    first = MetricsLog(tmp_path, enabled=True, tensorboard=True, first_step=1)
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": 10.0 + step})
    first.close()
    resumed = MetricsLog(tmp_path, enabled=True, tensorboard=True, first_step=3)
    for step in (3, 4):
        resumed.write({"step": step, "loss": 20.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
