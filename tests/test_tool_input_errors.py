"""Bad input to the tools around training (convert, evaluate, plot): one message naming the option
or path, exit 2, no traceback, found before any model loads; and the export of a run trained on
the demo data carries the run's own SentencePiece tokenizer, which transformers loads and which
encodes like SentencePiece itself. (run_scripts' DRY_RUN path check: tests/test_launch_scripts.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import CONFIG, ROOT, env

PY = sys.executable
DEMO_SP = ROOT / "examples" / "demo_data" / "tokenizer" / "demo_sp2048.model"


def _run(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    e = env(threads=1)
    e.pop("MFT_DEBUG", None)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer, saved like an export."""
    from test_eval_humaneval import _tiny_llama

    hf = tmp_path_factory.mktemp("hf") / "tiny"
    _tiny_llama(hf)
    return hf


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One step of examples/tiny_cpu.yaml on a slice of the demo data, started the way the example
    is: from a working folder holding examples/ (a link to the repository's), so its output_dir and
    data.tokenizer (examples/demo_data/tokenizer/demo_sp2048.model) are relative to that folder.
    Returns the output_dir."""
    work = tmp_path_factory.mktemp("work")
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "raw" / "code").mkdir(parents=True)
    lines = (ROOT / "examples" / "demo_data" / "raw" / "code-completion" / "train.jsonl").read_text().splitlines()
    (work / "raw" / "code" / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    p = _run([PY, "-m", "megatron_mft.train", "--config", str(CONFIG), "data.path=raw", "output_dir=run",
              "train.steps=1", "train.global_batch_size=1", "data.seq_length=256", "train.eval_interval=0",
              "train.save_interval=0", "train.warmup_steps=0"], cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((work / "run" / "checkpoints" / "step_0000001" / "run.json").read_text())["config"]["data"][
        "tokenizer"] == "examples/demo_data/tokenizer/demo_sp2048.model"
    return work / "run"


def _metrics(tmp: Path) -> dict[str, Path]:
    big = "1" + "0" * 400  # valid JSON, beyond float range
    (tmp / "big_value.jsonl").write_text(f'{{"step": 1, "loss": {big}}}\n{{"step": 2, "loss": 2.5}}\n')
    (tmp / "big_step.jsonl").write_text(f'{{"step": 1, "loss": 2.0}}\n{{"step": {big}, "loss": 2.5}}\n')
    return {"big_value": tmp / "big_value.jsonl", "big_step": tmp / "big_step.jsonl"}


CONVERT = [PY, "-m", "megatron_mft.convert"]
EVAL = [PY, "-m", "megatron_mft.evaluate", "humaneval", "--limit", "1", "--max-new-tokens", "2",
        "--backend", "transformers"]
STEP = "{run}/checkpoints/step_0000001"

# (id, command line with {tmp}/{hf}/{run}/... fields, exit code, words the output must contain,
#  a path that must not exist afterwards). Each case failed before its fix: an internal error
#  (exit 1, traceback hint), a misleading message, or a success that should have been refused.
CASES = [
    # argparse-level integer ranges (verify: TCPStore / reshape errors before)
    ("verify-tp-0", CONVERT + ["verify", "--hf-dir", "{hf}", "--tp", "0"], 2, ["--tp: must be >= 1, got 0"], None),
    ("verify-batch-0", CONVERT + ["verify", "--hf-dir", "{hf}", "--batch", "0"], 2, ["--batch: must be >= 1"], None),
    ("verify-seq-0", CONVERT + ["verify", "--hf-dir", "{hf}", "--seq", "0"], 2, ["--seq: must be >= 1"], None),
    ("verify-negative-tol", CONVERT + ["verify", "--hf-dir", "{hf}", "--tol", "-1"], 2, ["--tol: must be >= 0"], None),
    ("export-missing-ckpt", CONVERT + ["mcore-to-hf", "--ckpt", "{tmp}/no_such_run", "--out", "{tmp}/o"], 2,
     ["--ckpt {tmp}/no_such_run does not exist"], "{tmp}/o"),
    ("export-ckpt-is-a-file", CONVERT + ["mcore-to-hf", "--ckpt", STEP + "/run.json", "--out", "{tmp}/o"], 2,
     ["--ckpt " + STEP + "/run.json is a file, not a checkpoint folder"], "{tmp}/o"),
    ("export-unknown-family", CONVERT + ["mcore-to-hf", "--ckpt", STEP, "--out", "{tmp}/o", "--family", "gpt5"], 2,
     ["--family 'gpt5': not a known model family; known: llama, qwen2"], "{tmp}/o"),
    ("export-shard-size-0", CONVERT + ["mcore-to-hf", "--ckpt", "{run}", "--out", "{tmp}/o", "--max-shard-size", "0"],
     2, ["--max-shard-size: must be at least 1 byte"], None),
    ("evaluate-memory-beyond-setrlimit", EVAL + ["--hf-dir", "{hf}", "--memory-mb", str(2**60), "--out",
                                                 "{tmp}/r.json"], 2, ["--memory-mb: must be <="], None),
    # evaluate: checked before the model loads
    ("evaluate-no-tokenizer", EVAL + ["--hf-dir", "{notok}", "--out", "{tmp}/r.json"], 2,
     ["--hf-dir {notok} has no tokenizer files", "tokenizer.model", "--tokenizer"], "{tmp}/r.json"),
    ("evaluate-out-is-a-folder", EVAL + ["--hf-dir", "{hf}", "--device", "cpu", "--out", "{tmp}"], 2,
     ["--out {tmp} is a directory"], None),
    ("evaluate-out-under-a-file", EVAL + ["--hf-dir", "{hf}", "--device", "cpu", "--out", "{hf}/config.json/r.json"],
     2, ["--out {hf}/config.json/r.json: {hf}/config.json is not a directory"], None),
    ("evaluate-device-gpu", EVAL + ["--hf-dir", "{hf}", "--device", "gpu", "--out", "{tmp}/r.json"], 2,
     ["--device 'gpu': not a torch device"], "{tmp}/r.json"),
    # plot: a number beyond float range is a value like inf (skipped), a step beyond it a bad line
    ("plot-huge-value", [PY, "-m", "megatron_mft.plot", "--metrics", "{big_value}", "--out", "{tmp}/loss.png"], 0,
     ["wrote {tmp}/loss.png"], None),
    # plot: a missing metrics file named by its flag (was the bare errno text); a skipped line a one-line warning
    # (was Python's "plot.py:213: UserWarning: ..." with the source line under it)
    ("plot-missing-metrics", [PY, "-m", "megatron_mft.plot", "--metrics", "{tmp}/nope.jsonl", "--out",
                              "{tmp}/loss.png"], 2, ["--metrics {tmp}/nope.jsonl: no such file"], "{tmp}/loss.png"),
    ("plot-metrics-is-a-folder", [PY, "-m", "megatron_mft.plot", "--metrics", "{tmp}", "--out", "{tmp}/loss.png"],
     2, ["--metrics {tmp}: is a folder"], "{tmp}/loss.png"),
    ("plot-skip-invalid", [PY, "-m", "megatron_mft.plot", "--metrics", "{big_step}", "--out", "{tmp}/loss.png",
                           "--skip-invalid"], 0,
     ["warning: {big_step}:2: invalid metrics line: 'step' out of range", "wrote {tmp}/loss.png"], None),
    ("plot-huge-step", [PY, "-m", "megatron_mft.plot", "--metrics", "{big_step}", "--out", "{tmp}/loss.png"], 2,
     ["big_step.jsonl:2: invalid metrics line: 'step' out of range"], "{tmp}/loss.png"),
    # convert: an --out inside (or around) what is being read
    ("export-into-its-step-folder", CONVERT + ["mcore-to-hf", "--ckpt", STEP, "--out", STEP + "/hf_export"], 2,
     ["--out " + STEP + "/hf_export is inside " + STEP + ", the checkpoint being read", "saves that step again"],
     STEP + "/hf_export"),
    ("export-into-the-checkpoints-folder", CONVERT + ["mcore-to-hf", "--ckpt", "{run}", "--out",
                                                      "{run}/checkpoints/hf"], 2,
     ["is inside {run}/checkpoints, the checkpoints folder of the run being read (--ckpt {run})"],
     "{run}/checkpoints/hf"),
    ("export-around-its-checkpoint", CONVERT + ["mcore-to-hf", "--ckpt", STEP, "--out", "{run}/checkpoints"], 2,
     ["--out {run}/checkpoints contains " + STEP], None),
    ("import-into-the-hf-folder", CONVERT + ["hf-to-mcore", "--hf-dir", "{hf}", "--out", "{hf}/mcore"], 2,
     ["--out {hf}/mcore is inside {hf}, the --hf-dir being read"], "{hf}/mcore"),
    ("import-around-the-hf-folder", CONVERT + ["hf-to-mcore", "--hf-dir", "{hf}", "--out", "{hf}/.."], 2,
     ["contains {hf}, the --hf-dir being read"], None),
]


@pytest.mark.parametrize("argv, code, needles, absent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_early_message(tmp_path, hf_model, tiny_run, argv, code, needles, absent):
    notok = tmp_path / "notok"  # an export without tokenizer files
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_model / name, notok / name)
    fields = {"tmp": tmp_path, "hf": hf_model, "notok": notok, "run": tiny_run, **_metrics(tmp_path)}
    p = _run([a.format(**fields) for a in argv])
    out = p.stdout + p.stderr
    assert p.returncode == code, (p.returncode, out[-3000:])
    assert "Traceback" not in out and "internal error" not in out, out[-3000:]
    for needle in needles:
        assert needle.format(**fields) in out, (needle.format(**fields), out[-3000:])
    if absent:
        assert not Path(absent.format(**fields)).exists()
    if "megatron_mft.plot" in argv:
        assert "UserWarning" not in out, out[-3000:]
    if "Loading weights" in out or "generating" in out:
        pytest.fail("the model was loaded before the problem was reported")


# ----------------------------------------------------------------------------------------- export
#: encoded alike by SentencePiece and the exported tokenizer: code with indentation, leading and
#: repeated whitespace, digits (split_digits), non-ASCII (byte fallback), the role markers
TEXTS = ["def add(a, b):\n    return a + b\n", "    if x > 10:\n\t\treturn [1, 22, 333]\n",
         "  leading spaces and  double  spaces ", "héllo wörld 日本語 🙂 ß",
         "<|role_start|>human<|role_end|>Write a function.<|role_start|>bot<|role_end|>"]


def test_export_carries_the_runs_sentencepiece_tokenizer(tp1_env, tiny_run, tmp_path, monkeypatch):
    """The run's data.tokenizer is a SentencePiece file named relative to its working folder; the
    export, run from elsewhere, writes it as tokenizer.model with a tokenizer_config.json:
    AutoTokenizer gives SentencePiece's ids, and evaluate runs on the folder."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf
    from megatron_mft.data.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)  # not the run's working folder
    out = tmp_path / "hf"
    logs: list[str] = []
    export_to_hf(tiny_run, out, log=logs.append)
    assert (out / "tokenizer.model").read_bytes() == DEMO_SP.read_bytes(), logs
    assert not any("warning" in line for line in logs), logs
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_SP))
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    manifest = json.loads((tiny_run / "checkpoints" / "step_0000001" / "run.json").read_text())["manifest"]
    assert load_tokenizer(str(out)).identity()["sha256"] == manifest["tokenizer"]["sha256"]  # evaluate's encoding

    p = _run([PY, "-m", "megatron_mft.evaluate", "humaneval", "--hf-dir", str(out), "--limit", "1",
              "--max-new-tokens", "2", "--backend", "transformers", "--device", "cpu", "--out",
              str(tmp_path / "r.json"), "-q"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["n"] == 1


def test_export_without_the_runs_tokenizer_says_so_and_takes_a_file(tp1_env, tiny_run, tmp_path, monkeypatch):
    """A run moved away from its working folder: its relative data.tokenizer is not found. The
    export still succeeds but says it has no tokenizer and what evaluate will need; --tokenizer
    takes the SentencePiece file itself."""
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf

    moved = tmp_path / "moved" / "run"
    shutil.copytree(tiny_run, moved)
    monkeypatch.chdir(tmp_path)
    logs: list[str] = []
    export_to_hf(moved, tmp_path / "bare", log=logs.append)
    text = "\n".join(logs)
    assert "(data.tokenizer examples/demo_data/tokenizer/demo_sp2048.model) was not found" in text, text
    assert f"warning: the export {tmp_path / 'bare'} has no tokenizer" in text and "evaluate" in text, text
    assert "--tokenizer FILE|DIR" in text
    assert not list((tmp_path / "bare").glob("tokenizer*"))

    export_to_hf(moved, tmp_path / "given", tokenizer=str(DEMO_SP), log=logs.append)
    assert (tmp_path / "given" / "tokenizer.model").read_bytes() == DEMO_SP.read_bytes()
    assert json.loads((tmp_path / "given" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


# --------------------------------------------------------------------------------------- evaluate
def test_evaluate_writes_its_results_whole_or_not_at_all(tmp_path):
    """The result JSON goes through a temporary file that never takes a name a user's file may
    have, and is removed when the final rename fails (an --out that became a folder meanwhile)."""
    from megatron_mft.errors import UserError
    from megatron_mft.evaluate.humaneval import HumanEvalConfig, run_humaneval

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                                    "test": "def check(g):\n    assert g() == 1\n", "entry_point": "f"}) + "\n")
    mine = tmp_path / "r.json.tmp"
    mine.write_text("a user's file\n")
    run_humaneval(HumanEvalConfig(check_harness=True, problems=str(problems), out=str(tmp_path / "r.json"), workers=1))
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["pass@1"] == 1.0
    assert mine.read_text() == "a user's file\n"

    taken = tmp_path / "taken"
    taken.mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError) as e:
        run_humaneval(HumanEvalConfig(check_harness=True, problems=str(problems), out=str(taken), workers=1))
    assert f"--out {taken}: cannot write the results" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before and not any(taken.iterdir())


