"""Hugging Face folder -> megatron dist checkpoint, streaming (``convert hf-to-mcore``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_mft.checkpoint.described import CONVERSION_FILE
from megatron_mft.checkpoint.hf.families import ConversionError, family_for
from megatron_mft.errors import UserError
from megatron_mft.checkpoint.hf.hf_io import copy_files
from megatron_mft.checkpoint.hf.hfconfig import TOKENIZER_FILES, model_config_from_hf, model_section, read_hf_config
from megatron_mft.checkpoint.hf.mcore_io import build_template, write_dist_checkpoint
from megatron_mft.checkpoint.hf.source import HFSource
from megatron_mft.config import ArchSpec
from megatron_mft.config.base import to_dict
from megatron_mft.config.parallel import layout_problems

#: Written beside the weights: what the checkpoint is and where it came from.
#: Tokenizer files travel in this subfolder (usable as ``data.tokenizer``).
TOKENIZER_DIR = "tokenizer"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def staged_output(out: Path):
    """Write a conversion into a hidden sibling ``.NAME.partial`` and rename it to ``out`` at the
    end: a failed or killed conversion never leaves a half-written ``out`` that blocks the retry
    (the retry replaces a stale ``.partial``, which only conversions create). ``out`` must be new
    or empty (checked by the caller)."""
    out = Path(out).absolute()
    tmp = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:  # the conversion is complete: never delete it if only the final rename fails
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # empty (checked before the conversion started)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"--out {out}: the finished conversion could not be moved there "
                              f"({e.strerror or e}); it is complete in {tmp}: move it by hand") from None


def check_map_covers_template(template_names: list[str], family, arch: ArchSpec) -> None:
    """The weight map and the megatron model must name the same tensors (a code-level invariant)."""
    mapped = {w.megatron_name(layer) for w, layer in family.entries(arch)}
    model = set(template_names)
    problems = [f"megatron tensor {n} has no entry in the {family.name} weight map" for n in sorted(model - mapped)]
    problems += [f"weight-map entry {n} is not a tensor of the megatron model" for n in sorted(mapped - model)]
    if problems:
        raise ConversionError("weight map and megatron model disagree:", problems)


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, preset: Optional[str] = None, tp: int = 1,
                        pp: int = 1, dtype: Optional[str] = None, dry_run: bool = False,
                        log: Callable[[str], None] = print, ep: int = 1) -> dict:
    """Needs torch.distributed + megatron parallel state at TP=1/PP=1 in this process (one process
    writes the whole checkpoint; the output loads into any layout). Returns the metadata written."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_cfg = read_hf_config(hf_dir)
    family = family_for(hf_cfg)
    model_cfg = model_config_from_hf(hf_cfg, preset, source=str(hf_dir))
    arch = model_cfg.arch()
    bad = ([f"--tp {tp} --pp {pp} --ep {ep}: must be >= 1"] if min(tp, pp, ep) < 1
           else layout_problems(arch, tp, pp, tp_name="--tp", pp_name="--pp", ep=ep, ep_name="--ep"))
    if bad:
        raise ConversionError("the requested layout does not fit the model:", bad)
    if not dry_run and out.exists() and any(out.iterdir()):
        raise ConversionError("refusing to write into a non-empty folder:", [str(out)])
    source = HFSource(hf_dir, family, arch, hf_cfg)
    target = DTYPES[dtype] if dtype else source.dtype()
    template = build_template(model_cfg)
    check_map_covers_template(template.names(), family, arch)
    meta = {
        "format": "megatron-mft hf-to-mcore", "version": 1, "family": family.name,
        "model": model_section(model_cfg), "arch": to_dict(arch),
        "dtype": str(target).replace("torch.", ""),
        "layout": {"tp": tp, "pp": pp, "ep": ep,
                   "saved_as": "tp=1 pp=1 ep=1 (megatron reshards to any TP/PP/EP on load)"},
        "source": {"hf_dir": str(hf_dir.resolve()), "format": source.weights.format,
                   "files": sorted({p.name for p in source.weights.files.values()}),
                   "tensors": len(source.weights.files)},
        "hf_config": hf_cfg,
    }
    log(f"{hf_dir}: {family.name}, {len(source.weights.files)} tensors in {len(meta['source']['files'])} "
        f"file(s) -> model {meta['model']} ({arch.num_params() / 1e9:.2f}B params), {meta['dtype']}")
    if dry_run:
        log("dry run: config, tensor names and shapes check out; nothing written")
        return meta
    t0 = time.time()
    done = [0]
    n = len(template.names())

    def progress(name: str) -> None:
        done[0] += 1
        if done[0] == n or done[0] % max(1, n // 10) == 0:
            log(f"  {done[0]}/{n} tensors ({time.time() - t0:.0f}s) {name}")

    with staged_output(out) as tmp:
        nbytes = write_dist_checkpoint(tmp, template, source.get, target, on_tensor=progress)
        meta["bytes"] = nbytes
        meta["tokenizer_files"] = copy_files(hf_dir, tmp / TOKENIZER_DIR, TOKENIZER_FILES)
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (tmp / CONVERSION_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    log(f"wrote {out} ({nbytes / 1e9:.2f} GB, {time.time() - t0:.0f}s); train from it with "
        f"train.init_checkpoint={out} and model: {json.dumps(meta['model'])}")
    return meta
