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
import sys
from pathlib import Path

from megatron_mft.compat.fsops import broken_link, cannot_write_in, is_within, nearest_existing
from megatron_mft.config import RunConfig
from megatron_mft.errors import UsageError, first_rank

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
    _warn_once(_family_warnings(run))


_WARNED: set[str] = set()


def _warn_once(warnings: list[str]) -> None:
    """On the first rank, each warning once per process (the trainer runs the preflight before it
    imports megatron, and the recipe again for library use)."""
    for w in warnings:
        if first_rank() and w not in _WARNED:
            print(f"warning: {w}", file=sys.stderr, flush=True)
        _WARNED.add(w)


def check_against_data(run: RunConfig, data) -> None:
    """What needs the open data (``data.MFTData``): task names in per-task config maps, the
    tokenizer's vocabulary against the model's, validation rows for what reads them, and settings
    that offline data fixed at preprocessing."""
    task_names, vocab_size = data.task_names, data.vocab_size
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
    problems += _validation_problems(run, {name: data.val_rows(name) for name in task_names})
    if run.data.source == "offline":
        refused, warned = _offline_setting_problems(run, data.manifest)
        problems += refused
        if first_rank():
            for w in warned:
                print(f"warning: {w}", flush=True)
    if problems:
        raise PreflightError(problems)


def _validation_problems(run: RunConfig, val_rows: dict[str, int]) -> list[str]:
    """Validation, early stopping and the convergence balancers read per-task validation losses:
    without validation rows they would do nothing, silently."""
    where = f"data.path {run.data.path}"
    split = ("preprocess with --val-ratio > 0 or give the tasks val .jsonl files" if run.data.source == "offline"
             else "set data.val_ratio > 0 or give the tasks val .jsonl files")
    none = [name for name, n in val_rows.items() if n == 0]
    problems = []
    if run.loss.balancer != "none" and none:
        problems.append(f"loss.balancer: {run.loss.balancer} weighs every task by its validation loss, but task(s) "
                        f"{', '.join(none)} of {where} have no validation rows; {split}, or set loss.balancer: none")
    if len(none) == len(val_rows):
        t = run.train
        for key, value in (("eval_interval", t.eval_interval), ("early_stopping_patience", t.early_stopping_patience)):
            if value:
                problems.append(f"train.{key}: {value}, but no task of {where} has validation rows; {split}, or set "
                                f"train.{key}: 0")
    return problems


def _offline_setting_problems(run: RunConfig, manifest: dict) -> tuple[list[str], list[str]]:
    """With data.source=offline the preprocessed data decides the sample mode, packing, split and
    template (``manifest.json``). A setting changed from its default that disagrees with the data
    would be ignored without a word: (problems, warnings). Refused: data.mode (the loss would not
    cover what the user believes) and a data.tokenizer that is not the data's (the export copies it
    as the model's tokenizer). Warned: packing, val_ratio and template (only unused)."""
    from megatron_mft.config import DataConfig

    d, default = run.data, DataConfig()
    where = f"data.path {d.path}"
    redo = "tools/preprocess/preprocess_mft.py"
    problems, warnings = [], []
    if d.mode != default.mode and manifest.get("mode") not in (None, d.mode):
        problems.append(f"data.mode: {d.mode!r}, but {where} was preprocessed with mode {manifest['mode']!r} (data.source "
                        f"offline reads it as it is); remove data.mode, or preprocess again with {redo} --mode {d.mode}")
    for key in ("packing", "val_ratio"):
        value, made = getattr(d, key), manifest.get(key)
        if value != getattr(default, key) and made is not None and value != made:
            warnings.append(f"data.{key} {value!r} is not used: {where} was preprocessed with {key} {made!r} "
                            f"(data.source offline reads it as it is)")
    if d.template != default.template and isinstance(manifest.get("template"), dict):
        from megatron_mft.data.template import TemplateError, load_template

        try:
            same = json.loads(json.dumps(load_template(d.template).to_dict())) == manifest["template"]
        except (TemplateError, OSError, ValueError):
            same = False
        if not same:
            warnings.append(f"data.template {d.template!r} is not used: {where} was preprocessed with template "
                            f"{manifest['template'].get('name')!r} (data.source offline reads it as it is)")
    tok = manifest.get("tokenizer") or {}
    if d.tokenizer:
        given = Path(d.tokenizer)
        if not given.exists():
            problems.append(f"data.tokenizer: {d.tokenizer} does not exist (with data.source offline the data's own "
                            f"tokenizer, {tok.get('path', 'recorded in manifest.json')}, is used; remove "
                            f"data.tokenizer or fix the path)")
        elif tok.get("sha256"):
            from megatron_mft.data.tokenizer import identity_sha256

            sha = identity_sha256(given)
            if sha is not None and sha != tok["sha256"]:
                problems.append(f"data.tokenizer: {d.tokenizer} is not the tokenizer {where} was preprocessed with "
                                f"({tok.get('path', '?')}); remove data.tokenizer, or preprocess again with {redo}")
    return problems, warnings


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


