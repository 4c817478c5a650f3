"""Architecture table: one home for the published numbers of each model family.

Every number is taken from the model's own ``config.json`` on the Hugging Face hub (the
``hf_name`` repository, file ``config.json``); ``tests/test_presets.py`` checks each preset's
parameter count within 1% of the published one."""

from __future__ import annotations

from dataclasses import dataclass, replace

#: values of the categorical ArchSpec fields (validated by ``ArchSpec.problems``)
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("swiglu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: megatron-core's llama3 RoPE scaling has these constants built in (rotary_pos_embedding.py)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ArchSpec:
    """A pre-norm RoPE decoder as megatron-core's GPTModel builds it. The defaults are the
    Llama-2 graph (RMSNorm, SwiGLU, no biases, untied embeddings, plain RoPE, full attention);
    the other families differ only in these fields."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float = 1e-5
    #: Hugging Face repository this preset mirrors (documentation, conversion checks).
    hf_name: str = ""
    #: bias on the q/k/v projection only (Qwen2)
    qkv_bias: bool = False
    #: bias on every linear: qkv, attention output, both MLP linears (StarCoder2)
    linear_bias: bool = False
    normalization: str = "RMSNorm"
    #: MLP: "swiglu" (gated, silu) or "gelu_tanh" (non-gated fc1 -> GELU tanh -> fc2)
    activation: str = "swiglu"
    #: output layer shares the input embedding's weight
    tied_embeddings: bool = False
    #: RoPE scaling: "default" (none), "linear" (positions / factor), "llama3" (per-frequency),
    #: "yarn" (per-frequency blend + attention factor; long-context Qwen2.5)
    rope_type: str = "default"
    rope_factor: float = 1.0
    #: context length the scaling extends (llama3: megatron's built-in 8192; yarn: config.json's)
    rope_original_max_positions: int = 0
    #: sliding-window attention: each token sees itself and the previous window-1 tokens; 0 = off
    sliding_window: int = 0
    #: Hugging Face family this architecture exports to (checkpoint.hf.families)
    family: str = "llama"
    #: attention head size when it is not hidden/heads (Qwen3's explicit head_dim); 0 = derived
    kv_channels: int = 0
    #: RMSNorm on each query/key head before RoPE (Qwen3)
    qk_norm: bool = False
    #: mixture of experts (model/moe.py): routed experts per layer; 0 = dense MLP
    num_experts: int = 0
    #: experts each token is routed to
    moe_top_k: int = 0
    #: hidden size of one routed expert's MLP (0 = ffn_hidden_size)
    moe_ffn_hidden_size: int = 0
    #: top-k probabilities renormalised to sum 1 (Mixtral, Qwen3-MoE; Qwen2-MoE: config norm_topk_prob)
    moe_norm_topk: bool = True
    #: hidden size of the always-on shared expert (Qwen2-MoE); 0 = none
    moe_shared_expert_size: int = 0
    #: the shared expert's output is scaled by sigmoid(gate(x)) (Qwen2-MoE)
    moe_shared_expert_gate: bool = False

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def effective(self) -> "ArchSpec":
        """This spec with each 0 that stands for a value replaced by that value: kv_channels (the
        head size), moe_ffn_hidden_size (ffn_hidden_size) and llama3's rope_original_max_positions
        (megatron's built-in 8192). Two specs that build the same model have equal ``effective()``."""
        llama3 = self.rope_type == "llama3" and not self.rope_original_max_positions
        return replace(self, kv_channels=self.head_dim if self.num_attention_heads > 0 else self.kv_channels,
                       moe_ffn_hidden_size=self.expert_ffn if self.num_experts else self.moe_ffn_hidden_size,
                       rope_original_max_positions=LLAMA3_ROPE["original_max_position_embeddings"] if llama3
                       else self.rope_original_max_positions)

    def num_params(self, active: bool = False) -> int:
        """Exact parameter count, computed without allocating weights; ``active``: with only
        ``moe_top_k`` routed experts per token (MoE), as model cards publish it."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        fc1 = (2 if self.gated else 1) * f
        attn = h * q + 2 * h * kv + q * h  # q, k, v, o
        attn += 2 * self.head_dim if self.qk_norm else 0
        mlp = h * fc1 + f * h
        if self.num_experts:
            e = self.expert_ffn
            per_expert = h * (3 if self.gated else 2) * e
            s = self.moe_shared_expert_size
            mlp = (h * self.num_experts + (self.moe_top_k if active else self.num_experts) * per_expert
                   + (h * 3 * s if s else 0) + (h if self.moe_shared_expert_gate else 0))
        bias = 0
        if self.qkv_bias or self.linear_bias:
            bias += q + 2 * kv
        if self.linear_bias:
            bias += h + fc1 + h  # o, fc1, fc2
        norm = (2 if self.normalization == "LayerNorm" else 1) * h  # weight (+ bias)
        embed = v * h * (1 if self.tied_embeddings else 2)
        return L * (attn + mlp + bias + 2 * norm) + embed + norm

    def problems(self, rope: bool = True) -> list[str]:
        """What no model can be built with; ``rope=False`` (attention without rotary embeddings,
        as the benches' bare attention layers) leaves out RoPE's even-head-size rule."""
        p = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("rotary_base", "norm_epsilon"):
            if not getattr(self, name) > 0:
                p.append(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.kv_channels < 0:
            p.append(f"kv_channels: must be >= 0 (0 = hidden_size / num_attention_heads), got {self.kv_channels}")
        if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
            p.append(f"hidden_size: {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        elif rope and self.num_attention_heads > 0 and self.kv_channels >= 0 and self.head_dim % 2:
            p.append(f"{'kv_channels' if self.kv_channels else 'hidden_size'}: the head size {self.head_dim} is odd; "
                     f"RoPE rotates pairs of channels, so it must be even")
        if self.num_attention_heads > 0 and self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups:
            p.append(
                f"num_query_groups: {self.num_query_groups} does not divide num_attention_heads {self.num_attention_heads}"
            )
        for name, allowed in (("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS),
                              ("rope_type", ROPE_TYPES)):
            if getattr(self, name) not in allowed:
                p.append(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.rope_type != "default" and self.rope_factor <= 1.0:
            p.append(f"rope_factor: {self.rope_factor} must be > 1 with rope_type {self.rope_type}")
        if self.rope_original_max_positions < 0:
            p.append(f"rope_original_max_positions: must be >= 0, got {self.rope_original_max_positions}")
        elif self.rope_type == "yarn" and self.rope_original_max_positions == 0:
            p.append("rope_original_max_positions: yarn needs the original context length (> 0)")
        elif self.rope_type == "llama3" and self.rope_original_max_positions not in (
                0, LLAMA3_ROPE["original_max_position_embeddings"]):
            p.append(f"rope_original_max_positions: megatron-core's llama3 scaling is built for "
                     f"{LLAMA3_ROPE['original_max_position_embeddings']}, got {self.rope_original_max_positions}")
        if self.sliding_window < 0:
            p.append("sliding_window: must be >= 0 (0 = full attention)")
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.moe_top_k <= self.num_experts):
            p.append(f"moe_top_k: {self.moe_top_k} must be between 1 and num_experts {self.num_experts}")
        for name, zero in (("moe_ffn_hidden_size", "ffn_hidden_size"), ("moe_shared_expert_size", "none")):
            if getattr(self, name) < 0:
                p.append(f"{name}: must be >= 0 (0 = {zero}), got {getattr(self, name)}")
        if (self.moe_shared_expert_size or self.moe_shared_expert_gate) and not self.num_experts:
            p.append("moe_shared_expert_size: a shared expert needs num_experts > 0")
        if self.moe_shared_expert_gate and not self.moe_shared_expert_size:
            p.append("moe_shared_expert_gate: needs moe_shared_expert_size > 0")
        if self.num_experts and not self.gated:
            p.append("activation: the MoE families are SwiGLU (gelu_tanh experts are not mapped)")
        return p


_CODELLAMA_ROPE = 1_000_000.0
_LLAMA2_ROPE = 10_000.0


def _llama3(layers, hidden, heads, ffn, factor, tied, hf_name):
    """meta-llama/Llama-3.x config.json: 8 KV heads, vocab 128256, max positions 131072,
    rope_theta 500000, rms_norm_eps 1e-5, rope_scaling llama3 (factor, low 1, high 4, original 8192)."""
    return ArchSpec(layers, hidden, heads, 8, ffn, 128256, 131072, 500_000.0, 1e-5, hf_name=hf_name,
                    rope_type="llama3", rope_factor=factor, rope_original_max_positions=8192, tied_embeddings=tied)


def _qwen25_coder(layers, hidden, heads, groups, ffn, vocab, tied, hf_name):
    """Qwen/Qwen2.5-Coder-* config.json: QKV bias, rope_theta 1e6, rms_norm_eps 1e-6, max positions
    32768, use_sliding_window false (so no window)."""
    return ArchSpec(layers, hidden, heads, groups, ffn, vocab, 32768, 1_000_000.0, 1e-6, hf_name=hf_name,
                    qkv_bias=True, tied_embeddings=tied, family="qwen2")


def _deepseek_coder(layers, hidden, heads, groups, ffn, hf_name):
    """deepseek-ai/deepseek-coder-*-base config.json (LlamaForCausalLM): vocab 32256, max positions
    16384, rope_theta 100000, rms_norm_eps 1e-6, rope_scaling linear factor 4."""
    return ArchSpec(layers, hidden, heads, groups, ffn, 32256, 16384, 100_000.0, 1e-6, hf_name=hf_name,
                    rope_type="linear", rope_factor=4.0)


def _starcoder2(layers, hidden, heads, groups, rope, tied, hf_name):
    """bigcode/starcoder2-* config.json: LayerNorm (norm_epsilon 1e-5), GELU tanh MLP with
    intermediate 4h, use_bias true, vocab 49152, max positions 16384, sliding_window 4096."""
    return ArchSpec(layers, hidden, heads, groups, 4 * hidden, 49152, 16384, rope, 1e-5, hf_name=hf_name,
                    linear_bias=True, normalization="LayerNorm", activation="gelu_tanh", tied_embeddings=tied,
                    sliding_window=4096, family="starcoder2")

def _mixtral(layers, hidden, heads, ffn, max_pos, hf_name):
    """mistralai/Mixtral-8x*B-v0.1 config.json: 8 local experts, 2 per token (renormalised), 8 KV
    heads, vocab 32000, rope_theta 1e6, rms_norm_eps 1e-5, sliding_window null."""
    return ArchSpec(layers, hidden, heads, 8, ffn, 32000, max_pos, 1_000_000.0, 1e-5, hf_name=hf_name,
                    family="mixtral", num_experts=8, moe_top_k=2, moe_ffn_hidden_size=ffn)


def _qwen2_moe(layers, hidden, heads, groups, ffn, experts, top_k, expert_ffn, shared, max_pos, hf_name):
    """Qwen2-MoE config.json (Qwen1.5-MoE, Qwen2-57B-A14B): QKV bias, vocab 151936, rope_theta 1e6,
    rms_norm_eps 1e-6, norm_topk_prob false, a shared expert with a sigmoid gate, every layer MoE."""
    return ArchSpec(layers, hidden, heads, groups, ffn, 151936, max_pos, 1_000_000.0, 1e-6, hf_name=hf_name,
                    qkv_bias=True, family="qwen2_moe", num_experts=experts, moe_top_k=top_k,
                    moe_ffn_hidden_size=expert_ffn, moe_norm_topk=False, moe_shared_expert_size=shared,
                    moe_shared_expert_gate=True)


def _qwen3(layers, hidden, heads, groups, ffn, max_pos, rope, hf_name, **moe):
    """Qwen/Qwen3-* config.json: QK-norm, no QKV bias, head_dim 128, vocab 151936,
    rms_norm_eps 1e-6, untied; the MoE sizes (Qwen3-Coder-30B-A3B) route 8 of 128 experts with
    norm_topk_prob true."""
    return ArchSpec(layers, hidden, heads, groups, ffn, 151936, max_pos, rope, 1e-6, hf_name=hf_name,
                    kv_channels=128, qk_norm=True, family="qwen3_moe" if moe else "qwen3", **moe)


PRESETS: dict[str, ArchSpec] = {
    # CPU demo and tests: CodeLlama's architecture (GQA, rope 1e6) at toy size.
    "tiny": ArchSpec(4, 128, 4, 2, 352, 2048, 1024, _CODELLAMA_ROPE),
    "codellama-7b": ArchSpec(32, 4096, 32, 32, 11008, 32016, 16384, _CODELLAMA_ROPE,
                             hf_name="codellama/CodeLlama-7b-hf"),
    "codellama-13b": ArchSpec(40, 5120, 40, 40, 13824, 32016, 16384, _CODELLAMA_ROPE,
                              hf_name="codellama/CodeLlama-13b-hf"),
    "codellama-34b": ArchSpec(48, 8192, 64, 8, 22016, 32000, 16384, _CODELLAMA_ROPE,
                              hf_name="codellama/CodeLlama-34b-hf"),
    "llama2-7b": ArchSpec(32, 4096, 32, 32, 11008, 32000, 4096, _LLAMA2_ROPE,
                          hf_name="meta-llama/Llama-2-7b-hf"),
    "llama2-13b": ArchSpec(40, 5120, 40, 40, 13824, 32000, 4096, _LLAMA2_ROPE,
                           hf_name="meta-llama/Llama-2-13b-hf"),
    "llama2-70b": ArchSpec(80, 8192, 64, 8, 28672, 32000, 4096, _LLAMA2_ROPE,
                           hf_name="meta-llama/Llama-2-70b-hf"),
    # Llama-3.x: GQA, llama3 RoPE scaling; 3.2 1B/3B tie the output layer to the embedding.
    "llama3.1-8b": _llama3(32, 4096, 32, 14336, 8.0, False, "meta-llama/Llama-3.1-8B"),
    "llama3.1-70b": _llama3(80, 8192, 64, 28672, 8.0, False, "meta-llama/Llama-3.1-70B"),
    "llama3.2-1b": _llama3(16, 2048, 32, 8192, 32.0, True, "meta-llama/Llama-3.2-1B"),
    "llama3.2-3b": _llama3(28, 3072, 24, 8192, 32.0, True, "meta-llama/Llama-3.2-3B"),
    # Qwen2.5-Coder: QKV bias, GQA, padded vocabularies; the small sizes tie their embeddings.
    "qwen2.5-coder-0.5b": _qwen25_coder(24, 896, 14, 2, 4864, 151936, True, "Qwen/Qwen2.5-Coder-0.5B"),
    "qwen2.5-coder-1.5b": _qwen25_coder(28, 1536, 12, 2, 8960, 151936, True, "Qwen/Qwen2.5-Coder-1.5B"),
    "qwen2.5-coder-3b": _qwen25_coder(36, 2048, 16, 2, 11008, 151936, True, "Qwen/Qwen2.5-Coder-3B"),
    "qwen2.5-coder-7b": _qwen25_coder(28, 3584, 28, 4, 18944, 152064, False, "Qwen/Qwen2.5-Coder-7B"),
    "qwen2.5-coder-14b": _qwen25_coder(48, 5120, 40, 8, 13824, 152064, False, "Qwen/Qwen2.5-Coder-14B"),
    "qwen2.5-coder-32b": _qwen25_coder(64, 5120, 40, 8, 27648, 152064, False, "Qwen/Qwen2.5-Coder-32B"),
    # DeepSeek-Coder (v1): the Llama graph with linear RoPE scaling.
    "deepseek-coder-1.3b": _deepseek_coder(24, 2048, 16, 16, 5504, "deepseek-ai/deepseek-coder-1.3b-base"),
    "deepseek-coder-6.7b": _deepseek_coder(32, 4096, 32, 32, 11008, "deepseek-ai/deepseek-coder-6.7b-base"),
    "deepseek-coder-33b": _deepseek_coder(62, 7168, 56, 8, 19200, "deepseek-ai/deepseek-coder-33b-base"),
    # Mistral: GQA; v0.1 7B has a 4096 sliding window, Codestral-22B none (config.json null).
    "mistral-7b": ArchSpec(32, 4096, 32, 8, 14336, 32000, 32768, 10_000.0, 1e-5, hf_name="mistralai/Mistral-7B-v0.1",
                           sliding_window=4096, family="mistral"),
    "codestral-22b": ArchSpec(56, 6144, 48, 8, 16384, 32768, 32768, 1_000_000.0, 1e-5,
                              hf_name="mistralai/Codestral-22B-v0.1", family="mistral"),
    # StarCoder2: LayerNorm + biases, GELU tanh MLP, sliding window 4096, rope_theta per size.
    "starcoder2-3b": _starcoder2(30, 3072, 24, 2, 999999.4420358813, True, "bigcode/starcoder2-3b"),
    "starcoder2-7b": _starcoder2(32, 4608, 36, 4, 1_000_000.0, True, "bigcode/starcoder2-7b"),
    "starcoder2-15b": _starcoder2(40, 6144, 48, 4, 100_000.0, False, "bigcode/starcoder2-15b"),
    # Mixture of experts (model/moe.py, docs/moe.md)
    "mixtral-8x7b": _mixtral(32, 4096, 32, 14336, 32768, "mistralai/Mixtral-8x7B-v0.1"),
    "mixtral-8x22b": _mixtral(56, 6144, 48, 16384, 65536, "mistralai/Mixtral-8x22B-v0.1"),
    "qwen1.5-moe-a2.7b": _qwen2_moe(24, 2048, 16, 16, 5632, 60, 4, 1408, 5632, 8192, "Qwen/Qwen1.5-MoE-A2.7B"),
    "qwen2-57b-a14b": _qwen2_moe(28, 3584, 28, 4, 18944, 64, 8, 2560, 20480, 131072, "Qwen/Qwen2-57B-A14B"),
    "qwen3-8b": _qwen3(36, 4096, 32, 8, 12288, 40960, 1_000_000.0, "Qwen/Qwen3-8B"),
    "qwen3-32b": _qwen3(64, 5120, 64, 8, 25600, 40960, 1_000_000.0, "Qwen/Qwen3-32B"),
    "qwen3-coder-30b-a3b": _qwen3(48, 2048, 32, 4, 6144, 262144, 10_000_000.0, "Qwen/Qwen3-Coder-30B-A3B-Instruct",
                                  num_experts=128, moe_top_k=8, moe_ffn_hidden_size=768),
}
