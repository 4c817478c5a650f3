"""Hugging Face interop: Llama-family weight maps, streaming conversion both ways, adapter
export, training-time ``model.hf_init`` loading. CLI: ``python -m megatron_mft.convert``;
docs/conversion.md.

Modules: ``families`` (declarative maps + registry), ``transforms`` (row layouts), ``hf_io``
(safetensors/bin reading and sharded writing), ``mcore_io`` (dist checkpoint template, streaming
writer and reader), ``source`` (HF -> megatron tensors with checks), ``load`` (``hf_init``),
``hf_to_mcore`` / ``mcore_to_hf`` (the two conversions), ``verify`` (logit parity).
"""

from megatron_mft.checkpoint.hf.families import FAMILIES, ConversionError, Family, W, family_for
from megatron_mft.checkpoint.hf.load import load_hf_into_chunks

__all__ = ["ConversionError", "FAMILIES", "Family", "W", "family_for", "load_hf_into_chunks"]