def _family_warnings(run: RunConfig) -> list[str]:
    """A preset's family that overrides made into another family's model (model.num_experts on a
    Llama preset: a Mixtral): it trains, and the export needs to be told the family."""
    from megatron_mft.checkpoint.hf.families import family_problems

    if run.model.family is not None or run.model.hf_init or run.model.validate():
        return []  # a family the run names itself: refused by _family_problems when it does not fit
    return [f"{p}: the run trains, but `convert mcore-to-hf` needs --family to export it; set model.family "
            f"to say what it is" for p in family_problems(run.model.arch(), key=f"model.family (preset "
                                                                            f"{run.model.preset}'s)")]


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
        if is_within(Path(run.output_dir), path):
            problems.append(f"output_dir: {run.output_dir} is inside data.path {d.path}: with data.source=online "
                            f"every sub-folder of data.path is read as a task, so the run's own folder would be "
                            f"taken for task data; put output_dir outside data.path")
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
    probe_in = nearest_existing(out)
    for missing in [out, *out.absolute().parents]:  # a dangling link on the way is 'missing' to exists()
        if missing.absolute() == probe_in:
            break
        link = broken_link(missing)
        if link:
            return [f"output_dir: {out} cannot be created: {missing} is a {link}"]
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
        else:
            problems += _init_checkpoint_model_problems(run, path)
    if run.model.hf_init:
        problems += _hf_init_problems(run)
    return problems


def weight_shapes(arch) -> dict:
    """What decides which weights a checkpoint of ``arch`` holds and their shapes (derived sizes, so
    kv_channels 0 and the head size it stands for compare equal). The rest (RoPE base and scaling,
    context length, norm epsilon, windows, routing top-k) may change when a run starts from a
    checkpoint, e.g. to extend its context."""
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
            "activation", "normalization", "qkv_bias", "linear_bias", "qk_norm", "tied_embeddings", "num_experts",
            "moe_shared_expert_size")
    shapes = {k: getattr(arch, k) for k in keys}
    shapes["head_dim"] = arch.head_dim
    if arch.num_experts:
        shapes["expert_ffn_hidden_size"] = arch.expert_ffn
    if arch.moe_shared_expert_size:
        shapes["moe_shared_expert_gate"] = arch.moe_shared_expert_gate
    return shapes


def _init_checkpoint_model_problems(run: RunConfig, path: Path) -> list[str]:
    """The model a checkpoint describes (``run.json`` of a training step, ``conversion.json`` of
    ``convert hf-to-mcore``, ``init.json`` of ``checkpoint init``) against the config: a shape
    difference would otherwise surface as a tensor-shape error of the loader after the model is
    built; an adapters-only step holds no base weights to start from."""
    from megatron_mft.checkpoint.described import read_description
    from megatron_mft.config.base import ConfigError

    key = "train.init_checkpoint"
    try:
        described = read_description(path)
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        return [f"{key}: the description of {path} is unreadable ({e})"]
    if described is None:
        return []  # written by an older version: the loader names any mismatch
    problems = []
    if described.adapters:
        problems.append(f"{key}: {path} is a {described.peft_method} step, which holds the adapters only, not a model to start "
                        f"from; merge them into their base first (`python -m megatron_mft.convert mcore-to-hf "
                        f"--ckpt {path} --merge-lora --out DIR`, then model.hf_init=DIR)")
    if run.model.validate():
        return problems  # the config's own problems are reported by the config check
    saved, now = weight_shapes(described.model.arch()), weight_shapes(run.model.arch())
    differ = [f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
    if differ:
        problems.append(f"{key}: {path} holds another model shape ({'; '.join(differ)}); use the preset and "
                        f"model settings it was saved with (described in {described.file})")
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
