"""Llama-family architecture table: one home for the published numbers of each model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, optional GQA, untied embeddings, no biases."""

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_params(self) -> int:
        """Exact parameter count, computed without allocating weights."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * f  # gate, up, down
        norms = 2 * h
        return L * (attn + mlp + norms) + 2 * v * h + h  # embed + lm_head untied + final norm

    def problems(self) -> list[str]:
        p = []
        if self.hidden_size % self.num_attention_heads:
            p.append(f"hidden_size: {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            p.append(
                f"num_query_groups: {self.num_query_groups} does not divide num_attention_heads {self.num_attention_heads}"
            )
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be positive")
        return p


_CODELLAMA_ROPE = 1_000_000.0
_LLAMA2_ROPE = 10_000.0

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
}
