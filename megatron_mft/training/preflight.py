"""Checks of a run config against the world (processes, files, folders) before anything is built.

Config validation (``megatron_mft.config``) knows only the config. These checks look at what it
names: the number of processes the launcher started, the data and tokenizer paths, the output
folder, the initial weights. They run on every rank before the process group and the model, so a
typo costs seconds instead of a traceback after minutes of setup, and every problem is reported at
once. :func:`check_against_data` does the same for what needs the data's task names and
vocabulary (known once the data is open, still before the model is built).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_mft.compat.fsops import cannot_write_in
from megatron_mft.config import RunConfig
from megatron_mft.errors import UsageError

__all__ = ["PreflightError", "check_against_data", "check_run"]


class PreflightError(UsageError):
    """Every problem found, one per line, each naming its config key (exit 2)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(["cannot start training:"] + [f"  - {p}" for p in problems]))


def check_run(run: RunConfig, world_size: int) -> None:
    """Raise :class:`PreflightError` listing every problem of ``run`` in a job of ``world_size``
    processes."""
    problems = (_layout_problems(run, world_size) + _family_problems(run) + _data_problems(run)
                + _output_dir_problems(run) + _reference_store_problems(run) + _init_weights_problems(run))
    if problems:
        raise PreflightError(problems)


def check_against_data(run: RunConfig, task_names: list[str], vocab_size: int) -> None:
    """Task names in per-task config maps, and the tokenizer's vocabulary against the model's."""
    problems = []
    for key in ("task_weights", "alpha"):
        unknown = [name for name in getattr(run.loss, key) if name not in task_names]
        if unknown:
            problems.append(f"loss.{key}: unknown task name(s) {', '.join(map(repr, unknown))}; the tasks of "
                            f"data.path {run.data.path} are {', '.join(task_names)}")
    arch = run.model.arch()
    if vocab_size > arch.vocab_size:
        problems.append(f"model.vocab_size: the tokenizer of data.path {run.data.path} has {vocab_size} tokens, more "
                        f"than the model's vocabulary of {arch.vocab_size} (preset {run.model.preset}); use a "
                        f"tokenizer and preset that match, or set model.vocab_size >= {vocab_size}")
    if problems:
        raise PreflightError(problems)