def test_evaluate_and_plot_replace_only_their_own_result_files(tmp_path, capsys):
    """An --out naming a file of the user's (a model's config.json, the metrics being plotted, a
    picture) is refused before any work and left as it was; the command's own earlier result is
    replaced, and so is a result file of an older version (no mark). The commands' mains in this
    process (their command-line parsing and error reporting included)."""
    from megatron_mft import plot as plot_cli
    from megatron_mft.evaluate import __main__ as evaluate_cli

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                                    "test": "def check(g):\n    assert g() == 1\n", "entry_point": "f"}) + "\n")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')

    def evaluate(out: Path) -> int:
        return evaluate_cli.main(["humaneval", "--check-harness", "--problems", str(problems), "--workers", "1",
                                  "--out", str(out)])

    def plot(out: Path) -> int:
        return plot_cli.main(["--metrics", str(metrics), "--out", str(out)])

    users = {"config.json": '{"model_type": "llama"}\n', "notes.json": '{"summary": {}, "results": []}\n',
             "photo.png": "not a plot\n", "loss.jpg": "a jpeg\n"}
    for name, text in users.items():
        (tmp_path / name).write_text(text)
    for cmd, name in [(evaluate, "config.json"), (evaluate, "notes.json"), (plot, "photo.png"), (plot, "loss.jpg"),
                      (plot, "metrics.jsonl")]:
        out = tmp_path / name
        code, err = cmd(out), capsys.readouterr().err
        assert code == 2 and f"--out {out} exists and is not " in err, (name, err[-2000:])
        assert "Traceback" not in err
    assert {n: (tmp_path / n).read_text() for n in users} == users
    assert metrics.read_text().count("\n") == 2

    for cmd, name in [(evaluate, "r.json"), (plot, "loss.png"), (plot, "loss.pdf"), (plot, "loss.svg")]:
        out = tmp_path / name
        for _ in range(2):  # written, then replaced: its own
            assert cmd(out) == 0, (name, capsys.readouterr().err[-2000:])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["written_by"] == "megatron_mft.evaluate humaneval"
    del report["summary"]["written_by"]  # as an older version wrote it
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert evaluate(tmp_path / "r.json") == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_export_finds_a_runs_relative_base_from_another_folder(tiny_run, hf_model, tmp_path, monkeypatch):
    """An adapter run started in its working folder with a relative ``model.hf_init`` (or
    ``train.init_checkpoint``) and a relative output_dir: the export, run from elsewhere, finds the
    base in that working folder (as it finds the run's tokenizer), not beside the caller."""
    from megatron_mft.checkpoint.hf.mcore_to_hf import describe_checkpoint

    work = tmp_path / "work"
    shutil.copytree(hf_model, work / "models" / "base")
    (work / "ckpts" / "base").mkdir(parents=True)
    hf_config = json.loads((hf_model / "config.json").read_text())
    run = json.loads((tiny_run / "checkpoints" / "step_0000001" / "run.json").read_text())
    (work / "ckpts" / "base" / "conversion.json").write_text(json.dumps(
        {"model": run["config"]["model"], "hf_config": hf_config}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for key, value, base in [("hf_init", "models/base", ("hf", work / "models" / "base")),
                             ("init_checkpoint", "ckpts/base", ("mcore", work / "ckpts" / "base"))]:
        cfg = json.loads(json.dumps(run["config"]))
        cfg.update(output_dir="runs/a", peft={**cfg["peft"], "method": "lora"})
        cfg["model"]["hf_init"] = value if key == "hf_init" else None
        cfg["train"]["init_checkpoint"] = value if key == "init_checkpoint" else None
        step = work / "runs" / "a" / "checkpoints" / f"step_{key}"
        step.mkdir(parents=True)
        (step / "run.json").write_text(json.dumps({**run, "config": cfg, "peft": "lora"}))
        info = describe_checkpoint(step)
        assert info.base == base, key
        assert info.hf_config == hf_config, key


@pytest.mark.parametrize("argv, needle", [
    (["step_flops.py", "--config", "examples/codellama34b_lora.yaml", "--gpus", "8", "--mfu", "40"],
     "--mfu: a fraction in (0, 1]"),
    (["step_flops.py", "--config", "examples/codellama34b_lora.yaml", "--mfu", "0.4"], "--gpus and --mfu go together"),
    (["step_flops.py", "--config", "/nope.yaml"], "config file /nope.yaml does not exist"),
    (["train_throughput.py", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["cp_memory.py", "--heads", "0"], "--heads: must be >= 1, got 0"),
    # shapes and layouts training would refuse: the training config's rules in the options' names (each was
    # "internal error: ..." from inside torch or the spawned ranks, or an argparse-free ValueError)
    (["cp_memory.py", "--heads", "3", "--groups", "2"],
     "cp_memory.py: invalid options:\n  - --hidden: 1024 not divisible by --heads 3\n  - --groups: 2 does not divide "
     "--heads 3\n"),
    # CP is fixed at 2 there, not an option: the message names --seq (was "cp: --seq 66 ... 2 x cp = 4"); neither
    # bench applies RoPE, so an odd head size (1000 / 8 = 125, --dim 3) is no problem of theirs (it hid the --seq one)
    (["cp_memory.py", "--seq", "66", "--hidden", "1000", "--heads", "8"],
     "cp_memory.py: invalid options:\n  - --seq: 66 not divisible by 4 (the CP=2 run splits each sequence into "
     "2 x CP = 4 chunks)\n"),
    (["packed_attention.py", "--heads", "4", "--groups", "8", "--dim", "3"],
     "packed_attention.py: invalid options:\n  - --groups: 8 does not divide --heads 4\n"),
    (["train_throughput.py", "--sp"], "  - --sp: sequence parallelism needs --tp >= 2\n"),
    (["train_throughput.py", "--layers", "3", "--pp", "2"], "  - --pp: --layers 3 not divisible by --pp*vpp = 2\n"),
    (["train_throughput.py", "--seq", "64", "--docs-per-row", "9"],
     "--docs-per-row 9: a row of --seq 64 tokens holds at most 4 (each at least 16 tokens)"),
    (["train_throughput.py", "--compare-hf", "--threads", "1,0"], "argument --threads: must be >= 1, got 0 in '1,0'"),
    (["train_throughput.py", "--compare-hf", "--peft-modes", "lora,full"],
     "argument --peft-modes: unknown 'full' in 'lora,full'; choose from none, lora"),
    # the HF loop has no QLoRA: engine QLoRA would be compared with an HF full fine-tune
    (["train_throughput.py", "--compare-hf", "--peft-modes", "none,qlora"],
     "argument --peft-modes: unknown 'qlora' in 'none,qlora'; choose from none, lora"),
    (["train_throughput.py", "--compare-hf", "--threads", "1,,2"], "argument --threads: empty item 2 in '1,,2'"),
    (["family_tokenizer_bench.py", "--families", "llama"],
     "argument --families: unknown 'llama' in 'llama'; choose from llama3, qwen2, starcoder2"),
    (["loss_bench.py", "--seq", "64"], "--seq 64: a row holds synthetic samples of 64 to 1024 tokens, so --seq must "
                                       "be at least 65"),
], ids=["mfu-percent", "mfu-without-gpus", "missing-config", "steps-0", "heads-0", "cp-heads-by-groups", "cp-seq-chunks",
        "packed-attention-shape", "throughput-sp-without-tp", "throughput-layers-by-pp", "throughput-docs-per-row",
        "throughput-threads", "throughput-peft-modes", "throughput-peft-modes-qlora", "throughput-threads-empty",
        "tokenizer-families", "loss-short-rows"])
def test_bench_tools_give_one_message(argv, needle):
    """The benchmark scripts named in docs/performance.md: a bad value is one message, exit 2, no
    traceback (was a ZeroDivisionError / ConfigError traceback, or a negative step time printed)."""
    p = _run([PY, str(ROOT / "tools" / "bench" / argv[0]), *argv[1:]])
    assert p.returncode == 2 and needle in p.stderr, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr and "odd" not in p.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--layout", "3,1,1"], "peft_memory.py --models codellama-34b --layout 3,1,1: invalid options:\n"
                            "  - --layout TP: 3 does not divide num_attention_heads 64\n"),
    (["--layout", "1,1"], "argument --layout: expected TP,PP,DP (3 integers), got '1,1'"),
    (["--layout", "1,0,1"], "argument --layout: must be >= 1, got 0 in '1,0,1'"),
    (["--models", "llama2-70b", "--layout", "1,3,1"], "  - --layout PP: num_layers 80 not divisible by --layout "
                                                     "PP*--vpp = 3\n"),
    (["--vpp", "2"], "  - --vpp: virtual stages need --layout PP >= 2\n"),
    (["--ep", "2"], "peft_memory.py: --ep 2: expert parallelism is for mixture-of-experts presets (mixtral-8x7b, "),
    (["--models", "mixtral-8x7b", "--ep", "3"], "  - --ep: 3 does not divide num_experts 8\n"),
    (["--models", "mixtral-8x7b", "--layout", "2,1,1", "--no-sp"],
     "  - --sp: megatron's MoE layers with --layout TP > 1 need --sp: true\n"),
    (["--cp", "3"], "  - --cp: --seq 4096 not divisible by 2 x --cp = 6\n"),
    # sequence parallelism the user did not pass is the default at TP > 1: named so (was "--sp: ...")
    (["--layout", "8,1,1", "--seq", "100"],
     "  - sequence parallelism (on at --layout TP > 1 unless --no-sp): --seq 100 not divisible by --layout TP 8\n"),
    (["--layout", "8,1,1", "--seq", "100", "--sp"], "  - --sp: --seq 100 not divisible by --layout TP 8\n"),
    (["--measure-load", "--measure-shape", "2,100,64"],
     "peft_memory.py --measure-shape: invalid options:\n  - HIDDEN: 100 not divisible by num_attention_heads 8\n"),
], ids=["tp-by-heads", "layout-two-numbers", "layout-zero", "pp-by-layers", "vpp-without-pp", "ep-dense", "ep-by-experts",
        "moe-tp-without-sp", "cp-seq-chunks", "sp-default-seq-by-tp", "sp-seq-by-tp", "measure-shape"])
