"""``model.hf_init``: Hugging Face weights straight into this rank's model chunks.

Each rank reads the HF tensors of its own pipeline stage only, fuses them into the TP=1
megatron tensor (one at a time) and copies its tensor-parallel part into the parameter. Which
part is this rank's comes from the chunk's own ``sharded_state_dict()`` (global offsets, the
gated fc1 factory, padded vocabulary rows): exactly the mapping a dist checkpoint load uses, so
``hf_init`` and ``convert hf-to-mcore`` + ``train.init_checkpoint`` give identical weights.

Layers are loaded one at a time through ``load_state_dict``: a QLoRA linear offers a dense
template for its shard only while its layer loads and quantises it on arrival, so no more than
one layer is ever dense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_mft.checkpoint.hf.families import ConversionError
from megatron_mft.checkpoint.hf.hfconfig import check_model_config, read_hf_config
from megatron_mft.checkpoint.hf.mcore_io import _flat, entry_canonical, region, shards_of
from megatron_mft.checkpoint.hf.source import HFSource
from megatron_mft.config import ModelConfig, ParallelConfig


def _adapter_modules(module) -> list:
    try:
        from megatron_mft.peft import iter_adapters
    except ImportError:  # pragma: no cover - peft is part of the package
        return []
    return [m for _, m in iter_adapters([module])]


def load_hf_into_chunks(hf_dir: str | Path, chunks: list, model_cfg: ModelConfig,
                        parallel_cfg: Optional[ParallelConfig] = None) -> None:
    """Fill ``chunks`` (this rank's raw GPTModel chunks, LoRA-wrapped linears allowed) from the
    Hugging Face folder ``hf_dir``. Adapters are left alone. Raises :class:`ConversionError`
    naming every config mismatch or unknown / missing / mis-shaped tensor."""
    hf_cfg = read_hf_config(hf_dir)
    family = check_model_config(model_cfg, hf_cfg, str(hf_dir))
    if parallel_cfg is not None:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != parallel_cfg.tp:
            raise RuntimeError(f"parallel.tp={parallel_cfg.tp} but megatron's parallel state has TP="
                               f"{ps.get_tensor_model_parallel_world_size()}")
    source = HFSource(hf_dir, family, model_cfg.arch(), hf_cfg)
    for chunk in chunks:
        _load_chunk(chunk, source)


def _load_chunk(chunk, source: HFSource) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    decoder = getattr(chunk, "decoder", None)
    n_layers = len(decoder.layers) if decoder is not None else 0
    loaded: set[str] = set()
    for group in [None] + list(range(n_layers)):
        mods = _adapter_modules(decoder.layers[group]) if group is not None else []
        for m in mods:
            m.dense_weight_template = True  # a quantised base offers a dense tensor to load into
        try:
            sd = chunk.sharded_state_dict()
        finally:
            for m in mods:
                m.dense_weight_template = False
        prefix = f"decoder.layers.{group}."
        state = {}
        for key, entry in _flat(sd):
            if isinstance(entry, ShardedObject) or ".lora_" in key or key.endswith("_extra_state"):
                continue
            in_group = key.startswith(prefix) if group is not None else not key.startswith("decoder.layers.")
            if not in_group:  # group None: embedding, final norm, output layer
                continue
            name = entry_canonical(entry)
            try:
                full = source.get(name)
            except KeyError:
                raise ConversionError("the model has a tensor the weight map does not cover:",
                                      [f"{key} (checkpoint name {name})"]) from None
            with torch.no_grad():
                for sh in shards_of(entry):
                    sh.data.copy_(region(full, sh, name))
            del full
            state[key] = entry.data
        del sd
        result = chunk.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"hf_init produced keys the model does not have: {result.unexpected_keys[:8]}")
        loaded |= set(state)
        del state
    expected = {n for n, _ in chunk.named_parameters() if ".lora_" not in n}
    adapters = {id(m) for m in _adapter_modules(chunk)}
    expected |= {f"{n}.weight" for n, m in chunk.named_modules()  # quantised bases: not Parameters
                 if id(m) in adapters and "weight" not in m._parameters}
    missing = sorted(expected - loaded)
    if missing:
        raise ConversionError("hf_init left parameters unset:", missing[:20])