def _layout_problems(run: RunConfig, world_size: int) -> list[str]:
    par, t = run.parallel, run.train
    problems = par.world_problems(world_size)
    if problems:
        return problems
    dp = par.data_parallel_size(world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        return [f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size x "
                f"data-parallel size = {t.micro_batch_size} x {dp}"]
    return []


def _family_problems(run: RunConfig) -> list[str]:
    """model.family: a family of the registry (checkpoint.hf.families) that the architecture fits,
    when the run names one (``model.family``) or starts from a Hugging Face model. A preset's
    family with architecture overrides it cannot represent (a custom model that never goes to
    Hugging Face) trains; ``convert mcore-to-hf`` refuses it by name."""
    from megatron_mft.checkpoint.hf.families import FAMILIES, family_problems

    if run.model.validate():
        return []
    arch = run.model.arch()
    if run.model.family is None and not run.model.hf_init:
        return [] if arch.family in FAMILIES else family_problems(arch)
    return family_problems(arch)


def _data_problems(run: RunConfig) -> list[str]:
    d = run.data
    path = Path(d.path)
    if not path.exists():
        return [f"data.path: {d.path} does not exist"]
    if not path.is_dir():
        return [f"data.path: {d.path} is not a directory"]
    problems = []
    if d.source == "offline" and not (path / "manifest.json").is_file():
        problems.append(f"data.path: {d.path} has no manifest.json, so it is not the output of "
                        f"tools/preprocess/preprocess_mft.py; preprocess it, or read raw .jsonl task folders "
                        f"with data.source=online")
    if d.source == "online":
        if (path / "manifest.json").is_file():
            problems.append(f"data.path: {d.path} is preprocessed output (it has manifest.json); "
                            f"set data.source=offline")
        if d.tokenizer and not Path(d.tokenizer).exists():
            problems.append(f"data.tokenizer: {d.tokenizer} does not exist")
        if d.template.endswith(".json") and not Path(d.template).is_file():
            problems.append(f"data.template: {d.template} does not exist")
    return problems


def _output_dir_problems(run: RunConfig) -> list[str]:
    """Writable without leaving a trace: a temporary folder in the nearest existing ancestor."""
    out = Path(run.output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir: {out} exists and is not a directory"]
    probe_in = out
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return [f"output_dir: {out} cannot be created: {probe_in} is not a directory"]
    why = cannot_write_in(probe_in)
    if why:
        where = "" if probe_in == out else f" (in {probe_in})"
        return [f"output_dir: {out} is not writable{where}: {why}"]
    return []


def _reference_store_problems(run: RunConfig) -> list[str]:
    """Full-FT DPO stores its reference log-probs beside the data (training/reference.py): find
    out before the model is built and the pre-pass has run, not after."""
    path = Path(run.data.path)
    if (run.train.stage != "dpo" or run.peft.method != "none" or run.loss.preference.reference == "frozen"
            or not path.is_dir()):
        return []
    why = cannot_write_in(path)
    if why:
        return [f"data.path: {path} is not writable ({why}); train.stage=dpo with full fine-tuning "
                f"stores the reference log-probs of the starting weights there"]
    return []


def _init_weights_problems(run: RunConfig) -> list[str]:
    problems = []
    ckpt = run.train.init_checkpoint
    if ckpt:
        path = Path(ckpt)
        if not path.is_dir():
            problems.append(f"train.init_checkpoint: {ckpt} does not exist")
        elif not (path / "metadata.json").is_file():
            problems.append(f"train.init_checkpoint: {ckpt} is not a megatron dist checkpoint (no metadata.json); "
                            f"give a step folder (OUTPUT_DIR/checkpoints/step_N) or the output of "
                            f"`checkpoint init` / `convert hf-to-mcore`")
    if run.model.hf_init:
        problems += _hf_init_problems(run)
    return problems


def _hf_init_problems(run: RunConfig) -> list[str]:
    """A Hugging Face folder of a family the converter knows (checkpoint.hf.families registry), whose
    config.json matches the model config and whose tensors (safetensors headers: names, shapes,
    truncation) are the ones the weight map needs; the weights themselves are read later."""
    from megatron_mft.checkpoint.hf.families import FAMILIES, ConversionError, family_for
    from megatron_mft.checkpoint.hf.hfconfig import check_model_config
    from megatron_mft.checkpoint.hf.source import HFSource

    hf_dir = run.model.hf_init

    cfg_path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        return [f"model.hf_init: {hf_dir} does not exist"]
    if not cfg_path.is_file():
        return [f"model.hf_init: {hf_dir} is not a Hugging Face model folder (no config.json)"]
    try:
        hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(hf_cfg, dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError) as e:
        return [f"model.hf_init: {cfg_path} is unreadable: {e}"]
    try:
        family_for(hf_cfg)
    except ConversionError:
        known = sorted({t for f in FAMILIES.values() for t in f.model_types})
        archs = sorted({f.architecture for f in FAMILIES.values()})
        return [f"model.hf_init: {cfg_path} describes model_type {hf_cfg.get('model_type')!r} "
                f"(architectures {hf_cfg.get('architectures')}), which is not supported; supported model types: "
                f"{', '.join(known)} ({', '.join(archs)})"]
    try:
        family = check_model_config(run.model, hf_cfg, hf_dir)
        HFSource(hf_dir, family, run.model.arch(), hf_cfg)
    except ConversionError as e:
        return ["model.hf_init: " + str(e).replace("\n", "\n    ")]
    return []
