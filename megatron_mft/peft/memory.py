"""Expected per-GPU memory of LoRA / QLoRA training for a layout, from the architecture alone.

Every number is a formula over the preset (h hidden, f ffn, kv = query groups x head dim,
V vocab, L layers), the layout (t tensor-, p pipeline-, d data-parallel, SP), the sequence
length s, micro batch b (T = s*b tokens per micro batch) and the adapter rank r. The formulas
are written next to the code and printed by ``tools/bench/peft_memory.py``; docs/peft.md
explains them. They describe *this* implementation: megatron DDP with fp32 gradient buffers
(``grad_reduce_in_fp32``), megatron's Adam with fp32 master weights, flash/SDPA attention (no
s x s score tensor), adapters that save only their inputs, and frozen base linears that save
nothing for a weight gradient.

Not included: CUDA context, NCCL buffers, allocator fragmentation (typically 2-5 GB per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_mft.config.peft import PEFT_TARGETS
from megatron_mft.config.presets import ArchSpec
from megatron_mft.peft.nf4 import NF4_BYTES_PER_PARAM

#: tensor-parallel kind of each target slot
TARGET_KIND = {"linear_qkv": "column", "linear_proj": "row", "linear_fc1": "column", "linear_fc2": "row"}

GB = 1e9


def target_shapes(arch: ArchSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target's full (unsharded) weight.
    fc1 is SwiGLU's fused [gate; up] projection (2f outputs), or f for a plain GELU MLP."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    kv = arch.num_query_groups * arch.head_dim
    q = arch.num_attention_heads * arch.head_dim
    fc1 = 2 * f if arch.gated else f
    return {"linear_qkv": (h, q + 2 * kv), "linear_proj": (q, h), "linear_fc1": (h, fc1), "linear_fc2": (f, h)}


@dataclass(frozen=True)
class Linear:
    """One linear slot kind of a decoder layer: ``copies`` of [out, in] weights. ``group``:
    attn, mlp (dense MLP), expert (routed: split over EP ranks, not over TP) or shared (MoE
    shared expert: TP-split like a dense MLP)."""

    target: str
    in_features: int
    out_features: int
    copies: int
    group: str

    @property
    def weights(self) -> int:
        return self.copies * self.in_features * self.out_features


def layer_linears(arch: ArchSpec) -> list[Linear]:
    """Every linear of one decoder layer. On an MoE layer fc1/fc2 are each routed expert's
    ([gate; up] of the expert width) and the shared expert's; the router is no linear slot."""
    shapes = target_shapes(arch)
    out = [Linear(t, *shapes[t], 1, "attn") for t in ("linear_qkv", "linear_proj")]
    if not arch.num_experts:
        return out + [Linear(t, *shapes[t], 1, "mlp") for t in ("linear_fc1", "linear_fc2")]
    fe, fs, h = arch.expert_ffn, arch.moe_shared_expert_size, arch.hidden_size
    out += [Linear("linear_fc1", h, 2 * fe, arch.num_experts, "expert"),
            Linear("linear_fc2", fe, h, arch.num_experts, "expert")]
    if fs:
        out += [Linear("linear_fc1", h, 2 * fs, 1, "shared"), Linear("linear_fc2", fs, h, 1, "shared")]
    return out


def lora_params_per_layer(arch: ArchSpec, rank: int, targets: Sequence[str]) -> int:
    """r * (in + out) summed over the targets (every expert's on an MoE layer): A is [r, in],
    B is [out, r]."""
    return sum(x.copies * rank * (x.in_features + x.out_features) for x in layer_linears(arch) if x.target in targets)


