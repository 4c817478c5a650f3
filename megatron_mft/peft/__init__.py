"""Adapters inside megatron's tensor-parallel linears: LoRA, QLoRA (NF4 base), merge.

See docs/peft.md. The recipe uses :class:`PeftPlan`; the Hugging Face export uses
:func:`merge_adapters` / :func:`unmerge_adapters` and the naming contract of
:mod:`megatron_mft.peft.layers` (``<path>.weight``, ``<path>.lora_A.weight`` [r, in],
``<path>.lora_B.weight`` [out, r], ``<module>.scaling``).

Names resolve lazily, so ``megatron_mft.peft.memory`` (the estimates) imports without
megatron-core or bitsandbytes.
"""

from importlib import import_module

_EXPORTS = {
    "layers": ["LORA_LAYERS", "AdapterWeight", "LoraColumnParallelLinear", "LoraRowParallelLinear", "adapters_disabled",
               "lora_scaling"],
    "memory": ["MemoryEstimate", "estimate_memory", "lora_params", "lora_params_per_layer", "target_shapes"],
    "nf4": ["NF4_BYTES_PER_PARAM", "NF4Weight", "nf4_linear"],
    "plan": ["PeftPlan", "adapter_spec", "count_parameters", "global_adapter_names", "iter_adapters",
             "load_base_weights", "merge_adapters", "unmerge_adapters"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f"megatron_mft.peft.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_mft.peft' has no attribute {name!r}")
