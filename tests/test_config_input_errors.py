"""Bad config input from a user sweep: each is one ConfigError naming the file and line, the override
or the key, every problem at once (exit 2 through the commands, no traceback). Before the fixes:
a repeated section silently replaced the first, a non-UTF-8 file or a malformed override value was
an internal error, ``~`` in a path became a folder named ``~``, out-of-range optimiser, schedule and
seed values passed (some to fail after the model was built), and a seq_length past the model's
positions passed without a word."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from megatron_mft.config import ConfigError, RunConfig, load_config
from megatron_mft.config.base import to_dict
from train_helpers import ROOT, env


def _problems(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    assert "Traceback" not in str(e.value)
    return str(e.value)


TWO_TRAIN_BLOCKS = "data:\n  path: /x\ntrain:\n  steps: 5\n  lr: 1.0e-3\noutput_dir: out\ntrain:\n  steps: 7\n"

# (id, file bytes, overrides, exact lines the message must hold; {f} = the file's path)
FILE_CASES = [
    ("repeated-section", TWO_TRAIN_BLOCKS.encode(), [],
     ["{f}:7: duplicate key 'train' (first at line 3)"]),
    ("nested-and-every-duplicate", b"data:\n  path: /x\n  seq_length: 64\n  seq_length: 128\nmodel: {preset: tiny,"
     b" preset: tiny}\nseed: 1\nseed: 2\n", [],
     ["{f}:4: duplicate key 'seq_length' (first at line 3)", "{f}:5: duplicate key 'preset' (first at line 5)",
      "{f}:7: duplicate key 'seed' (first at line 6)"]),
    ("not-utf8", b"data:\n  path: /x\noutput_dir: caf\xe9\n", [],
     ["{f}:3: not UTF-8 text (byte 0xe9 at offset 32)"]),
    ("control-character", b"data:\n  path: /x\noutput_dir: a\x07b\n", [],
     ["{f}:3: YAML syntax error: unacceptable character #x0007"]),
    ("bad-override-value", b"data: {path: /x}\n", ["train.steps=[1", "model={a: 1, a: 2}", "parallel.tp=2"],
     ["override 'train.steps=[1': not a valid value (expected ',' or ']', but got '<stream end>'",
      "override 'model={a: 1, a: 2}': not a valid value (duplicate key 'a' (first at line 1))"]),
    ("file-and-overrides-at-once", TWO_TRAIN_BLOCKS.encode(), ["train.lr={x"],
     ["{f}:7: duplicate key 'train' (first at line 3)", "override 'train.lr={x': not a valid value ("]),
]


@pytest.mark.parametrize("content, overrides, needles", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_bad_file_or_override_is_named_by_file_line_or_override(tmp_path, content, overrides, needles):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    msg = _problems(f, overrides)
    for needle in needles:
        assert needle.replace("{f}", str(f)) in msg, msg
    lines = [ln for ln in msg.splitlines()[1:] if ln.startswith("  - ")]
    assert len(lines) == len(needles), msg  # one line per problem, nothing else


def test_duplicates_are_not_confused_with_merges_or_equal_values_elsewhere(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("base: &b {lr: 1.0e-3, steps: 5}\ndata: {path: /x, seq_length: 64}\n"
                 "train: {<<: *b, steps: 6}\nloss: {task_weights: {a: 1.0, b: 1.0}}\n")
    with pytest.raises(ConfigError, match="base: unknown field"):  # parses: only the extra key is refused
        load_config(f)
    f.write_text("data: {path: /x, seq_length: 64}\ntrain: {lr: 1.0e-3, steps: 6}\n")
    assert load_config(f, ["loss.task_weights={a: 1, b: 1}"]).loss.task_weights == {"a": 1.0, "b": 1.0}


#: every field that holds a file system path, as a dotted key
PATH_FIELDS = {"output_dir", "data.path", "data.tokenizer", "data.template", "model.hf_init",
               "train.init_checkpoint", "train.resume_from"}


def _path_fields(cls, prefix=""):
    out = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("path"):
            out.add(prefix + f.name)
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out |= _path_fields(f.default_factory, f"{prefix}{f.name}.")
    return out


def test_home_in_path_fields_is_expanded_and_dumped(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert _path_fields(RunConfig) == PATH_FIELDS
    f = tmp_path / "c.yaml"
    f.write_text("output_dir: ~/run\ndata:\n  path: ~/data\n")
    cfg = load_config(f, ["data.tokenizer=~/tok.model", "data.template=~/t.json", "model.hf_init=~/hf",
                          "train.init_checkpoint=~/init", "train.resume_from=~/other/step_5"])
    dumped = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # what the run folder's config.yaml holds
    for key, rel in [("output_dir", "run"), ("data.path", "data"), ("data.tokenizer", "tok.model"),
                     ("data.template", "t.json"), ("model.hf_init", "hf"), ("train.init_checkpoint", "init"),
                     ("train.resume_from", "other/step_5")]:
        section, _, name = key.rpartition(".")
        assert (dumped[section] if section else dumped)[name] == f"{home}/{rel}", key
    plain = load_config(None, ["data.path=rel/~x", "train.resume_from=12"])  # only a leading ~, not numbers
    assert (plain.data.path, plain.train.resume_from, plain.data.template) == ("rel/~x", "12", "mftcoder")


def test_a_shell_variable_in_a_path_is_kept_and_warned(capsys, monkeypatch):
    """``output_dir='$HOME/x'`` (single-quoted: the shell left it) trained into a folder named
    ``$HOME``: it still does (no expansion beyond ``~``), but every such path field is named."""
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, ["data.path=/d/${DATA}", "output_dir=$HOME/x", "data.tokenizer=/t/a$5", "train.steps=3"])
    assert (cfg.output_dir, cfg.data.path) == ("$HOME/x", "/d/${DATA}")
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: ")]
    assert [ln.split(":")[1].strip() for ln in warned] == ["data.path", "output_dir"], warned
    assert "'$HOME/x' is used as written, with a literal '$': config values are not shell-expanded (only a " \
        "leading ~ is); a single-quoted override or a YAML file keeps the $" in warned[1]


# out-of-range values, each a problem naming its key, all at once; (override, exact problem text)
RANGE_CASES = [
    ("train.adam_eps=0", "train.adam_eps: must be > 0"),
    ("train.adam_beta1=1", "train.adam_beta1: must be in [0, 1)"),
    ("train.adam_beta2=-0.1", "train.adam_beta2: must be in [0, 1)"),
    ("train.weight_decay=-0.01", "train.weight_decay: must be >= 0"),
    ("train.decay_steps=0", "train.decay_steps: must be >= 1, or null"),
    ("train.epochs=-1", "train.epochs: must be >= 0"),
    ("train.clip_grad=-1", "train.clip_grad: must be >= 0 (0 = no clipping)"),
    ("train.exit_duration_minutes=-5", "train.exit_duration_minutes: must be >= 0"),
    ("train.peak_flops=-1e12", "train.peak_flops: must be > 0, or null"),
    ("seed=-1", "seed: must be in [0, 2**32 - 1], got -1"),
]


def test_optimiser_schedule_and_seed_ranges_are_refused_at_once():
    overrides = ["data.path=/x", "train.steps=0"] + [o for o, _ in RANGE_CASES]
    msg = _problems(None, overrides)
    for _, needle in RANGE_CASES:
        assert needle in msg, (needle, msg)
    assert len(msg.splitlines()) == 1 + len(RANGE_CASES), msg  # epochs -1 is one problem, not two
    # warmup must end before the decay does (megatron's scheduler asserts it after the model is built)
    msg = _problems(None, ["data.path=/x", "train.warmup_steps=10", "train.decay_steps=10", "seed=4294967296"])
    assert "train.warmup_steps: 10 must be < train.decay_steps 10" in msg and "seed: must be in [0, 2**32 - 1]" in msg
    # the edges of each range, and the defaults, still load
    edge = load_config(None, ["data.path=/x", "train.adam_beta1=0", "train.adam_beta2=0.999", "train.clip_grad=0",
                              "train.weight_decay=0", "train.epochs=0", "train.warmup_steps=9", "train.decay_steps=10",
                              "train.exit_duration_minutes=0", "seed=0", "train.peak_flops=null"])
    assert edge.train.clip_grad == 0 and edge.seed == 0
    assert load_config(None, ["data.path=/x", "seed=4294967295", "train.steps=0", "train.epochs=0.5"]).seed == 2**32 - 1


# architecture values that megatron refused only at build time or step 1 (negative dimension,
# odd head size under RoPE); (override, exact problem text)
ARCH_CASES = [
    ("model.moe_ffn_hidden_size=-4", "model.moe_ffn_hidden_size: must be >= 0 (0 = ffn_hidden_size), got -4"),
    ("model.moe_shared_expert_size=-8", "model.moe_shared_expert_size: must be >= 0 (0 = none), got -8"),
    ("model.kv_channels=7", "model.kv_channels: the head size 7 is odd; RoPE rotates pairs of channels"),
    ("model.rope_original_max_positions=-5", "model.rope_original_max_positions: must be >= 0, got -5"),
]


def test_architecture_values_megatron_would_fail_on_are_refused_at_once():
    msg = _problems(None, ["data.path=/x", "model.num_experts=4", "model.moe_top_k=2"] + [o for o, _ in ARCH_CASES])
    for _, needle in ARCH_CASES:
        assert needle in msg, (needle, msg)
    assert len(msg.splitlines()) == 1 + len(ARCH_CASES), msg
    assert "model.hidden_size: the head size 33 is odd" in _problems(None, ["data.path=/x", "model.hidden_size=132"])
    load_config(None, ["data.path=/x", "model.kv_channels=8", "model.rope_type=llama3", "model.rope_factor=8"])


@pytest.mark.parametrize("overrides, warned", [
    (["model.moe_top_k=2", "model.moe_aux_loss_coeff=0.01"],
     "model.moe_top_k, model.moe_aux_loss_coeff set, but the model is dense (num_experts 0): no effect"),
    (["model.rope_factor=8"], "model.rope_factor set, but rope_type is default: no effect (RoPE scaling needs"),
    (["model.rope_type=linear", "model.rope_factor=4", "model.rope_original_max_positions=512"],
     "model.rope_original_max_positions set, but rope_type is linear: no effect (only llama3 and yarn read it)"),
    # the neutral values (as a converted model's section writes them), or settings that are read: quiet
    (["model.rope_factor=1", "model.rope_original_max_positions=0", "model.moe_top_k=0"], None),
    (["model.num_experts=4", "model.moe_top_k=2", "model.moe_aux_loss_coeff=0.01"], None),
    (["model.preset=deepseek-coder-1.3b", "model.rope_type=default"], None),  # the preset's factor is not named
])
def test_model_settings_without_effect_are_warned(capsys, monkeypatch, overrides, warned):
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    load_config(None, ["data.path=/x", "data.seq_length=512"] + overrides)
    err = capsys.readouterr().err
    assert (f"warning: {warned}" in err) if warned else "warning" not in err, err


def test_checkpoint_init_refuses_the_seed_train_refuses(tmp_path):
    """``checkpoint init`` reads the same config and seed: the same words, before megatron is imported."""
    from megatron_mft.checkpoint.__main__ import main

    assert main(["init", "--config", str(ROOT / "examples" / "tiny_cpu.yaml"), "--out", str(tmp_path / "o"),
                 "seed=-3"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("overrides, warned", [
    (["data.seq_length=100000"], True),
    (["data.seq_length=1024"], False),  # the preset's maximum itself
    (["data.seq_length=4096", "model.max_position_embeddings=4096"], False),  # raised on purpose
    (["data.seq_length=4096", "model.rope_type=linear", "model.rope_factor=4"], False),  # RoPE scaling configured
])
def test_seq_length_past_the_models_positions_is_not_silent(capsys, monkeypatch, overrides, warned):
    """Warned, not refused: examples/codellama34b_lora_32k.yaml trains CodeLlama-34B (16k positions)
    at 32k on purpose (RoPE theta 1e6 extrapolates); it must keep loading."""
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    load_config(None, ["data.path=/x", "model.preset=tiny"] + overrides)
    err = capsys.readouterr().err
    if not warned:
        assert "warning" not in err, err
        return
    for needle in ("warning: data.seq_length 100000 exceeds max_position_embeddings 1024 of preset tiny",
                   "model.max_position_embeddings >= 100000", "model.rope_type"):
        assert needle in err, err
    monkeypatch.setenv("RANK", "1")  # once per job: the other ranks stay quiet
    monkeypatch.setenv("WORLD_SIZE", "2")
    load_config(None, ["data.path=/x"] + overrides)
    assert capsys.readouterr().err == ""


def test_the_long_context_example_loads_with_its_warning(capsys):
    cfg = load_config(ROOT / "examples" / "codellama34b_lora_32k.yaml")
    assert cfg.data.seq_length == 32768
    err = capsys.readouterr().err
    assert "data.seq_length 32768 exceeds max_position_embeddings 16384 of preset codellama-34b" in err, err


def _files(tmp):
    (tmp / "dup.yaml").write_text(f"data:\n  path: {tmp}/no_data\n" + TWO_TRAIN_BLOCKS.split("\n", 2)[2])
    (tmp / "latin1.yaml").write_bytes(b"model:\n  preset: tiny\noutput_dir: r\xe9sultats\n")


@pytest.mark.parametrize("argv, needles", [
    (["megatron_mft.train", "--config", "{tmp}/dup.yaml", "train.steps=[1"],
     ["dup.yaml:7: duplicate key 'train' (first at line 3)", "override 'train.steps=[1': not a valid value ("]),
    (["megatron_mft.checkpoint", "init", "--config", "{tmp}/latin1.yaml", "--out", "{tmp}/init"],
     ["latin1.yaml:3: not UTF-8 text (byte 0xe9 at offset 35)"]),
], ids=["train", "checkpoint-init"])
def test_the_commands_exit_2_with_the_message_and_no_traceback(tmp_path, argv, needles):
    _files(tmp_path)
    e = env(threads=1)
    e.pop("MFT_DEBUG", None)
    p = subprocess.run([sys.executable, "-m"] + [a.format(tmp=tmp_path) for a in argv], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr[-3000:]
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr[-3000:])
    assert not (tmp_path / "init").exists()


def test_an_override_typo_is_blamed_on_the_command_line_with_the_closest_field(tmp_path):
    """``train.stpes=3``: the message named the YAML file (which holds no such key) and offered no
    field (the hint was a 3-letter prefix match); now the overrides, and ``steps``."""
    f = tmp_path / "run.yaml"
    f.write_text("data:\n  path: /x\ntrain:\n  steps: 5\n")
    msg = _problems(f, ["train.stpes=3", "model.num_layer=2"])
    assert msg.startswith(f"invalid config (the key=value overrides on {f}):\n"), msg
    assert "train.stpes: unknown field (did you mean steps?)" in msg
    assert "model.num_layer: unknown field (did you mean num_layers?)" in msg
    # a truncated name still gets its completions; a keyword field, a section and a mapping value too
    msg = _problems(f, ["train.warmup=3", "loss.preference.lambda=abc", "trian.steps=3", "parallel={'tpp': 2}"])
    assert msg.startswith(f"invalid config (the key=value overrides on {f}):\n"), msg
    assert "train.warmup: unknown field (did you mean warmup_steps?)" in msg, msg
    f.write_text("data:\n  path: /x\ntrain:\n  stpes: 5\n")
    assert _problems(f, ["train.lr=1e-3"]).startswith(f"invalid config {f}:\n")
    msg = _problems(f, ["model.num_layer=2"])  # one in each
    assert msg.startswith(f"invalid config {f} and its key=value overrides:\n"), msg
