"""Mixture-of-experts on megatron-core's own MoE layer (router, token dispatcher, experts).

What this module decides, and why:

* The TransformerConfig fields of an MoE ArchSpec (:func:`moe_config_kwargs`): top-k routing
  with megatron's router. HF's "softmax over all experts, then top-k, then renormalise"
  (Mixtral, Qwen3-MoE ``norm_topk_prob``) equals megatron's default "top-k of the logits, then
  softmax over those k"; Qwen2-MoE without renormalisation is megatron's ``pre_softmax``.
* The experts: megatron's SequentialMLP on the local spec (CPU, tests), its grouped GEMM
  (TEGroupedMLP) on the Transformer Engine spec; both write the same checkpoint layout
  (one tensor per expert weight with an expert axis), which reshards over ``parallel.ep``.
* Router losses (load balancing, z-loss) are megatron's; they reach the gradient through its
  ``MoEAuxLossAutoScaler``. Megatron scales them for its own per-token normalisation, which
  this project does not use (our micro-batch losses are exact shares of the global loss), so
  :func:`set_router_loss_scale` makes them count *once per step*: the step's router objective is
  ``coeff x sum over MoE layers of the layer's loss, averaged over micro batches and DP ranks``.
* :class:`RouterLoad` reads per-expert token counts off the routers (forward hooks) and the
  per-layer losses off megatron's aux-loss tracker, for metrics.jsonl.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from megatron_mft.config import ArchSpec, ModelConfig, ParallelConfig

def _fix_megatron_moe_off_cuda() -> None:
    """Two spots where megatron-core 0.16's MoE code assumes CUDA + Transformer Engine:
    its router GEMM reads ``te_general_gemm``, a name moe_utils defines only when TE imports
    (defined here as "absent", so the torch path runs); and the alltoall dispatcher's split
    sizes become host lists only when they start on the GPU (``maybe_move_tensor_to_cpu``), so
    on CPU torch's ``all_to_all_single`` got tensors; a host tensor asked for ``as_numpy`` is
    now converted too. CUDA tensors take megatron's own path unchanged."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_mft_host_numpy", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._mft_host_numpy = True
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


_fix_megatron_moe_off_cuda()

ROUTER_LOSS_NAMES = {"load_balancing_loss": "router_aux_loss", "z_loss": "router_z_loss"}


def moe_config_kwargs(arch: ArchSpec, model: ModelConfig, parallel: ParallelConfig, cuda: bool) -> dict:
    """TransformerConfig fields for an MoE arch ({} for a dense one)."""
    out = {"qk_layernorm": arch.qk_norm}
    if not arch.num_experts:
        return out
    aux = model.moe_aux_loss_coeff
    out.update(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_top_k,
        moe_ffn_hidden_size=arch.expert_ffn,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.moe_norm_topk,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=model.moe_z_loss_coeff or None,
        moe_expert_capacity_factor=model.moe_capacity_factor,
        moe_token_dispatcher_type=model.moe_token_dispatcher,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_size or None,
        moe_shared_expert_gate=arch.moe_shared_expert_gate,
        moe_grouped_gemm=cuda and _grouped_gemm_available(),
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
        moe_permute_fusion=False,
    )
    return out


def _grouped_gemm_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def moe_local_layer_spec(arch: ArchSpec, norms: dict, core_attention) -> Optional["ModuleSpec"]:
    """megatron's local decoder-layer spec with its MoE MLP (SequentialMLP experts), our norms
    (input, pre-MLP, and QK-norm) and our packed-aware core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=arch.num_experts or None, moe_grouped_gemm=False,
                                                  qk_layernorm=arch.qk_norm, normalization=arch.normalization))
    sub = spec.submodules
    norm = norms[arch.normalization]
    sub.input_layernorm = norm
    sub.pre_mlp_layernorm = norm
    attn = sub.self_attention.submodules
    attn.core_attention = core_attention
    if arch.qk_norm:
        attn.q_layernorm = norm
        attn.k_layernorm = norm
    return spec


def moe_te_layer_spec(arch: ArchSpec):
    """Transformer Engine spec with grouped-GEMM experts (GPU)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(num_experts=arch.num_experts or None, moe_grouped_gemm=True,
                                                      qk_layernorm=arch.qk_norm)


def sum_expert_grads_over_tp(chunks: list, parallel: ParallelConfig) -> None:
    """At EP=1 megatron marks expert weights as ordinary data-parallel weights (``allreduce``), but
    with sequence parallelism and expert TP 1 < TP every TP rank holds whole experts and routes
    only its own sequence shard: their gradients (and their adapters') are partial sums over the TP
    ranks, as a norm's are under SP, and were left unsummed (TP ranks drifted apart silently).
    Tagged as megatron tags norms (``sequence_parallel``), finalize_model_grads sums them over TP;
    as TP duplicates (``tensor_model_parallel`` False) the gradient norm counts them once, not once
    per TP rank. At EP > 1 megatron reduces expert weights over the expert-DP group, which holds the
    TP peers."""
    if not (parallel.sp and parallel.ep == 1 and parallel.expert_tp < parallel.tp):
        return
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".experts." in f".{name}":  # routed experts (not shared_experts: TP-split like a dense MLP)
                param.sequence_parallel = True
                param.tensor_model_parallel = False


