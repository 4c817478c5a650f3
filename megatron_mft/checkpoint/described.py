"""What a checkpoint folder says it holds. Three writers describe their folders in a JSON file:
training (``run.json``: the run's config, its PEFT method, data manifest), ``convert hf-to-mcore``
(``conversion.json``: the model section, the HF config it came from) and ``checkpoint init``
(``init.json``: the model section). Read by the HF export and by the preflight of
``train.init_checkpoint``. :func:`run_relative_paths`: where a relative path in a run's config
(its base model, its tokenizer) may be, seen from another working folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_mft.config import ModelConfig, PeftConfig
from megatron_mft.config.base import load_dataclass

RUN_FILE, CONVERSION_FILE, INIT_FILE = "run.json", "conversion.json", "init.json"


@dataclass
class Described:
    file: Path
    #: the file's JSON
    meta: dict
    model: ModelConfig
    #: the run's peft section (training checkpoints; the default elsewhere)
    peft: PeftConfig

    @property
    def peft_method(self) -> str:
        """none, or lora / qlora for a training step of an adapter run (run.json records it twice)."""
        return (self.meta.get("peft") or self.peft.method) if self.file.name == RUN_FILE else "none"

    @property
    def adapters(self) -> bool:
        """A training step of a LoRA/QLoRA run: it holds the adapters only."""
        return self.peft_method != "none"


def read_description(folder: str | Path) -> Optional[Described]:
    """The folder's description, or None when it has none (a checkpoint of an older version, or not
    a checkpoint). An unreadable file raises OSError / ValueError / KeyError / ConfigError."""
    for name in (CONVERSION_FILE, RUN_FILE, INIT_FILE):
        file = Path(folder) / name
        if file.is_file():
            break
    else:
        return None
    meta = json.loads(file.read_text(encoding="utf-8"))
    cfg = (meta.get("config") or {}) if name == RUN_FILE else meta
    model = load_dataclass(ModelConfig, cfg["model"] if name != RUN_FILE else cfg.get("model", {}), source=str(file))
    peft = load_dataclass(PeftConfig, cfg.get("peft", {}) if name == RUN_FILE else {}, source=str(file))
    return Described(file=file, meta=meta, model=model, peft=peft)


def run_relative_paths(named: str, step_dir: Path, config: dict) -> list[Path]:
    """Where a path named in a run's config may be now: as named (absolute, or relative to this
    process's working folder), then relative to the run's own working folder, derived from a
    relative ``output_dir`` that ends ``step_dir``'s path (``<output_dir>/checkpoints/step_N``).
    A run started in ~/work with ``model.hf_init=models/base output_dir=runs/a`` and exported from
    elsewhere finds ~/work/models/base."""
    path = Path(os.path.expanduser(named))
    found = [path.absolute()]
    out_dir = config.get("output_dir")
    if not path.is_absolute() and isinstance(out_dir, str) and out_dir and not os.path.isabs(out_dir):
        parts = Path(os.path.normpath(out_dir)).parts
        root = Path(step_dir).absolute().parent.parent.parts  # <output_dir>/checkpoints/step_N -> output_dir
        if ".." not in parts and len(root) > len(parts) and root[-len(parts):] == parts:
            found.append(Path(*root[: -len(parts)]) / path)
    return found


def first_existing(paths: list[Path]) -> Path:
    """The first of ``paths`` that exists, else the first (whose absence the caller reports)."""
    return next((p for p in paths if p.exists()), paths[0])
