"""Adapters inside megatron's tensor-parallel linears: LoRA, QLoRA (NF4 base), merge.

See docs/peft.md. The recipe uses :class:`PeftPlan`; the Hugging Face export uses
:func:`merge_adapters` / :func:`unmerge_adapters` and the naming contract of
:mod:`megatron_mft.peft.layers` (``<path>.weight``, ``<path>.lora_A.weight`` [r, in],
``<path>.lora_B.weight`` [out, r], ``<module>.scaling``).
"""

from megatron_mft.peft.layers import (LORA_LAYERS, AdapterWeight, LoraColumnParallelLinear, LoraRowParallelLinear,
                                      lora_scaling)
from megatron_mft.peft.memory import (MemoryEstimate, estimate_memory, lora_params, lora_params_per_layer,
                                      target_shapes)
from megatron_mft.peft.nf4 import NF4_BYTES_PER_PARAM, NF4Weight, nf4_linear
from megatron_mft.peft.plan import (PeftPlan, adapter_spec, count_parameters, global_adapter_names, iter_adapters,
                                    load_base_weights, merge_adapters, unmerge_adapters)

__all__ = [
    "AdapterWeight", "LORA_LAYERS", "LoraColumnParallelLinear", "LoraRowParallelLinear", "MemoryEstimate",
    "NF4Weight", "NF4_BYTES_PER_PARAM", "PeftPlan", "adapter_spec", "count_parameters", "estimate_memory",
    "global_adapter_names", "iter_adapters", "load_base_weights", "lora_params", "lora_params_per_layer",
    "lora_scaling", "merge_adapters", "nf4_linear", "target_shapes", "unmerge_adapters",
]