def test_peft_memory_refuses_layouts_training_refuses(capsys, argv, needle):
    """peft_memory printed a table for layouts training refuses (64 heads over TP=3, 48 layers over
    PP=5, EP on a dense model...), or ended in "internal error: ValueError" (--layout 1,1); now the
    training config's rule in its options' names, before the table, exit 2 (in-process: no model)."""
    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from peft_memory import main

    from megatron_mft.errors import command

    try:
        code = command(main)(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and needle in err, (code, err)
    assert "Traceback" not in err and "model " not in out, out  # no table row, no header


def test_peft_memory_applies_ep_to_the_moe_presets_only():
    """--ep 2 over a dense and a MoE preset refused the whole table (EP on the dense model), though
    --ep is for MoE presets: the dense model gets its rows at EP 1, the MoE one at EP 2; the
    expert-parallel message names only what was set (was "(--ep=2, etp=None)")."""
    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from peft_memory import build_parser, estimates

    from megatron_mft.config.parallel import expert_layout_problems
    from megatron_mft.config.presets import PRESETS

    def rows(*argv):
        return [(name, est) for name, *_, est in estimates(build_parser().parse_args(["--layout", "1,1,1", *argv]))]

    both = rows("--models", "codellama-34b", "mixtral-8x7b", "--ep", "2")
    assert both == rows("--models", "codellama-34b") + rows("--models", "mixtral-8x7b", "--ep", "2")
    assert [name for name, _ in both] == ["codellama-34b"] * 2 + ["mixtral-8x7b"] * 2  # lora, qlora each
    assert both[2:] != rows("--models", "mixtral-8x7b")  # EP 2 did reach the MoE rows
    assert expert_layout_problems(PRESETS["codellama-34b"], 1, 2, None, "--ep") == [
        "--ep: expert parallelism (--ep=2) needs a mixture-of-experts model (num_experts > 0)"]
    assert expert_layout_problems(PRESETS["codellama-34b"], 1, 1, 2) == [
        "parallel.etp: expert parallelism (parallel.etp=2) needs a mixture-of-experts model (num_experts > 0)"]


def test_benches_without_rope_take_odd_head_sizes():
    """The training config's RoPE rule (even head size) refused packed_attention --dim 33 and
    cp_memory --hidden 1000 --heads 8, whose attention applies no RoPE: tool_config(rope=False)
    leaves that rule out (and only that one); training keeps it."""
    from megatron_mft.config import load_config, tool_config
    from megatron_mft.config.base import ConfigError
    from megatron_mft.errors import UsageError

    shape = {"model.hidden_size": 1000, "model.num_attention_heads": 8, "model.num_query_groups": 4}
    assert tool_config("b", shape, {}, rope=False).model.arch().head_dim == 125
    with pytest.raises(UsageError, match="the head size 125 is odd"):
        tool_config("b", shape, {})
    with pytest.raises(UsageError, match=r"invalid options:\n  - --heads: 3 does not divide num_attention_heads 8\n"
                                         r"  - extra\Z"):
        tool_config("b", {**shape, "model.num_query_groups": 3}, {"model.num_query_groups": "--heads"}, rope=False,
                    problems=["extra"])
    with pytest.raises(ConfigError, match="the head size 125 is odd"):
        load_config(None, ["data.path=/x", "model.hidden_size=1000", "model.num_attention_heads=8"])


def test_comma_list_options_strip_spaces_and_name_an_empty_item(capsys):
    """--peft-modes "none, lora" was refused ("unknown ' lora'"), unlike the config's own lists; an
    empty item is an argparse error naming it (was "expected an integer, got ''")."""
    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from peft_memory import build_parser
    from train_throughput import _args

    assert _args(["--compare-hf", "--peft-modes", "none, lora", "--threads", " 1, 2"]).peft_modes == ["none", "lora"]
    assert _args(["--compare-hf", "--threads", " 1, 2 "]).threads == (1, 2)
    assert build_parser().parse_args(["--layout", "2, 1, 4"]).layout == [(2, 1, 4)]
    for argv, needle in ((["--compare-hf", "--peft-modes", "none,,lora"], "argument --peft-modes: empty item 2 in "
                                                                         "'none,,lora'"),
                         (["--compare-hf", "--threads", "1,2,"], "argument --threads: empty item 3 in '1,2,'")):
        with pytest.raises(SystemExit):
            _args(argv)
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--layout", "2,,4"])
    assert "argument --layout: empty item 2 in '2,,4'" in capsys.readouterr().err


def test_an_unusable_attention_backend_is_a_config_error():
    """model.attention_backend te/flash without TE/flash-attn: was "internal error: RuntimeError" in
    train and the benches; now the key, what is missing and what to use, exit 2."""
    from megatron_mft.compat import Environment
    from megatron_mft.config import ModelConfig
    from megatron_mft.errors import UsageError
    from megatron_mft.model.specs import attention_backend

    bare = Environment(cuda=False, te=False, flash_attn=False, apex=False, device_name="cpu")
    for backend, missing in (("te", "Transformer Engine is not usable here"), ("flash", "flash-attn is not installed")):
        with pytest.raises(UsageError, match=f"model.attention_backend={backend} but {missing} .*; use auto .* or sdpa"):
            attention_backend(ModelConfig(attention_backend=backend), bare)
    assert attention_backend(ModelConfig(attention_backend="auto"), bare) == "sdpa"


def test_bench_tools_take_the_debug_switch():
    """A bench's internal error (a fault injected into the estimator) is one line; --debug (the
    commands' switch) gives its traceback (the benches parse sys.argv themselves: --debug was
    refused as an unknown argument)."""
    bench = ROOT / "tools" / "bench" / "peft_memory.py"
    inject = ("import runpy, sys\nimport megatron_mft.peft.memory as m\n"
              "def broken(*a, **k):\n    raise ValueError('injected')\n"
              f"m.estimate_memory = broken\nsys.argv[0] = {str(bench)!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    plain, debug = _run([PY, "-c", inject]), _run([PY, "-c", inject, "--debug"])
    assert plain.returncode == 1 and "internal error: ValueError: injected" in plain.stderr, plain.stderr[-2000:]
    assert "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr[-2000:]


def test_export_refuses_a_model_its_family_cannot_hold_and_writes_the_family_named(tiny_run, tmp_path, tp1_env):
    """A run that made its Llama preset another family's model trains (with a warning). Its export
    as a Llama was an internal KeyError (decoder.layers.0.mlp.linear_fc1.weight) for experts
    (model.num_experts), and a Llama config.json that drops the window for a sliding window: both
    are refused by name before any tensor is read, with the family that fits. ``--family`` writes
    that family: the same tensors as the run's Llama export, a Mistral config with the window; a
    ``--family`` that does not fit is refused the same way. The CLI: exit 2 without a traceback,
    and no megatron import warning on the way."""
    import torch
    from safetensors.torch import load_file

    from megatron_mft.checkpoint.hf.families import ConversionError
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf

    src = tiny_run / "checkpoints" / "step_0000001"
    tok = ["--tokenizer", str(DEMO_SP)]
    convert = [PY, "-m", "megatron_mft.convert", "mcore-to-hf"]

    def changed(name: str, **model) -> Path:
        step = tmp_path / name / "checkpoints" / "step_0000001"
        shutil.copytree(src, step)
        run = json.loads((step / "run.json").read_text())
        run["config"]["model"].update(model)
        (step / "run.json").write_text(json.dumps(run))
        return step

    def refused(ckpt: Path, **kw) -> str:
        with pytest.raises(ConversionError) as e:
            export_to_hf(ckpt, tmp_path / "refused", tokenizer=str(DEMO_SP), log=lambda s: None, **kw)
        assert not (tmp_path / "refused").exists()
        return str(e.value)

    moe = changed("moe", num_experts=4, moe_top_k=2)
    p = _run(convert + ["--ckpt", str(moe), "--out", str(tmp_path / "moe_hf")] + tok)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "KeyError" not in p.stderr, p.stderr
    assert f"{moe} is not a llama model (LlamaForCausalLM), so it cannot be written as one" in p.stderr, p.stderr
    assert "needs num_experts=0 (the model has 4)" in p.stderr and "fit this architecture: mixtral" in p.stderr
    assert "--family NAME writes another family" in p.stderr and "Warning" not in p.stdout + p.stderr, p.stderr
    assert not (tmp_path / "moe_hf").exists()
    assert "is not a qwen2 model (Qwen2ForCausalLM)" in refused(moe, family="qwen2")

    window = changed("window", sliding_window=16)
    msg = refused(window)
    assert "needs sliding_window=0 (the model has 16)" in msg and "fit this architecture: mistral" in msg, msg
    export_to_hf(window, tmp_path / "w_mistral", family="mistral", tokenizer=str(DEMO_SP), log=lambda s: None)
    export_to_hf(src, tmp_path / "llama", tokenizer=str(DEMO_SP), log=lambda s: None)
    cfg = json.loads((tmp_path / "w_mistral" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] == 16, cfg
    a, b = load_file(tmp_path / "w_mistral" / "model.safetensors"), load_file(tmp_path / "llama" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_finds_a_runs_tokenizer_by_its_data_manifest(tmp_path, monkeypatch):
    """A run whose relative ``data.tokenizer`` is found neither from here nor from its working
    folder (run.json copied to another machine, the working folder gone): the export falls back to
    the absolute path its data manifest recorded, checked by its sha256."""
    from megatron_mft.checkpoint.hf.export_tokenizer import RunTokenizer
    from megatron_mft.data.tokenizer import file_sha256

    step = tmp_path / "elsewhere" / "runs" / "a" / "checkpoints" / "step_0000001"
    step.mkdir(parents=True)
    run = {"config": {"output_dir": "runs/a", "data": {"tokenizer": "tok/demo_sp2048.model"}},
           "manifest": {"tokenizer": {"path": str(DEMO_SP), "sha256": file_sha256(DEMO_SP)}}}
    monkeypatch.chdir(tmp_path)
    found, why = RunTokenizer.of_run(step, run).locate()
    assert found == DEMO_SP and why is None, why
    run["manifest"]["tokenizer"]["sha256"] = "0" * 64  # another file now at that path: not taken
    found, why = RunTokenizer.of_run(step, run).locate()
    assert found is None and "is not the one the run trained with" in why, why
