"""Multi-task data: chat template + loss mask, packing, indexed writer/reader, datasets, sampler.

``MFTData`` is the trainer-facing entry point; on-disk layout: FORMAT.md in this folder.
Exports are lazy so that light users (the preprocessing workers, record validation) do not pay
for importing torch and megatron-core.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MFTData": "megatron_mft.data.mft_data",
    "collate": "megatron_mft.data.collate",
    "Row": "megatron_mft.data.collate",
    "ChatTemplate": "megatron_mft.data.template",
    "ChatFormatter": "megatron_mft.data.template",
    "TEMPLATES": "megatron_mft.data.template",
    "load_tokenizer": "megatron_mft.data.tokenizer",
    "Tokenizer": "megatron_mft.data.tokenizer",
    "EpochSampler": "megatron_mft.data.sampler",
    "pack": "megatron_mft.data.packing",
    "DataError": "megatron_mft.data.records",
    "preprocess": "megatron_mft.data.preprocess",
    "PreprocessArgs": "megatron_mft.data.preprocess",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_mft.data' has no attribute {name!r}")
