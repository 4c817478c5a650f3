"""Model architecture: a preset name plus optional per-field overrides."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Literal, Optional

from megatron_mft.config.base import PATH
from megatron_mft.config.presets import PRESETS, ArchSpec


@dataclass
class ModelConfig:
    """Which architecture to build. Unset fields come from ``preset``."""

    #: not a config key: False where a tool's attention applies no RoPE (``tool_config(..., rope=False)``),
    #: so that RoPE's even-head-size rule is not checked
    applies_rope: ClassVar[bool] = True

    preset: str = "tiny"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rotary_base: Optional[float] = None
    norm_epsilon: Optional[float] = None
    qkv_bias: Optional[bool] = None
    linear_bias: Optional[bool] = None
    normalization: Optional[Literal["RMSNorm", "LayerNorm"]] = None
    activation: Optional[Literal["swiglu", "gelu_tanh"]] = None
    tied_embeddings: Optional[bool] = None
    rope_type: Optional[Literal["default", "linear", "llama3", "yarn"]] = None
    rope_factor: Optional[float] = None
    rope_original_max_positions: Optional[int] = None
    sliding_window: Optional[int] = None
    family: Optional[str] = None
    kv_channels: Optional[int] = None
    qk_norm: Optional[bool] = None
    num_experts: Optional[int] = None
    moe_top_k: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_norm_topk: Optional[bool] = None
    moe_shared_expert_size: Optional[int] = None
    moe_shared_expert_gate: Optional[bool] = None
    #: MoE router losses, added once per step outside the task weighting (docs/moe.md)
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0
    #: expert capacity = factor x tokens x top_k / experts; null = no token dropping
    moe_capacity_factor: Optional[float] = None
    #: megatron's token dispatcher between expert-parallel ranks
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    init_method_std: float = 0.02
    #: "auto" picks bf16 on CUDA, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    #: Activation recompute: none, selective (core attention) or full (whole layers).
    recompute: Literal["none", "selective", "full"] = "none"
    #: Core attention: auto = TE if importable on CUDA, else flash-attn varlen, else torch SDPA.
    attention_backend: Literal["auto", "te", "flash", "sdpa"] = "auto"
    #: Hugging Face folder to initialise weights from at start (see megatron_mft.checkpoint.hf).
    hf_init: Optional[str] = field(default=None, metadata=PATH)

    def arch(self) -> ArchSpec:
        """The preset with this config's overrides applied."""
        base = PRESETS[self.preset]
        overrides = {f.name: getattr(self, f.name) for f in fields(ArchSpec) if getattr(self, f.name, None) is not None}
        return replace(base, **overrides)

    def warnings(self) -> list[str]:
        """Settings made in this config (not the preset's) that the architecture does not read:
        MoE settings on a dense model, RoPE scaling settings the rope_type ignores. Valid config only.
        (Overrides that make the preset's model another family's: the training preflight.)"""
        arch, neutral = self.arch(), {f.name: f.default for f in fields(ArchSpec)}
        unset = ModelConfig()

        def changed(names):
            return [n for n in names if getattr(self, n) is not None and getattr(self, n) != neutral.get(
                n, getattr(unset, n))]

        w = []
        moe = changed([f.name for f in fields(self) if f.name.startswith("moe_")])
        if moe and not arch.num_experts:
            w.append(f"model.{', model.'.join(moe)} set, but the model is dense (num_experts 0): no effect "
                     f"(set model.num_experts for a mixture of experts)")
        rope = changed(["rope_factor", "rope_original_max_positions"] if arch.rope_type == "default"
                       else ["rope_original_max_positions"] if arch.rope_type == "linear" else [])
        if rope:
            w.append(f"model.{', model.'.join(rope)} set, but rope_type is {arch.rope_type}: no effect (" + (
                "RoPE scaling needs model.rope_type linear, llama3 or yarn)" if arch.rope_type == "default"
                else "only llama3 and yarn read it)"))
        return w

    def validate(self) -> list[str]:
        if self.preset not in PRESETS:
            return [f"model.preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}"]
        problems = [f"model.{p}" for p in self.arch().problems(rope=self.applies_rope)]
        if self.attention_backend == "flash" and self.precision == "fp32":
            problems.append("model.attention_backend: flash-attn computes only in fp16/bf16, but model.precision is "
                            "fp32; use precision bf16 (or auto: bf16 on a GPU), or attention_backend sdpa or auto "
                            "(auto never picks flash-attn for fp32)")
        if self.moe_aux_loss_coeff < 0 or self.moe_z_loss_coeff < 0:
            problems.append("model.moe_aux_loss_coeff / moe_z_loss_coeff: must be >= 0")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            problems.append("model.moe_capacity_factor: must be > 0 or null (null = no token dropping)")
        if not self.init_method_std > 0:
            problems.append(f"model.init_method_std: must be > 0, got {self.init_method_std}")
        return problems
