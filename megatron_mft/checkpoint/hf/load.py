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
from megatron_mft.checkpoint.hf.mcore_io import entry_canonical, region, shards_of
from megatron_mft.checkpoint.hf.source import HFSource
from megatron_mft.peft.layerwise import base_templates, load_group
from megatron_mft.config import ModelConfig, ParallelConfig


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
    """Every base entry of the chunk (``base_templates`` walks them all) gets its HF tensor; a
    name the weight map or the HF files lack raises."""
    for template in base_templates(chunk):
        state = {}
        for key, entry in template.items():
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
        del template
        load_group(chunk, state, "hf_init")
        del state
