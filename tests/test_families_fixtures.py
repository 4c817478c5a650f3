"""Helpers for the model-family tests (no tests here): one tiny random Hugging Face model per
family, built with transformers' own config and model classes, and the megatron <-> HF logit
comparisons (unpacked rows and packed THD rows) shared by the one-process tests
(tests/test_families_hf.py) and the torchrun script (tests/scripts/families_parity.py).

Each tiny config keeps the family's distinguishing features: GQA everywhere; Llama-3 llama3 RoPE
scaling and tied embeddings (as 3.2 1B/3B); Qwen2 QKV bias; DeepSeek-Coder linear RoPE scaling
with max_position_embeddings below the test sequence; Mistral and StarCoder2 sliding windows
shorter than the test sequence; StarCoder2 LayerNorm, biases, GELU-tanh MLP, tied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import torch

_SIZES = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)

#: family name -> (transformers config class, model class, config kwargs)
FAMILY_CONFIGS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        _SIZES, max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        _SIZES, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        use_sliding_window=False)),
    "deepseek": ("LlamaConfig", "LlamaForCausalLM", dict(
        _SIZES, max_position_embeddings=16, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        _SIZES, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=12,
        tie_word_embeddings=False)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(
        _SIZES, intermediate_size=128, max_position_embeddings=128, norm_epsilon=1e-5, rope_theta=1e5,
        sliding_window=12, use_bias=True, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)),
}
FAMILIES = tuple(FAMILY_CONFIGS)
#: expected megatron-side family (registry entry) of each tiny model
REGISTRY_FAMILY = {"llama3": "llama", "qwen2": "qwen2", "deepseek": "llama", "mistral": "mistral",
                   "starcoder2": "starcoder2"}
VOCAB = _SIZES["vocab_size"]
#: unpacked rows and packed samples longer than the windows (12) and DeepSeek's 16 positions
SEQ = 40
PACKED_LENGTHS = [[17, 23], [40], [9, 31]]
TOL = 1e-4


def make_family_model(name: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random fp32 model of family ``name`` saved with ``save_pretrained`` (several shards),
    weights scaled so logits are O(1-10)."""
    import transformers

    cfg_cls, model_cls, kwargs = FAMILY_CONFIGS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**kwargs, **overrides})).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lm_head" in pname:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, max_shard_size="60KB")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, "test_marker": name}))
    return out


def make_all(root: Path) -> dict[str, Path]:
    return {name: make_family_model(name, root / name) for name in FAMILIES}


def tokens(seed: int = 11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (len(PACKED_LENGTHS), SEQ), generator=torch.Generator().manual_seed(seed))


def packed_inputs(toks: torch.Tensor) -> dict:
    """THD inputs for the rows of ``toks`` packed as PACKED_LENGTHS (positions restart per sample)."""
    from megatron_mft.model import build_packed_seq_params

    lengths = [n for row in PACKED_LENGTHS for n in row]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return dict(input_ids=toks.reshape(1, -1), position_ids=pos,
                packed_seq_params=build_packed_seq_params(cu, max(lengths), "cpu"))


def hf_reference(hf_dir: Path, toks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' logits: each row as one sequence, and each packed sample alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        rows = model(input_ids=toks).logits.float()
        samples = []
        for r, row in enumerate(PACKED_LENGTHS):
            start = 0
            for n in row:
                samples.append(model(input_ids=toks[r:r + 1, start:start + n]).logits[0].float())
                start += n
    return rows, samples


@torch.no_grad()
def megatron_forward(chunks: list, inputs: dict, hidden_shape: tuple[int, int]) -> torch.Tensor | None:
    """Full-vocabulary logits on the last pipeline stage (None elsewhere); stages hand the
    hidden state [s, b, h] on with send/recv (no sequence parallelism across stages)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    (model,) = chunks
    model.eval()
    cfg = model.config
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(*hidden_shape, cfg.hidden_size, dtype=cfg.params_dtype)
        torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(attention_mask=None, **inputs)
    if not ps.is_pipeline_last_stage():
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)[..., :VOCAB].float()


def parity(chunks: list, hf_dir: Path, toks: torch.Tensor | None = None,
           compare: bool = True) -> tuple[float, float] | None:
    """(max |megatron - HF| unpacked, packed) on the last stage; None on other stages and where
    ``compare`` is false (the transformers reference is computed once per layout)."""
    toks = tokens() if toks is None else toks
    b, s = toks.shape
    pos = torch.arange(s)[None].expand(b, s)
    rows = megatron_forward(chunks, dict(input_ids=toks, position_ids=pos), (s, b))
    packed = megatron_forward(chunks, packed_inputs(toks), (b * s, 1))
    if rows is None or not compare:
        return None
    ref_rows, ref_samples = hf_reference(hf_dir, toks)
    assert ref_rows.abs().max() > 1.0  # logits of a meaningful size
    packed = packed.reshape(b * s, -1)
    got = []
    start = 0
    for ref in ref_samples:
        got.append((packed[start:start + ref.shape[0]] - ref).abs().max().item())
        start += ref.shape[0]
    return (rows - ref_rows).abs().max().item(), max(got)
