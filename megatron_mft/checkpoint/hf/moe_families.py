"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) and Qwen3 dense, as data for the
family registry (families.py): the attention part is the shared decoder map, the MLP part maps
megatron's MoE layer (``mlp.router``, ``mlp.experts.{e}.linear_fc1/2`` per routed expert,
``mlp.shared_experts.*``) onto each HF layout, one :class:`ExpertW` per expert tensor."""

from __future__ import annotations

from megatron_mft.checkpoint.hf.families import (
    _ROPE_UNSUPPORTED, _SWIGLU, _SWIGLU_CONSTANTS, ROPE_NESTED, ConfigField, ExpertW, Family, Unsupported, W, _config,
    _decoder_weights)
from megatron_mft.checkpoint.hf.transforms import GATED

L = "model.layers.{}."


def _attention(*, qkv_bias: bool = False, qk_norm: bool = False) -> tuple[W, ...]:
    """The decoder map without its dense MLP linears (norms, attention, embeddings, output)."""
    out = [w for w in _decoder_weights(qkv_bias=qkv_bias) if ".mlp.linear_fc1.weight" not in w.megatron
           and ".mlp.linear_fc2." not in w.megatron]
    if qk_norm:
        out += [W(f"decoder.layers.{{}}.self_attention.{m}_layernorm.weight", (f"{L}self_attn.{m}_norm.weight",),
                  (("d",),)) for m in "qk"]
    return tuple(out)


def _routed(mlp: str, router: str, gate: str, up: str, down: str) -> tuple[W, ...]:
    """Router and per-expert gated MLPs under ``model.layers.N.<mlp>``."""
    E = f"{L}{mlp}.experts.{{e}}."
    return (
        W("decoder.layers.{}.mlp.router.weight", (f"{L}{mlp}.{router}.weight",), (("e", "h"),)),
        ExpertW("decoder.layers.{}.mlp.experts.{e}.linear_fc1.weight", (f"{E}{gate}.weight", f"{E}{up}.weight"),
                (("fe", "h"), ("fe", "h")), GATED),
        ExpertW("decoder.layers.{}.mlp.experts.{e}.linear_fc2.weight", (f"{E}{down}.weight",), (("h", "fe"),)),
    )


def _dense_mlp() -> tuple[W, ...]:
    return tuple(w for w in _decoder_weights() if ".mlp.linear_fc1.weight" in w.megatron
                 or ".mlp.linear_fc2." in w.megatron)


_SHARED_EXPERT = (
    W("decoder.layers.{}.mlp.shared_experts.linear_fc1.weight",
      (f"{L}mlp.shared_expert.gate_proj.weight", f"{L}mlp.shared_expert.up_proj.weight"),
      (("fs", "h"), ("fs", "h")), GATED),
    W("decoder.layers.{}.mlp.shared_experts.linear_fc2.weight", (f"{L}mlp.shared_expert.down_proj.weight",),
      (("h", "fs"),)),
    W("decoder.layers.{}.mlp.shared_experts.gate_weight", (f"{L}mlp.shared_expert_gate.weight",), (("1", "h"),)),
)

#: HF router settings the engine reproduces only at these values
_ROUTING_UNSUPPORTED = (
    Unsupported("decoder_sparse_step", (None, 1), "every layer is an MoE layer (sparse step 1)"),
    Unsupported("mlp_only_layers", (None, []), "dense layers between MoE layers are not mapped"),
    Unsupported("router_jitter_noise", (None, 0, 0.0), "router jitter noise is not implemented"),
)
_SLIDING_UNSUPPORTED = Unsupported("use_sliding_window", (None, False),
                                   "the per-layer sliding window is not implemented")


def _moe_fields(*, experts_key: tuple[str, ...], ffn_key: str, norm_topk) -> tuple[ConfigField, ...]:
    norm = (ConfigField("moe_norm_topk", ("norm_topk_prob",), default=norm_topk) if norm_topk is not None
            else ConfigField("moe_norm_topk", (), default=True))
    return (ConfigField("num_experts", experts_key),
            ConfigField("moe_top_k", ("num_experts_per_tok",)),
            ConfigField("moe_ffn_hidden_size", (ffn_key,)),
            norm)


MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    architecture="MixtralForCausalLM",
    weights=_attention() + _routed("block_sparse_moe", "gate", "w1", "w3", "w2"),
    # Mixtral always renormalises its top-2 probabilities; experts are intermediate_size wide
    config=_config("mixtral", norm_eps="rms_norm_eps", extra=(
        *_SWIGLU_CONSTANTS, ConfigField("sliding_window", ("sliding_window",), default=0, null=0),
        *_moe_fields(experts_key=("num_local_experts",), ffn_key="intermediate_size", norm_topk=None))),
    unsupported=(*_SWIGLU, *_ROUTING_UNSUPPORTED, *_ROPE_UNSUPPORTED),
    nested=ROPE_NESTED,
)

QWEN2_MOE = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    architecture="Qwen2MoeForCausalLM",
    weights=_attention(qkv_bias=True) + _routed("mlp", "gate", "gate_proj", "up_proj", "down_proj") + _SHARED_EXPERT,
    config=_config("qwen2_moe", extra=(
        *_SWIGLU_CONSTANTS, ConfigField("qkv_bias", (), default=True),
        *_moe_fields(experts_key=("num_experts",), ffn_key="moe_intermediate_size", norm_topk=False),
        ConfigField("moe_shared_expert_size", ("shared_expert_intermediate_size",)),
        ConfigField("moe_shared_expert_gate", (), default=True))),
    unsupported=(*_SWIGLU, *_ROUTING_UNSUPPORTED, _SLIDING_UNSUPPORTED, *_ROPE_UNSUPPORTED),
    nested=ROPE_NESTED,
)

_QWEN3_ATTENTION = (
    ConfigField("qk_norm", (), default=True),
    ConfigField("kv_channels", ("head_dim",)),
)
_QWEN3_UNSUPPORTED = (
    Unsupported("attention_bias", (None, False), "Qwen3 with attention_bias is not mapped"),
    _SLIDING_UNSUPPORTED,
)

QWEN3 = Family(
    name="qwen3",
    model_types=("qwen3",),
    architecture="Qwen3ForCausalLM",
    weights=_attention(qk_norm=True) + _dense_mlp(),
    config=_config("qwen3", extra=(*_SWIGLU_CONSTANTS, *_QWEN3_ATTENTION)),
    unsupported=(*_SWIGLU, *_QWEN3_UNSUPPORTED, *_ROPE_UNSUPPORTED),
    nested=ROPE_NESTED,
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architecture="Qwen3MoeForCausalLM",
    weights=_attention(qk_norm=True) + _routed("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
    # transformers' Qwen3MoeConfig defaults norm_topk_prob to False; the released models set true
    config=_config("qwen3_moe", extra=(
        *_SWIGLU_CONSTANTS, *_QWEN3_ATTENTION,  # transformers 5 writes num_local_experts
        *_moe_fields(experts_key=("num_local_experts", "num_experts"), ffn_key="moe_intermediate_size",
                     norm_topk=False))),
    unsupported=(*_SWIGLU, *_QWEN3_UNSUPPORTED, *_ROUTING_UNSUPPORTED, *_ROPE_UNSUPPORTED),
    nested=ROPE_NESTED,
)

MOE_FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3, QWEN3_MOE)