def routers(chunks: list) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]


def set_router_loss_scale(chunks: list, model: ModelConfig, num_micro_batches: int, dp_size: int) -> None:
    """Make megatron's router losses count once per step (see the module doc). Megatron's
    routers add ``coeff x loss x local tokens`` to the gradient under ``calculate_per_token_loss``
    (its 1/tokens comes later, in a grad finalisation we do not use); here they add the loss as is
    and the coefficients the routers read (from their TransformerConfig, at each forward) are
    ``model.moe_*_coeff / (micro batches x DP ranks)``: a mean over the step. The schedule's
    auxiliary-loss scaler stays megatron's (the fp16 loss scale; 1 otherwise). Call before each
    training schedule run; the logged losses (megatron's tracker) are divided by the coefficient
    in use, so they stay the raw losses."""
    share = 1.0 / (num_micro_batches * dp_size)
    for r in routers(chunks):
        r.calculate_per_token_loss = False
        r.config.moe_aux_loss_coeff = model.moe_aux_loss_coeff * share
        r.config.moe_z_loss_coeff = (model.moe_z_loss_coeff * share) or None


class RouterLoad:
    """Per-expert token counts of every MoE layer over one step, and the router losses."""

    def __init__(self, chunks: list, model: ModelConfig, parallel: ParallelConfig):
        self.chunks, self.model, self.parallel = chunks, model, parallel
        arch = model.arch()
        # on the training device: the reductions below run over NCCL on a GPU (no host tensors),
        # and the hook then adds without a host sync per layer
        device = next(p for c in chunks for p in c.parameters()).device
        self.counts = torch.zeros(arch.num_layers, arch.num_experts, dtype=torch.float64, device=device)
        self.handles = [r.register_forward_hook(self._hook) for r in routers(chunks)]
        # megatron's loss tracker is process-wide: a previous run in this process (a notebook, a
        # sweep) must not leave its entries behind for this one to report
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()

    def begin_step(self, num_micro_batches: int) -> None:
        from megatron.core import parallel_state as ps

        set_router_loss_scale(self.chunks, self.model, num_micro_batches, ps.get_data_parallel_world_size())
        self.reset()

    def end_step(self, num_micro_batches: int) -> dict:
        return self.collect(num_micro_batches, self.parallel.sp)

    def _hook(self, router, _inputs, output):
        if torch.is_grad_enabled():  # training passes, not validation or statistics pre-passes
            routing_map = output[1]
            self.counts[router.layer_number - 1] += routing_map.detach().sum(0).to(torch.float64)

    def reset(self) -> None:
        self.counts.zero_()
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()

    def collect(self, num_micro_batches: int, sequence_parallel: bool) -> dict:
        """metrics.jsonl fields of this step (the same on every rank): ``router_aux_loss`` /
        ``router_z_loss`` (sum over MoE layers, mean over micro batches and DP ranks, each micro
        batch's parts on TP x CP ranks combined; present when their coefficient is set) and
        ``expert_load`` (tokens routed to each expert, per layer, summed over the global batch)."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        counts = self.counts.clone()
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
        if sequence_parallel:  # each TP rank routed its own sequence shard
            torch.distributed.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(counts, group=ps.get_pipeline_model_parallel_group())
        out = {"expert_load": [[int(x) for x in row] for row in counts.tolist()]}
        tracker = get_moe_layer_wise_logging_tracker()
        dp = ps.get_data_parallel_world_size()
        coefficients = {"load_balancing_loss": self.model.moe_aux_loss_coeff, "z_loss": self.model.moe_z_loss_coeff}
        for name, key in ROUTER_LOSS_NAMES.items():
            if not coefficients[name] or name not in tracker:  # reported only where this run adds it
                continue
            values = tracker[name]["values"].detach().to(self.counts.device, torch.float64).clone()
            # one micro batch's loss is split over the TP (sequence parallel) x CP ranks that each
            # route a shard of its tokens: megatron's load-balancing loss is the sum of the ranks'
            # parts (its tracker's reduce group); the z-loss, a mean over tokens, their average
            torch.distributed.all_reduce(values, group=ps.get_tensor_and_context_parallel_group())
            if name == "z_loss":
                values /= ps.get_tensor_and_context_parallel_world_size()
            torch.distributed.all_reduce(values, group=ps.get_data_parallel_group())
            torch.distributed.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
            out[key] = float(values.sum()) / (num_micro_batches * dp)
        return out
