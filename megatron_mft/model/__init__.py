"""Llama / CodeLlama graph on megatron-core: specs (packed attention) and the model builder."""

from megatron_mft.model.attention import MFTPackedSeqParams, PackedCoreAttention, build_packed_seq_params
from megatron_mft.model.builder import build_model_chunks, padded_vocab_size, transformer_config
from megatron_mft.model.placement import check_placement, misplaced_tensors
from megatron_mft.model.specs import attention_backend, kernels_line, layer_spec

__all__ = ["MFTPackedSeqParams", "PackedCoreAttention", "attention_backend", "build_model_chunks",
           "build_packed_seq_params", "check_placement", "kernels_line", "layer_spec", "misplaced_tensors",
           "padded_vocab_size", "transformer_config"]
