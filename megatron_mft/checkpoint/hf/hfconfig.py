"""config.json <-> our ModelConfig, with field-by-field checks against a preset."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

from megatron_mft.checkpoint.hf.families import ConversionError, Family, family_for
from megatron_mft.config import PRESETS, ArchSpec, ModelConfig

#: Files from which transformers' AutoTokenizer builds a tokenizer (any one of them; the others
#: of TOKENIZER_FILES configure it).
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
#: Files copied along with the weights in both directions (those present).
TOKENIZER_FILES = TOKENIZER_MODEL_FILES + ("merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                                           "added_tokens.json", "generation_config.json", "chat_template.jinja")


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model folder:", [f"{path} does not exist"])
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSON syntax or encoding
        raise ConversionError(f"{path} is not valid JSON:", [str(e)]) from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} is not a Hugging Face config:", ["expected a JSON object"])
    return cfg


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def arch_mismatches(arch: ArchSpec, fields: dict, family: Family, what: str) -> list[str]:
    """One line per ArchSpec field where ``arch`` and the config.json values differ, compared as
    the values they stand for (``ArchSpec.effective``: llama3's rope_original_max_positions 0 is
    the 8192 an export writes)."""
    hf_key = {f.arch: f.hf[0] if f.hf else f"({family.name} family)" for f in family.config}
    ours, theirs = arch.effective(), dataclasses.replace(arch, **fields).effective()
    return [f"{name}: {what} has {getattr(ours, name)!r}, config.json {hf_key.get(name, name)} has "
            f"{getattr(theirs, name)!r}" for name in fields if not _same(getattr(ours, name), getattr(theirs, name))]


def arch_fields(hf_cfg: dict, family: Family, source: str) -> dict:
    fields, problems = family.arch_fields(hf_cfg)
    if problems:
        raise ConversionError(f"{source}/config.json cannot be converted:", problems)
    return fields


def model_config_from_hf(hf_cfg: dict, preset: Optional[str] = None, source: str = "<hf>") -> ModelConfig:
    """Our model section for a config.json.

    With ``preset`` the preset must match config.json in every architecture field (all
    mismatches are listed). Without, a preset that matches exactly is named; otherwise the
    config is ``tiny`` with every architecture field overridden (the base preset is then
    irrelevant)."""
    family = family_for(hf_cfg)
    fields = arch_fields(hf_cfg, family, source)
    if preset is not None:
        if preset not in PRESETS:
            raise ConversionError("unknown preset:", [f"--preset {preset!r}; known: {', '.join(PRESETS)}"])
        bad = arch_mismatches(PRESETS[preset], fields, family, f"preset {preset}")
        if bad:
            raise ConversionError(f"--preset {preset} does not match {source}/config.json:", bad)
        return ModelConfig(preset=preset)
    for name, spec in PRESETS.items():
        if not arch_mismatches(spec, fields, family, name):
            return ModelConfig(preset=name)
    cfg = ModelConfig(preset="tiny", **fields)
    problems = cfg.validate()
    if problems:
        raise ConversionError(f"{source}/config.json describes an architecture the engine cannot build:", problems)
    return cfg


def check_model_config(model_cfg: ModelConfig, hf_cfg: dict, source: str) -> Family:
    """Raise listing every field where the run's model config and config.json disagree."""
    family = family_for(hf_cfg)
    fields = arch_fields(hf_cfg, family, source)
    bad = arch_mismatches(model_cfg.arch(), fields, family, f"model config (preset {model_cfg.preset})")
    if bad:
        raise ConversionError(f"the model config does not match {source}/config.json:", bad)
    return family


def model_section(cfg: ModelConfig) -> dict:
    """The non-default architecture part of a ModelConfig, as it goes in a run YAML."""
    from dataclasses import fields

    out = {"preset": cfg.preset}
    for f in fields(ArchSpec):
        value = getattr(cfg, f.name, None)
        if value is not None:
            out[f.name] = value
    return out
