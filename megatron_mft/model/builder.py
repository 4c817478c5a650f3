"""Build megatron-core GPTModel chunks for an ArchSpec (Llama, Qwen2, Mistral, StarCoder2 graphs),
each family difference through megatron's own TransformerConfig / GPTModel options."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mft.compat import Environment
from megatron_mft.config import ArchSpec, ModelConfig, ParallelConfig
from megatron_mft.model.moe import moe_config_kwargs, sum_expert_grads_over_tp
from megatron_mft.model.linear import install_torch_linear
from megatron_mft.model.rope import install_torch_rope
from megatron_mft.model.swiglu import install_torch_swiglu
from megatron_mft.model.yarn import yarn_attention_factor, yarn_inv_freq
from megatron_mft.model.specs import attention_backend, block_spec, layer_spec

log = logging.getLogger(__name__)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (HF ``gelu_pytorch_tanh``, StarCoder2's MLP)."""
    return F.gelu(x, approximate="tanh")


#: ArchSpec.activation -> megatron's activation_func (swiglu = gated_linear_unit + silu)
ACTIVATIONS = {"swiglu": F.silu, "gelu_tanh": gelu_tanh}


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Pad only as much as tensor parallelism needs, so HF vocabularies (32016) stay exact."""
    return -(-vocab_size // tp) * tp


def resolve_dtype(precision: str, env: Environment) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if env.cuda else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def transformer_config(arch: ArchSpec, model: ModelConfig, parallel: ParallelConfig,
                       env: Environment) -> TransformerConfig:
    dtype = resolve_dtype(model.precision, env)
    if not env.cuda:  # F.linear for megatron's forward GEMM: the same bits, faster on the CPU
        install_torch_linear()
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        add_bias_linear=arch.linear_bias,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=arch.gated,
        activation_func=ACTIVATIONS[arch.activation],
        # megatron fuses bias+swiglu, and bias+GELU only for exact F.gelu (not the tanh form);
        # without CUDA a torch SwiGLU fills the slot (megatron_mft.model.swiglu; dense models)
        bias_activation_fusion=arch.gated and (env.cuda or (not arch.num_experts and install_torch_swiglu())),
        # (left, right) tokens around the query: HF's window counts the query itself
        window_size=(arch.sliding_window - 1, 0) if arch.sliding_window else None,
        # YaRN's attention factor on q and k (model/yarn.py); None = 1/sqrt(head_dim)
        softmax_scale=(yarn_attention_factor(arch.rope_factor) ** 2 / arch.head_dim ** 0.5
                       if arch.rope_type == "yarn" else None),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_stages,
        sequence_parallel=parallel.sp,
        context_parallel_size=parallel.cp,
        cp_comm_type=parallel.cp_comm_type,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # Fused kernels only where they exist; on CPU these raise (shared doc).
        apply_rope_fusion=install_torch_rope(),  # TE's fused RoPE, else megatron_mft.model.rope
        gradient_accumulation_fusion=env.apex,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=env.cuda,
        use_cpu_initialization=not env.cuda,
        # Our loss returns each micro batch's exact share of the global loss: sum, don't average.
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=env.cuda,
        # Interleaved schedule with pp=2: the previous and next stage are the same rank, and a
        # batched isend/irecv can pair an activation with a gradient (seen on gloo). The unbatched
        # path orders the two directions by rank parity on separate groups.
        batch_p2p_comm=not (parallel.pp == 2 and (parallel.vpp or 1) > 1),
        **recompute[model.recompute],
        **moe_config_kwargs(arch, model, parallel, env.cuda),
    )


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, env: Environment, *,
                       layer: Optional[ModuleSpec] = None) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage). ``layer`` overrides the layer
    spec (PEFT passes a spec with adapter linears)."""
    arch = model.arch()
    cfg = transformer_config(arch, model, parallel, env)
    backend = attention_backend(model, env)
    layer = layer or layer_spec(backend, arch.normalization, arch)
    vpp = cfg.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = GPTModel(
            config=cfg,
            transformer_layer_spec=block_spec(cfg, backend, stage, layer),
            vocab_size=padded_vocab_size(arch.vocab_size, parallel.tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rotary_base,
            rope_scaling=arch.rope_type == "llama3",
            rope_scaling_factor=arch.rope_factor,
            seq_len_interpolation_factor=arch.rope_factor if arch.rope_type == "linear" else None,
            vp_stage=stage,
        )
        if arch.rope_type == "yarn":  # frequencies as transformers computes them (model/yarn.py)
            chunk.rotary_pos_emb.inv_freq = yarn_inv_freq(arch.head_dim, arch.rotary_base, arch.rope_factor,
                                                          arch.rope_original_max_positions,
                                                          device=chunk.rotary_pos_emb.inv_freq.device)
        chunks.append(chunk)
    sum_expert_grads_over_tp(chunks, parallel)
    return chunks