def lora_params(arch: ArchSpec, rank: int, targets: Sequence[str]) -> int:
    """All adapter parameters of the model (each counted once, whatever the layout)."""
    return arch.num_layers * lora_params_per_layer(arch, rank, targets)


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the most loaded pipeline stage."""

    method: str
    base_weights: float
    adapters: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    workspace: float
    trainable_params: int
    total_params: int
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return (self.base_weights + self.adapters + self.grads + self.optimizer + self.activations + self.logits
                + self.workspace)

    def rows(self) -> list[tuple[str, float]]:
        return [("base weights", self.base_weights), ("adapters", self.adapters), ("adapter grads", self.grads),
                ("optimizer", self.optimizer), ("activations", self.activations), ("logits+CE", self.logits),
                ("dequant workspace", self.workspace), ("total", self.total)]


def estimate_memory(arch: ArchSpec, *, method: str, rank: int, targets: Sequence[str] = PEFT_TARGETS,
                    tp: int = 1, pp: int = 1, dp: int = 1, vpp: Optional[int] = None, sp: bool = False,
                    seq_length: int = 4096, micro_batch: int = 1, recompute: str = "full",
                    distributed_optimizer: bool = True, param_bytes: int = 2, ep: int = 1, cp: int = 1,
                    cp_gathered_kv: bool = False) -> MemoryEstimate:
    """Per-GPU bytes for ``method`` in {"lora", "qlora"} (see the module docstring).

    weights   LoRA: param_bytes x (all parameters on the stage); QLoRA: 0.5159 B x targeted
              base weights (NF4 + double-quantised absmax) + param_bytes x the rest
              (embedding, output layer, norms, untargeted linears).
    adapters  param_bytes x local adapter elements: column layer r*in + r*out/t,
              row layer r*in/t + r*out (the replicated factor is stored on every TP rank).
    grads     4 B x local adapter elements (megatron DDP fp32 main-grad buffer).
    optimizer 12 B x local adapter elements (fp32 master + Adam m + v; 4 B less with fp32
              params, which need no master copy), divided by d with the distributed optimizer.
    activations, per layer and token, in param_bytes units (x T tokens, x L/p layers, x p
              micro batches in flight on the first 1F1B stage, x (1 + (p-1)/(p*vpp)) when
              interleaved):
                recompute none/selective:  2h [norm inputs] + (2h + 2kv)/t [q, k, v, attn out]
                  + 2f/t [SwiGLU input] + adapter inputs (h for qkv, fc1; f/t for fc2; proj's
                  input is the attention output, already counted) + r per target;
                  with SP every h term is divided by t.
                recompute full: h (h/t with SP) per layer [the checkpointed layer input], plus one
                  layer's no-recompute activations while it is recomputed.
    logits    6 B x T x V/t on the last stage (bf16 logits + fp32 copy that the
              vocab-parallel cross entropy turns into the softmax it saves).
    workspace QLoRA: param_bytes x the largest targeted weight shard, dequantised for one
              matmul at a time.

    Context parallelism (``cp`` ranks split every sequence): T above is s*b/cp, the tokens a
    rank holds (activations and logits / cp); the distributed optimizer shards over d x cp.
    ``cp_gathered_kv`` (the all-gather-KV attention without TE, megatron_mft/model/cp_attention.py)
    adds the whole sequence's K and V for each layer whose activations are held (one layer under
    full recompute): on a GPU that path expands grouped K/V to every query head (CUDA's SDPA takes
    no grouped K/V with a causal bias), so 2 x heads x head_dim / t x s*b; TE's p2p ring keeps only
    the rank's own K/V.

    Mixture of experts (``ep`` expert-parallel ranks, expert TP 1): weights count every expert
    (routed experts' / ep on a rank, not split over TP; the shared expert / t; NF4 for targeted
    expert linears under QLoRA); adapters one pair per expert (/ ep), their optimizer state / the
    expert data-parallel size (dp x t / ep); activations per *active* expert: each token's top-k
    routed copies save the SwiGLU input 2f_e and the adapter inputs (h for fc1, f_e for fc2) and
    r per targeted slot, / t with SP; the shared expert once; router logits E.
    """
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be lora or qlora, got {method!r}")
    h, f, V, L = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size, arch.num_layers
    kv = arch.num_query_groups * arch.head_dim
    t, p = tp, pp
    shapes = target_shapes(arch)
    targets = list(targets)
    layers = L // p
    T = seq_length * micro_batch / cp  # tokens on this rank

    # ---- parameters on the most loaded stage (first/last hold embedding / output layer)
    lins = layer_linears(arch)
    linear_all = sum(x.weights for x in lins)  # every linear of a layer (every expert's)
    quantised = [x for x in lins if method == "qlora" and x.target in targets]

    def held(x: Linear) -> float:  # weights of this slot kind on one rank
        return x.weights / (ep if x.group == "expert" else t)  # experts split over EP, whole (expert TP 1)
    # biases and norms stay dense (num_params' per-layer total minus the linear weights)
    final_norm = (2 if arch.normalization == "LayerNorm" else 1) * h
    small = (arch.num_params() - V * h * (1 if arch.tied_embeddings else 2) - final_norm) // L - linear_all
    per_layer_dense = sum(held(x) for x in lins if x not in quantised) + small
    per_layer_q = sum(held(x) for x in quantised)
    emb = V * h / t
    # p == 1: embedding, output layer (none when tied) and final norm on one GPU; else the last
    # stage's share (a tied output layer is a copy of the embedding there)
    ends = (1 if arch.tied_embeddings else 2) * emb + h if p == 1 else emb + h
    base = layers * (per_layer_dense * param_bytes + per_layer_q * NF4_BYTES_PER_PARAM) + ends * param_bytes

    adapter_local = adapter_expert = 0.0
    for x in lins:
        if x.target not in targets:
            continue
        i, o = x.in_features, x.out_features
        if x.group == "expert":  # each EP rank holds its E/ep experts' adapters, not TP-split
            adapter_expert += x.copies / ep * rank * (i + o)
        else:
            adapter_local += rank * i + rank * o / t if TARGET_KIND[x.target] == "column" else rank * i / t + rank * o
    adapter_local *= layers
    adapter_expert *= layers
    adapters = (adapter_local + adapter_expert) * param_bytes
    grads = (adapter_local + adapter_expert) * 4
    opt_per = 12 if param_bytes < 4 else 8
    expert_dp = max(1, dp * cp * t // ep)  # megatron's expert data-parallel size (expert TP 1)
    optimizer = (adapter_local / (dp * cp if distributed_optimizer else 1)
                 + adapter_expert / (expert_dp if distributed_optimizer else 1)) * opt_per

    # ---- activations (elements per token per layer)
    hs = h / t if sp else h
    if not arch.num_experts:
        none_layer = 2 * hs + (2 * h + 2 * kv) / t + shapes["linear_fc1"][1] / t + rank * len(targets)
        none_layer += sum({"linear_qkv": hs, "linear_fc1": hs, "linear_fc2": f / t, "linear_proj": 0}[x]
                          for x in targets)
    else:  # MoE: attention as above; the MLP per *active* expert (top-k routed copies of a token)
        none_layer = 2 * hs + (2 * h + 2 * kv) / t + arch.num_experts  # + router logits
        none_layer += sum({"linear_qkv": hs + rank, "linear_proj": rank}.get(x, 0) for x in targets)
        tok = 1 / t if sp else 1  # tokens on this rank (SP shards them; EP balances them)
        for x in lins:
            if x.group == "attn" or x.target != "linear_fc2":
                continue
            width, copies = x.in_features, (arch.moe_top_k if x.group == "expert" else 1)
            adapt = (h + rank if "linear_fc1" in targets else 0) + (width + rank if "linear_fc2" in targets else 0)
            none_layer += copies * tok * (2 * width + adapt)  # SwiGLU input + adapter inputs and outputs
    in_flight = p * (1 + (p - 1) / (p * vpp) if vpp and vpp > 1 else 1)
    if recompute == "full":
        saved = hs * layers * in_flight + none_layer
    else:
        saved = none_layer * layers * in_flight
    activations = saved * T * param_bytes
    if cp > 1 and cp_gathered_kv:
        expanded = arch.num_attention_heads * arch.head_dim  # K/V repeated per query head (see above)
        activations += (2 * expanded / t * seq_length * micro_batch * (1 if recompute == "full" else layers * in_flight)
                        * param_bytes)
    logits = 6 * T * V / t
    workspace = 0.0
    if method == "qlora" and targets:
        workspace = max(held(x) / x.copies for x in lins if x.target in targets) * param_bytes

    trainable = lora_params(arch, rank, targets)
    notes = []
    if recompute == "selective":
        notes.append("selective recompute saves little with flash/SDPA attention (no s x s scores): counted as none")
    return MemoryEstimate(method, base, adapters, grads, optimizer, activations, logits, workspace,
                          trainable_params=trainable, total_params=arch.num_params() + trainable, notes=notes)


def fmt_bytes(n: float) -> str:
    """GB with 2 decimals from 1 GB up, else MB."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def format_estimate(est: MemoryEstimate) -> str:
    return " | ".join(f"{k} {fmt_bytes(v)}" for k, v in est.rows())
