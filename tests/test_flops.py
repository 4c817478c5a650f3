"""FLOPs behind tflops_per_gpu / mfu (model FLOPs) and hw_tflops_per_gpu (plus recompute), pinned
by a matmul-by-matmul hand count and by the published formulas (Megatron-LM 2021, PaLM app. B)."""

from __future__ import annotations

import pytest

from megatron_mft.config import PRESETS, ArchSpec, PeftConfig
from megatron_mft.training.metrics import flop_count, hardware_flops, model_flops

# GQA (4 query heads, 2 KV groups), SwiGLU, untied head: every shape differs from every other
ARCH = ArchSpec(num_layers=3, hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=40,
                vocab_size=50, max_position_embeddings=64, rotary_base=1e4)
LENGTHS = [7, 3, 12]  # samples packed into windows: attention is per sample, causal
RANK = 4


def forward_matmuls(arch: ArchSpec, lengths: list[int], rank: int | None, targets: list[str]):
    """Every matmul of one forward pass as (kind, m, n, k): out[m, n] = a[m, k] @ b[k, n].
    kind: 'base' (a frozen weight under PEFT), 'adapter', 'attention' (two activations, no
    weight), 'head' (LM head). Causal attention: half of each s x s product is computed."""
    T = sum(lengths)
    h, f, V = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    d = h // arch.num_attention_heads
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    layer = [("base", T, q, h), ("base", T, kv, h), ("base", T, kv, h),  # q, k, v projections
             ("base", T, h, q)]  # attention output projection
    if arch.activation == "swiglu":
        layer += [("base", T, f, h), ("base", T, f, h), ("base", T, h, f)]  # gate, up, down
    else:
        layer += [("base", T, f, h), ("base", T, h, f)]  # fc1, fc2
    w = arch.sliding_window
    for s in lengths:
        for _ in range(arch.num_attention_heads):
            # the lower triangle, less the triangle of keys that left a sliding window
            cut = (s - w) ** 2 / 2 if w and s > w else 0.0
            layer.append(("attention", s * s / 2 - cut, 1, d))  # q k^T: one dot product per pair
            layer.append(("attention", s * s / 2 - cut, d, 1))  # p v: d outputs per pair
    fc1 = 2 * f if arch.activation == "swiglu" else f
    slots = {"linear_qkv": (h, q + 2 * kv), "linear_proj": (q, h), "linear_fc1": (h, fc1), "linear_fc2": (f, h)}
    if rank:
        for t in targets:
            i, o = slots[t]
            layer += [("adapter", T, rank, i), ("adapter", T, o, rank)]  # x A^T, then (x A^T) B^T
    return [("layer",) + m for _ in range(arch.num_layers) for m in layer] + [("top", "head", T, V, h)]


def hand_count(arch, lengths, peft: str, recompute: str, rank=RANK, targets=None) -> dict:
    """Per matmul: forward 2mnk; backward 2mnk per input that needs a gradient (attention: both
    inputs; weights: only trained ones); recompute repeats the forward of layer matmuls."""
    targets = targets or ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    lora = peft != "none"
    out = {"forward": 0.0, "activation_grads": 0.0, "weight_grads": 0.0, "recompute": 0.0}
    for where, kind, m, n, k in forward_matmuls(arch, lengths, rank if lora else None, targets):
        mm = 2.0 * m * n * k
        out["forward"] += mm
        out["activation_grads"] += 2 * mm if kind == "attention" else mm
        trained = kind == "adapter" if lora else kind in ("base", "head")
        out["weight_grads"] += mm if trained else 0.0
        if where == "layer" and (recompute == "full" or (recompute == "selective" and kind == "attention")):
            out["recompute"] += mm
    return out


def peft_cfg(method: str, rank=RANK, targets=None) -> PeftConfig | None:
    if method == "none":
        return None
    return PeftConfig(method=method, rank=rank, target_modules=targets or ["linear_qkv", "linear_proj", "linear_fc1",
                                                                          "linear_fc2"])


