"""Every command answers bad input with one message naming the key, file or path, exit 2 (usage or
config) or 1 (run time), and no Python traceback unless --debug / MFT_DEBUG=1 (megatron_mft.errors).

The commands run as a new user types them (the tiny config, the demo data); each case fails before
a model is built, so each costs an interpreter start and the imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import CONFIG, ROOT, env, train_command

PY = sys.executable


def _run(args: list[str], extra_env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = env(threads=1)
    e.pop("MFT_DEBUG", None)
    e.update(extra_env or {})
    return subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def _train(*overrides: str) -> list[str]:
    return [PY, "-m", "megatron_mft.train", "--config", str(CONFIG), *overrides]


def _files(tmp: Path) -> dict[str, Path]:
    """Inputs a new user gets wrong: a GPT-2 folder as hf_init, a file where a folder belongs, a
    non-UTF-8 metrics file, a malformed config.json."""
    gpt2 = tmp / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe{"step": 2}\n')
    bad_json = tmp / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text('{"model_type": "llama",\n  oops\n}\n')
    return {"gpt2": gpt2, "a_file": tmp / "a_file", "metrics": tmp / "metrics.jsonl", "bad_json": bad_json}


# (id, command line with {tmp}/{gpt2}/... fields, exit code, words the message must contain)
CASES = [
    ("train-missing-data", _train("data.path={tmp}/no_such_data", "output_dir={tmp}/run"), 2,
     ["data.path", "no_such_data", "does not exist"]),
    ("train-raw-data-as-offline", _train("data.source=offline", "output_dir={tmp}/run"), 2,
     ["data.path", "manifest.json", "data.source=online"]),
    ("train-missing-tokenizer", _train("data.tokenizer={tmp}/nope.model", "output_dir={tmp}/run"), 2,
     ["data.tokenizer", "nope.model"]),
    ("train-unwritable-output", _train("output_dir={a_file}/run"), 2, ["output_dir", "a_file"]),
    ("train-tp2-one-process", _train("parallel.tp=2", "output_dir={tmp}/run"), 2,
     ["parallel.tp", "torchrun --nproc_per_node 2"]),
    ("train-missing-init-checkpoint", _train("train.init_checkpoint={tmp}/no_ckpt", "output_dir={tmp}/run"), 2,
     ["train.init_checkpoint", "no_ckpt"]),
    ("train-non-llama-hf-init", _train("model.hf_init={gpt2}", "output_dir={tmp}/run"), 2,
     ["model.hf_init", "'gpt2'", "GPT2LMHeadModel", "llama"]),
    ("train-nan-config", _train("loss.gamma=.nan", "train.min_lr=.nan"), 2,
     ["loss.gamma: must be a finite number", "train.min_lr: must be a finite number"]),
    ("checkpoint-init-config", [PY, "-m", "megatron_mft.checkpoint", "init", "--config", str(CONFIG), "--out",
                                "{tmp}/init", "loss.gamma=.nan", "model.preset=nope"], 2,
     ["loss.gamma", "model.preset"]),
    ("convert-malformed-config-json", [PY, "-m", "megatron_mft.convert", "hf-to-mcore", "--hf-dir", "{bad_json}",
                                       "--out", "{tmp}/mcore"], 2, ["bad_json/config.json", "not valid JSON"]),
    ("convert-bad-shard-size", [PY, "-m", "megatron_mft.convert", "mcore-to-hf", "--ckpt", "{tmp}", "--out",
                                "{tmp}/hf_out", "--max-shard-size", "lots"], 2, ["--max-shard-size", "'lots'"]),
    ("plot-non-utf8", [PY, "-m", "megatron_mft.plot", "--metrics", "{metrics}", "--out", "{tmp}/loss.png"], 2,
     ["metrics.jsonl:2", "UTF-8"]),
    ("plot-out-is-a-folder", [PY, "-m", "megatron_mft.plot", "--metrics", "{metrics}", "--skip-invalid",
                              "--out", "{tmp}"], 2, ["--out", "is a directory"]),
    # the launch hint names the program that was started (it said -m megatron_mft.train for a bench)
    ("bench-tp2-one-process", [PY, "tools/bench/train_throughput.py", "--tp", "2"], 2,
     ["parallel.tp", "torchrun --nproc_per_node 2 tools/bench/train_throughput.py ..."]),
]


@pytest.mark.parametrize("argv, code, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_message(tmp_path, argv, code, needles):
    fields = {"tmp": tmp_path, **_files(tmp_path)}
    p = _run([a.format(**fields) for a in argv])
    assert p.returncode == code, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    err = p.stderr.replace(str(tmp_path) + "/", "")
    for needle in needles:
        assert needle in err, (needle, p.stderr[-3000:])


def test_problems_found_with_the_data_come_before_the_model(tmp_path):
    """Task weights naming an unknown task and a vocabulary larger than the model's were found only
    after the model was built (tracebacks): both now come at once, before it."""
    p = _run(_train("loss.task_weights.nope=2", "model.vocab_size=1000", f"output_dir={tmp_path}/run"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "loss.task_weights: unknown task name(s) 'nope'" in p.stderr and "docstring" in p.stderr
    assert "model.vocab_size" in p.stderr and "2048" in p.stderr
    assert "parameters:" not in p.stdout  # printed once the model exists


def test_evaluate_refuses_truncated_weights_by_name(tmp_path):
    from test_eval_humaneval import _tiny_llama

    hf = tmp_path / "hf"
    _tiny_llama(hf)
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    p = _run([PY, "-m", "megatron_mft.evaluate", "humaneval", "--hf-dir", str(hf), "--limit", "1",
              "--max-new-tokens", "2", "--backend", "transformers", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert str(weights) in p.stderr and "truncated" in p.stderr


@pytest.mark.parametrize("how", ["env", "flag", "abbreviated"])  # argparse takes --deb for --debug
def test_debug_shows_the_traceback(tmp_path, how):
    argv = _train(f"data.path={tmp_path}/no_such_data", f"output_dir={tmp_path}/run")
    p = _run(argv + {"flag": ["--debug"], "abbreviated": ["--deb"]}.get(how, []),
             extra_env={"MFT_DEBUG": "1"} if how == "env" else None)
    assert p.returncode == 2
    assert "Traceback (most recent call last)" in p.stderr and "PreflightError" in p.stderr
    assert p.stderr.rstrip().endswith("no_such_data does not exist")  # the message still comes last


@pytest.mark.slow
def test_torchrun_reports_a_config_error_once_and_every_rank_fails(tmp_path):
    p = _run(train_command([f"data.path={tmp_path}/no_such_data", f"output_dir={tmp_path}/run"], nproc=2),
             timeout=600)
    assert p.returncode != 0
    assert p.stderr.count("no_such_data does not exist") == 1, p.stderr[-4000:]
    assert "exitcode  : 2" in p.stderr  # torchrun's summary: the ranks exited with the usage code


@pytest.mark.parametrize("launcher", [
    {"RANK": "{r}", "LOCAL_RANK": "{r}", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},  # torchrun
    {"SLURM_PROCID": "{r}", "SLURM_LOCALID": "{r}", "SLURM_NTASKS": "2"},  # srun
], ids=["torchrun", "srun"])
def test_an_argument_error_is_printed_by_the_first_rank_only(launcher):
    """Every rank parses the same command line: argparse's message once (rank 0), exit 2 on every
    rank. The ranks are started with the launcher's variables (the parse comes before torch loads,
    so a real torchrun would add only its own start-up)."""
    for command in ([PY, "-m", "megatron_mft.train", "--no-such-option"],  # no --config either
                    [PY, "-m", "megatron_mft.convert", "no-such-command"],
                    [PY, "-m", "megatron_mft.checkpoint", "init", "--out", "x"]):
        procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**env(1), **{k: v.format(r=r) for k, v in launcher.items()}})
                 for r in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        assert [code for code, _ in results] == [2, 2], (command, results)
        rank0, rank1 = results[0][1], results[1][1]
        assert rank0.count("error:") == 1 and rank0.startswith("usage: "), (command, rank0)
        assert rank1 == "", (command, rank1)


# ------------------------------------------------------------------ the wrapper itself (in process)
def test_internal_errors_are_one_paragraph_with_a_hint(capsys, monkeypatch):
    from megatron_mft.errors import UsageError, UserError, command

    monkeypatch.delenv("MFT_DEBUG", raising=False)

    @command
    def broken(argv):
        return {}["missing"]

    assert broken([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: KeyError: 'missing'") and "--debug" in err and "Traceback" not in err
    assert err.count("\n") == 1

    @command
    def refused(argv):
        raise UserError("disk /x: no space left on device")

    assert refused([]) == 1 and capsys.readouterr().err == "error: disk /x: no space left on device\n"

    # under torchrun: a usage error is printed by rank 0 only, a runtime error by each rank, prefixed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    @command
    def usage(argv):
        raise UsageError("data.path: /x does not exist")

    from megatron_mft import errors

    waits = []
    monkeypatch.setattr(errors.time, "sleep", waits.append)
    assert usage([]) == 2 and capsys.readouterr().err == ""
    # and before it exits it leaves the first rank time to print: torchrun stops every rank once one
    # exits, and the message was lost when that came first (seen under load)
    assert waits == [errors.SILENT_RANK_GRACE_S]
    # the first rank of another node prints it too: a missing mount is a per-node fact
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert usage([]) == 2 and capsys.readouterr().err == "[rank 2] error: data.path: /x does not exist\n"
    assert waits == [errors.SILENT_RANK_GRACE_S]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert refused([]) == 1 and capsys.readouterr().err == "[rank 1] error: disk /x: no space left on device\n"

    @command
    def flagged(argv):
        assert argv == ["a"]
        raise RuntimeError("boom")

    assert flagged(["--debug", "a"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "[rank 1] internal error: RuntimeError: boom" in err


def test_the_cause_behind_a_multi_rank_checkpoint_exception(capsys, monkeypatch):
    """torch.distributed.checkpoint raises a BaseException whose text pastes every rank's traceback."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from megatron_mft.errors import report

    monkeypatch.delenv("MFT_DEBUG", raising=False)
    try:
        raise EOFError("shard ended early")
    except EOFError as e:
        wrapped = CheckpointException("load failed", {0: _wrap_exception(e)})
    assert report(wrapped) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: EOFError: shard ended early.") and "Traceback" not in err


