"""Megatron tensors (TP=1 layout, by canonical name) made from a Hugging Face folder, checked
first against the family's weight map: every unknown, missing and mis-shaped tensor is named
before any data is read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_mft.checkpoint.hf.families import SHAPE_SYMBOLS, ConversionError, Family
from megatron_mft.checkpoint.hf.hf_io import HFWeights
from megatron_mft.config import ArchSpec

_MAX_LINES = 40


def _shape_text(shape: tuple, symbols: tuple) -> str:
    return f"{list(shape)} ({' x '.join(symbols)})"


def expected_hf_tensors(family: Family, arch: ArchSpec) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """HF name -> (shape, shape symbols) for every tensor the map reads."""
    out = {}
    for w, layer in family.entries(arch):
        for name, symbols, shape in zip(w.hf_names(layer), w.shapes, w.hf_shapes(arch)):
            out[name] = (shape, symbols)
    return out


def weight_problems(present: dict[str, tuple[int, ...]], family: Family, arch: ArchSpec,
                    aliases: Optional[dict] = None, unused: frozenset = frozenset()) -> list[str]:
    """Unknown, missing and mis-shaped tensors of a checkpoint (name -> shape), one line each;
    ``unused`` names are present but not read (a tied model's stored lm_head)."""
    aliases = aliases or {}
    expected = expected_hf_tensors(family, arch)
    problems = []
    for name, (shape, symbols) in expected.items():
        src = name if name in present else aliases.get(name)
        if src is None or src not in present:
            problems.append(f"missing tensor {name}: expected shape {_shape_text(shape, symbols)}")
        elif tuple(present[src]) != tuple(shape):
            problems.append(f"mis-shaped tensor {src}: has shape {list(present[src])}, expected "
                            f"{_shape_text(shape, symbols)}")
    for name in present:
        known = name in expected or name in aliases.values() or name in unused
        if not known and not family.is_ignored(name):
            problems.append(f"unknown tensor {name} (shape {list(present[name])}): not in the {family.name} "
                            f"weight map")
    return problems


def raise_problems(head: str, problems: list[str], arch: ArchSpec) -> None:
    if not problems:
        return
    shown = problems[:_MAX_LINES]
    if len(problems) > _MAX_LINES:
        shown.append(f"... and {len(problems) - _MAX_LINES} more")
    legend = ", ".join(f"{s}={fn(arch)}" for s, fn in SHAPE_SYMBOLS.items())
    shown.append(f"(shape symbols: {legend}; h=hidden_size, q=heads*head_dim, kv=query_groups*head_dim, "
                 f"f=ffn_hidden_size, v=vocab_size)")
    raise ConversionError(head, shown)


class HFSource:
    """``get(canonical)`` -> the megatron tensor at TP=1, fused from the HF tensors it needs."""

    def __init__(self, hf_dir: str | Path, family: Family, arch: ArchSpec, hf_config: dict):
        self.dir = Path(hf_dir)
        self.family, self.arch = family, arch
        self.weights = HFWeights(hf_dir)
        self.aliases = {}
        tied = bool(hf_config.get("tie_word_embeddings", False))
        if tied and "lm_head.weight" not in self.weights:
            self.aliases["lm_head.weight"] = "model.embed_tokens.weight"  # untied on our side: a copy
        # tied: transformers ties lm_head to the embedding on load; a stored copy is not used
        unused = frozenset({"lm_head.weight"} if arch.tied_embeddings and "lm_head.weight" in self.weights else ())
        raise_problems(f"{self.dir} does not match the {family.name} weight map for this config:",
                       weight_problems(self.weights.shapes, family, arch, self.aliases, unused), arch)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint (that of most of its bytes)."""
        sizes: dict = {}
        for name, shape in self.weights.shapes.items():
            n = 1
            for s in shape:
                n *= s
            sizes[self.weights.dtypes[name]] = sizes.get(self.weights.dtypes[name], 0) + n
        return max(sizes, key=sizes.get)

    def get(self, canonical: str) -> torch.Tensor:
        w, layer = self.family.entry_for(canonical)
        names = w.hf_names(layer)
        tensors = []
        for name, shape in zip(names, w.hf_shapes(self.arch)):
            t = self.weights.get(self.aliases.get(name, name) if name not in self.weights else name)
            if tuple(t.shape) != tuple(shape):  # headers were checked; this guards odd files
                raise ConversionError(f"{self.dir}:", [f"mis-shaped tensor {name}: {list(t.shape)}, "
                                                       f"expected {list(shape)}"])
            tensors.append(t)
        out = w.transform.fuse(tensors, self.arch)
        del tensors
        return out