# StarCoder2-like: plain GELU MLP, biases, tied embeddings, a sliding window shorter than a sample
GELU_WINDOW = ArchSpec(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=1, ffn_hidden_size=64,
                       vocab_size=50, max_position_embeddings=64, rotary_base=1e4, linear_bias=True,
                       normalization="LayerNorm", activation="gelu_tanh", tied_embeddings=True, sliding_window=5)


@pytest.mark.parametrize("arch", [ARCH, GELU_WINDOW], ids=["swiglu-gqa", "gelu-window"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("method", ["none", "lora", "qlora"])
def test_flops_equal_the_hand_count(method, recompute, arch):
    got = flop_count(arch, LENGTHS, peft_cfg(method), recompute)
    want = hand_count(arch, LENGTHS, method, recompute)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-12), key
    model = want["forward"] + want["activation_grads"] + want["weight_grads"]
    assert model_flops(arch, LENGTHS, peft_cfg(method)) == pytest.approx(model, rel=1e-12)
    assert hardware_flops(arch, LENGTHS, peft_cfg(method), recompute) == pytest.approx(
        model + want["recompute"], rel=1e-12)


def test_partial_targets_and_qlora_counts_as_lora():
    for targets in (["linear_qkv"], ["linear_proj", "linear_fc2"]):
        got = flop_count(ARCH, LENGTHS, peft_cfg("qlora", rank=8, targets=targets), "full")
        want = hand_count(ARCH, LENGTHS, "qlora", "full", rank=8, targets=targets)
        assert (got.forward, got.activation_grads, got.weight_grads, got.recompute) == pytest.approx(
            (want["forward"], want["activation_grads"], want["weight_grads"], want["recompute"]), rel=1e-12)
        assert got == flop_count(ARCH, LENGTHS, peft_cfg("lora", rank=8, targets=targets), "full")


def test_full_finetune_with_full_recompute_is_megatron_lms_formula():
    """Narayanan et al. 2021, eq. (3): 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) for a GPT layer
    (4h^2 attention + 8h^2 MLP weights, MHA) with full recompute, attention over all s^2 pairs.
    A SwiGLU MLP with f = 8h/3 has the same 8h^2 weights; causal attention halves s/(6h)."""
    B, s, L, h, V = 3, 48, 2, 96, 1000
    gpt_like = ArchSpec(num_layers=L, hidden_size=h, num_attention_heads=4, num_query_groups=4,
                        ffn_hidden_size=8 * h // 3, vocab_size=V, max_position_embeddings=s, rotary_base=1e4)
    megatron = 96 * B * s * L * h**2 * (1 + s / (12 * h) + V / (16 * L * h))
    assert hardware_flops(gpt_like, [s] * B, None, "full") == pytest.approx(megatron, rel=1e-12)
    # without recompute: 72 B s l h^2 (1 + s/(6h) + V/(12 l h)), again with the causal s/(12h)
    assert model_flops(gpt_like, [s] * B) == pytest.approx(72 * B * s * L * h**2 * (1 + s / (12 * h) + V / (12 * L * h)),
                                                           rel=1e-12)


def test_full_finetune_model_flops_is_palms_6n_plus_attention():
    """PaLM appendix B: 6N + 12 L H Q T per token (N: non-embedding weights, H heads x Q head
    size = h, T: sequence length); causal attention halves the second term, per sample."""
    arch = PRESETS["codellama-34b"]
    lengths = [4096, 1000, 37]
    h, L = arch.hidden_size, arch.num_layers
    n_matmul = arch.num_params() - arch.vocab_size * h - (2 * L + 1) * h  # no input embedding, no norms
    palm = sum(6 * n_matmul * s + 12 * L * h * s * s / 2 for s in lengths)
    assert model_flops(arch, lengths) == pytest.approx(palm, rel=1e-12)


def test_peft_model_flops_are_about_two_thirds_of_full_and_recompute_only_adds_hardware_flops():
    arch = PRESETS["codellama-34b"]
    lengths = [4096] * 8
    full = model_flops(arch, lengths)
    lora = model_flops(arch, lengths, peft_cfg("lora", rank=96))
    assert 0.66 < lora / full < 0.72  # no base-weight gradients: 2/3, plus adapters and attention backward
    for method in ("none", "lora"):
        c = flop_count(arch, lengths, peft_cfg(method, rank=96), "full")
        assert c.model == model_flops(arch, lengths, peft_cfg(method, rank=96))  # MFU ignores recompute
        assert c.hardware > c.model
    with pytest.raises(ValueError, match="recompute"):
        flop_count(arch, lengths, None, "everything")



# Mixtral-like: 4 experts, top-2, expert MLP narrower than the dense one would be
MOE = ArchSpec(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=40,
               vocab_size=50, max_position_embeddings=64, rotary_base=1e4, num_experts=4, moe_top_k=2,
               moe_ffn_hidden_size=24)
# Qwen2-MoE-like: shared expert with its sigmoid gate
MOE_SHARED = ArchSpec(**{**MOE.__dict__, "moe_shared_expert_size": 12, "moe_shared_expert_gate": True,
                         "moe_norm_topk": False})


@pytest.mark.parametrize("arch", [MOE, MOE_SHARED], ids=["top2", "shared-expert"])
def test_moe_counts_what_a_token_runs(arch):
    """Per token and layer: router h x E, top-k experts (gate, up, down), the shared expert and its
    h -> 1 gate; the attention and head as for a dense model. Hand count matmul by matmul."""
    T, h, e = sum(LENGTHS), arch.hidden_size, arch.expert_ffn
    d = arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_token = [h * q, h * kv, h * kv, q * h, h * arch.num_experts]  # q, k, v, o, router
    per_token += [h * e, h * e, e * h] * arch.moe_top_k  # each routed expert: gate, up, down
    s = arch.moe_shared_expert_size
    per_token += [h * s, h * s, s * h] + [h] if s else []
    linears = 2.0 * sum(per_token) * T
    attention = sum(2 * 2.0 * (n * n / 2) * d * arch.num_attention_heads for n in LENGTHS)
    head = 2.0 * h * arch.vocab_size * T
    forward = arch.num_layers * (linears + attention) + head
    got = flop_count(arch, LENGTHS)
    assert got.forward == pytest.approx(forward, rel=1e-12)
    assert got.activation_grads == pytest.approx(arch.num_layers * (linears + 2 * attention) + head, rel=1e-12)
    assert got.weight_grads == pytest.approx(arch.num_layers * linears + head, rel=1e-12)


def test_moe_model_flops_follow_6_active_params():
    """PaLM's 6N per token with N the *active* non-embedding matmul weights (norms, QK-norm and
    biases are not matmuls), plus causal attention, for the MoE presets."""
    for name in ("mixtral-8x7b", "qwen2-57b-a14b", "qwen3-coder-30b-a3b"):
        arch = PRESETS[name]
        h, L, s = arch.hidden_size, arch.num_layers, 4096
        non_matmul = (2 * L + 1) * h * (2 if arch.normalization == "LayerNorm" else 1)
        non_matmul += L * 2 * arch.head_dim if arch.qk_norm else 0
        if arch.qkv_bias or arch.linear_bias:
            non_matmul += L * (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
        n_active = arch.num_params(active=True) - arch.vocab_size * h - non_matmul
        attention = 12 * L * arch.num_attention_heads * arch.head_dim * s * s / 2
        assert model_flops(arch, [s]) == pytest.approx(6 * n_active * s + attention, rel=1e-9), name


def test_dpo_adapter_reference_adds_one_frozen_forward():
    lora = peft_cfg("lora")
    plain = flop_count(ARCH, LENGTHS, lora)
    with_ref = flop_count(ARCH, LENGTHS, lora, reference_forward=True)
    base_forward = hand_count(ARCH, LENGTHS, "none", "none")["forward"]  # the frozen base, counted by hand
    assert with_ref.forward - plain.forward == pytest.approx(base_forward, rel=1e-12)
    assert (with_ref.activation_grads, with_ref.weight_grads) == (plain.activation_grads, plain.weight_grads)
