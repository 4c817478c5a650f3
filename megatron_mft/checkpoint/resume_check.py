"""Is the current config a continuation of the checkpoint's run? (``resume_differences``)

A checkpoint's ``run.json`` records the config, task names and data manifest of the run that
saved it. On resume they are compared with the current config and data:

* refused (one message listing every difference): the model's shape, the PEFT method and the
  settings that decide the adapters' shape or output (rank, alpha, rslora, target modules), the
  frozen base of a PEFT run (``model.hf_init`` / ``train.init_checkpoint``), the task names, the
  data (tokenizer file, template, tasks and files, packing, split sizes), the loss mode and the
  balancer (its state is in the checkpoint);
* allowed and reported: everything else, e.g. more steps, another TP/PP/DP layout, log / save /
  eval intervals, the LR schedule's length, a moved data folder with the same content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_mft.config import ModelConfig, RunConfig
from megatron_mft.config.base import load_dataclass, to_dict, yaml_key

#: Ignored entirely: they say how to find the checkpoint, not what it holds.
_IGNORED = {"train.resume_from", "output_dir"}


def _as_saved(d: Any) -> Any:
    """``d`` as it reads back from run.json: tuples become lists (an in-memory online manifest holds
    tuples where the saved one has lists; they are the same data)."""
    return json.loads(json.dumps(d))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def data_identity(manifest: dict) -> dict:
    """The parts of a data manifest that decide which rows a step reads (not where they live)."""
    tok = manifest.get("tokenizer") or {}
    splits = manifest.get("splits") or {}
    return {
        "mode": manifest.get("mode"), "seq_length": manifest.get("seq_length"), "packing": manifest.get("packing"),
        "seed": manifest.get("seed"), "val_ratio": manifest.get("val_ratio"),
        "tokenizer": {"sha256": tok.get("sha256"), "vocab_size": tok.get("vocab_size")},
        "template": manifest.get("template"),
        "tasks": [{k: t.get(k) for k in ("name", "train_files", "val_files")} for t in manifest.get("tasks", [])],
        "splits": {s: {k: (v or {}).get(k) for k in ("sequences", "samples")} for s, v in splits.items()},
    }


def _arch(model: dict, source: str) -> dict:
    return to_dict(load_dataclass(ModelConfig, model, source=source).arch())


def _same_path(a, b) -> bool:
    if not a or not b:
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _fmt(v: Any) -> str:
    return "unset" if v is None else repr(v)


def resume_differences(run_json: dict, cfg: RunConfig, manifest: dict, task_names: list[str],
                       source: str = "run.json") -> tuple[list[str], list[str]]:
    """(refused differences, allowed changes) between a checkpoint's ``run.json`` and this run."""
    saved = run_json.get("config")
    if not saved:  # written before run.json recorded the config: nothing to compare
        return [], []
    now = _as_saved(to_dict(cfg))
    refused: list[str] = []

    old_arch, new_arch = _arch(saved.get("model") or {}, source), to_dict(cfg.model.arch())
    for k in sorted(set(old_arch) | set(new_arch)):
        if old_arch.get(k) != new_arch.get(k):
            refused.append(f"model shape {k}: checkpoint {_fmt(old_arch.get(k))}, config {_fmt(new_arch.get(k))}")

    old_peft, new_peft = saved.get("peft") or {}, now["peft"]
    old_method = run_json.get("peft") or old_peft.get("method", "none")
    if old_method != new_peft["method"]:
        kind = {"none": "a full-model checkpoint"}.get(old_method, f"a {old_method} (adapters only) checkpoint")
        refused.append(f"peft.method: {kind} (method {old_method!r}) cannot be resumed as peft.method="
                       f"{new_peft['method']!r}; export it and start a new run from it instead")
    elif old_method != "none":
        for k in ("rank", "alpha", "rslora", "target_modules"):
            if old_peft.get(k) != new_peft.get(k):
                refused.append(f"peft.{k}: checkpoint {_fmt(old_peft.get(k))}, config {_fmt(new_peft.get(k))}")
        old_base = ((saved.get("model") or {}).get("hf_init"), (saved.get("train") or {}).get("init_checkpoint"))
        new_base = (cfg.model.hf_init, cfg.train.init_checkpoint)
        for key, a, b in zip(("model.hf_init", "train.init_checkpoint"), old_base, new_base):
            if not _same_path(a, b):
                refused.append(f"{key} (the frozen base the adapters were trained on): checkpoint {_fmt(a)}, "
                               f"config {_fmt(b)}")

    saved_tasks = run_json.get("task_names")
    if saved_tasks is not None and list(saved_tasks) != list(task_names):
        refused.append(f"task names: checkpoint {saved_tasks}, data {list(task_names)}")
    if run_json.get("manifest") is not None:
        old_data, new_data = _flat(data_identity(run_json["manifest"])), _flat(_as_saved(data_identity(manifest)))
        for k in sorted(set(old_data) | set(new_data)):
            if k.startswith("tasks") and saved_tasks is not None and list(saved_tasks) != list(task_names):
                continue  # already said
            if old_data.get(k) != new_data.get(k):
                refused.append(f"data {k}: checkpoint {_fmt(old_data.get(k))}, data now {_fmt(new_data.get(k))}")

    old_loss = saved.get("loss") or {}
    for k in ("mode", "balancer"):
        if k in old_loss and old_loss[k] != now["loss"][k]:
            refused.append(f"loss.{k}: checkpoint {_fmt(old_loss[k])}, config {_fmt(now['loss'][k])}")

    handled = {"peft.method", "peft.rank", "peft.alpha", "peft.rslora", "peft.target_modules", "loss.mode",
               "loss.balancer"}
    if old_method != "none":
        handled |= {"model.hf_init", "train.init_checkpoint"}
    old_flat, new_flat = _flat(saved), _flat(now)
    changed = []
    for k in sorted(set(old_flat) | set(new_flat)):
        if k in _IGNORED or k in handled or (k.startswith("model.") and k[6:] in old_arch):
            continue
        if k in old_flat and old_flat.get(k) != new_flat.get(k):
            changed.append(f"{yaml_key(k)} {_fmt(old_flat.get(k))} -> {_fmt(new_flat.get(k))}")
    return refused, changed