def test_the_error_module_sits_below_every_layer():
    tree = ast.parse((ROOT / "megatron_mft" / "errors.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m.startswith("megatron_mft")]


def test_preflight_reads_hf_init_headers_before_the_model(tmp_path):
    """A model.hf_init folder cut short (or of another size) was found only while the built model was
    being filled; the preflight reads config.json and the safetensors headers (no tensor data)."""
    import dataclasses

    from test_hf_fixtures import make_hf_model

    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.config import load_config
    from megatron_mft.training.preflight import PreflightError, check_run

    hf = make_hf_model(tmp_path / "hf")
    model = model_config_from_hf(read_hf_config(hf))
    fields = {k: v for k, v in dataclasses.asdict(model).items() if v is not None and k != "preset"}
    run = load_config(CONFIG, [f"output_dir={tmp_path}/run", f"model.hf_init={hf}", f"model.preset={model.preset}"]
                      + [f"model.{k}={v}" for k, v in fields.items()])
    check_run(run, world_size=1)  # the matching folder passes
    with pytest.raises(PreflightError, match=r"model\.hf_init: the model config does not match"):
        check_run(dataclasses.replace(run, model=dataclasses.replace(run.model, hidden_size=128)), world_size=1)
    shard = sorted(hf.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(PreflightError, match=rf"model\.hf_init: damaged safetensors file {shard}:\n.*truncated"):
        check_run(run, world_size=1)


def test_preflight_refuses_full_ft_dpo_over_an_unwritable_data_folder(tmp_path, monkeypatch):
    """The reference log-probs are stored beside the data; found before the model and the pre-pass."""
    import tempfile

    from megatron_mft.config import load_config
    from megatron_mft.training.preflight import _reference_store_problems

    data = tmp_path / "pairs"
    data.mkdir()
    run = load_config(None, [f"data.path={data}", "train.stage=dpo", "data.mode=preference"])
    assert _reference_store_problems(run) == []

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    problems = _reference_store_problems(run)
    assert len(problems) == 1 and str(data) in problems[0] and "not writable" in problems[0]
    lora = load_config(None, [f"data.path={data}", "train.stage=dpo", "data.mode=preference", "peft.method=lora"])
    assert _reference_store_problems(lora) == []  # adapters disabled are the reference: nothing stored


@pytest.mark.parametrize("module, argv", [("megatron_mft.train", ["--help"]), ("megatron_mft.convert", ["--help"]),
                                          ("megatron_mft.convert", ["mcore-to-hf", "--help"]),
                                          ("megatron_mft.evaluate.__main__", ["humaneval", "--help"]),
                                          ("megatron_mft.checkpoint.__main__", ["init", "--help"]),
                                          ("megatron_mft.plot", ["--help"])])
def test_every_commands_help_lists_the_debug_switch(capsys, module, argv):
    """``--debug`` was only named in the epilog's prose, never among a command's options."""
    import importlib
    import signal

    before = signal.getsignal(signal.SIGUSR1)  # the trainer's main catches it first thing
    with pytest.raises(SystemExit) as e:
        try:
            importlib.import_module(module).main(argv)
        finally:
            signal.signal(signal.SIGUSR1, before)
    assert e.value.code == 0
    assert "  --debug  " in capsys.readouterr().out.replace("--debug   ", "--debug  ")
