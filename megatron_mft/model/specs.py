"""The one place where transformer submodules are chosen.

* Transformer Engine importable on CUDA -> megatron-core's TE spec (fused norm+linear, TE
  attention, which handles packed THD sequences itself).
* Otherwise -> megatron-core's local spec with two slots swapped: ``core_attention`` becomes
  :class:`PackedCoreAttention` (flash-attn varlen or torch SDPA, packed-aware), and the norms
  become our :class:`RMSNorm` (torch's fused ``rms_norm``), which also works with sequence
  parallelism. (megatron's apex ``FusedLayerNorm`` is LayerNorm only: it refuses RMSNorm.)

PEFT swaps the linear slots of the layer spec returned here (see megatron_mft.peft).
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mft.compat import Environment
from megatron_mft.config import ModelConfig
from megatron_mft.errors import UsageError
from megatron_mft.model.attention import PackedCoreAttention
from megatron_mft.model.norm import NORMS


def attention_kernel(module, packed: bool, env: Environment) -> str | None:
    """The kernel one core-attention module runs for this batching mode (None: not attention).
    ``PackedCoreAttention`` calls flash-attn only for packed (THD) batches on CUDA; one sample
    per row (dynamic padding) always goes to causal SDPA."""
    if isinstance(module, PackedCoreAttention):
        if packed and module.use_flash and env.cuda:
            return "flash-attn varlen (packed)"
        return "torch SDPA (packed, causal per document)" if packed else "torch SDPA (dynamic padding, causal)"
    if type(module).__name__ == "TEDotProductAttention":
        return f"TE attention ({'packed THD' if packed else 'SBHD, dynamic padding'})"
    return None


def rope_kernel(packed: bool) -> str:
    """What megatron's fused-RoPE slot for this batching mode holds: TE's kernel, or the torch
    tables of megatron_mft.model.rope (used when ``apply_rope_fusion`` is set)."""
    from megatron.core.models.common.embeddings import rope_utils

    fn = rope_utils.fused_apply_rotary_pos_emb_thd if packed else rope_utils.fused_apply_rotary_pos_emb
    return "TE fused RoPE" if "transformer_engine" in getattr(fn, "__module__", "") else "torch RoPE tables"


def _torch_swiglu_installed() -> bool:
    """Without CUDA megatron's fused bias+SwiGLU slot holds a plain torch SwiGLU (model/swiglu.py)."""
    from megatron.core.transformer import mlp

    from megatron_mft.model.swiglu import bias_swiglu

    return getattr(mlp, "bias_swiglu_impl", None) is bias_swiglu


def kernels_line(chunks: list, env: Environment, *, packed: bool) -> str:
    """One log line naming the kernels the built model actually runs for this batching mode
    (``packed``: THD packs; else one sample per row), read off its modules and its
    TransformerConfig, so it cannot drift from the spec and builder choices."""
    mods = [m for c in chunks for m in c.modules()]
    cfg = chunks[0].config
    attention = sorted({k for k in (attention_kernel(m, packed, env) for m in mods) if k})
    on = {
        "transformer-engine layers": any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine")
                                         for m in mods),
        **{f"{a} attention": True for a in attention},
        rope_kernel(packed): cfg.apply_rope_fusion,
        "torch SwiGLU in megatron's fused slot": cfg.bias_activation_fusion and _torch_swiglu_installed(),
        "fused bias+activation/dropout": (cfg.bias_activation_fusion and not _torch_swiglu_installed())
                                         or cfg.bias_dropout_fusion,
        "gradient-accumulation fusion": cfg.gradient_accumulation_fusion,
        "fused Adam (TE or apex)": env.te or env.apex,
    }
    return f"device={env.device_name} kernels: {', '.join(k for k, v in on.items() if v) or 'none'}"


def attention_backend(model: ModelConfig, env: Environment, *, local_only: bool = False) -> str:
    """Resolve ``model.attention_backend`` ("auto" | "te" | "flash" | "sdpa") for this machine and
    precision; ``local_only``: a backend of the local spec (PEFT's layers), flash or SDPA in place
    of TE. flash-attn takes only fp16/bf16, so fp32 never gets it (an explicit ``flash`` with
    ``fp32`` is refused by ``ModelConfig.validate``)."""
    requested = model.attention_backend
    if requested == "te" and not env.te:
        raise UsageError("model.attention_backend=te but Transformer Engine is not usable here (needs CUDA + TE); "
                         "use auto (TE where it is usable) or sdpa")
    if requested == "flash" and not env.flash_attn:
        raise UsageError("model.attention_backend=flash but flash-attn is not installed (or no CUDA); "
                         "use auto (flash-attn where it is usable) or sdpa")
    if requested == "auto" or (requested == "te" and local_only):
        if env.te and not local_only:
            return "te"
        return "flash" if env.flash_attn and model.precision != "fp32" else "sdpa"
    return requested


def layer_spec(backend: str, normalization: str = "RMSNorm", arch=None) -> ModuleSpec:
    """Spec of one decoder layer for ``backend``; biases, MLP gating and the window come from the
    TransformerConfig, the norm class from ``normalization`` (TE reads it from the config).
    ``arch`` with experts or QK-norm: megatron's MoE layer spec (model/moe.py)."""
    if arch is not None and (arch.num_experts or arch.qk_norm):
        from megatron_mft.model.moe import moe_local_layer_spec, moe_te_layer_spec

        if backend == "te":
            return moe_te_layer_spec(arch)
        return moe_local_layer_spec(arch, NORMS, ModuleSpec(module=PackedCoreAttention,
                                                            params={"use_flash": backend == "flash"}))
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    sub = spec.submodules
    sub.input_layernorm = NORMS[normalization]
    sub.pre_mlp_layernorm = NORMS[normalization]
    sub.self_attention.submodules.core_attention = ModuleSpec(
        module=PackedCoreAttention, params={"use_flash": backend == "flash"}
    )
    # The local spec maps norm keys onto TE's fused names for checkpoint compatibility with the
    # TE spec; keep that so a checkpoint moves between GPU (TE) and CPU (local) runs (TE's
    # `_extra_state` entries, absent from local checkpoints, are skipped by the dist load).
    return spec


def block_spec(config: TransformerConfig, backend: str, vp_stage: Optional[int] = None,
               layer: Optional[ModuleSpec] = None) -> ModuleSpec:
    """Spec of this pipeline stage's decoder block (its layers and the final norm)."""
    layer = layer or layer_spec(backend, config.normalization)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = NORMS[config.normalization]
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm))
