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


def make_family_model(name: str, out: Path, seed: int = 0, embed_std: float = 1.0, **overrides) -> Path:
    """A random fp32 model of family ``name`` saved with ``save_pretrained`` (several shards),
    weights scaled so logits are O(1-10) (``embed_std``: of the input embedding; a training start
    with tied embeddings wants it small, or its logits are O(10) and the loss far from ln(vocab))."""
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
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
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


# --------------------------------------------------------------------------- tokenizers
#: Stand-ins for the families' byte-level BPE ``tokenizer.json`` files (the real ones are not on
#: the package registries): each family's pre-tokenizer (Llama-3's and Qwen2's split regex from
#: their tokenizer.json, StarCoder2's single digits + GPT-2 byte level, Mistral v3's SentencePiece-
#: style Metaspace), byte-level decoder, and special tokens at their real ids in a vocabulary of the
#: real size (merges trained here on ``corpus``; unreachable filler entries pad the ids).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
_L31_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
_QWEN25_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                    "<|repo_name|>", "<|file_sep|>"]
_SC2_SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
                 "<file_sep>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
                 "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
_MISTRAL_V3_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                        "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                        *(f"[control_{i}]" for i in range(8, 769))]
#: name -> (first special id, specials, vocabulary size, bos, eos): Meta-Llama-3.1-8B-Instruct
#: (128000.., 128256, eos <|eot_id|>), Qwen2.5-Coder-*-Instruct (151643.., 151665 tokens, no BOS,
#: eos <|im_end|>), starcoder2 (0.., 49152), Mistral-7B-Instruct-v0.3 (0..770 control tokens, 32768)
TOKENIZER_SPECS = {
    "llama3": (128000, _L31_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)], 128256,
               "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": (151643, _QWEN25_SPECIALS, 151665, None, "<|im_end|>"),
    "starcoder2": (0, _SC2_SPECIALS, 49152, "<|endoftext|>", "<|endoftext|>"),
    "mistral-v3": (0, _MISTRAL_V3_SPECIALS, 32768, "<s>", "</s>"),
}


def make_family_tokenizer(name: str, out: Path, corpus: list[str], merges_vocab: int = 1000,
                          chat_template: str | None = None) -> Path:
    """A tokenizer folder (tokenizer.json + tokenizer_config.json) standing in for family ``name``'s."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    first, specials, size, bos, eos = TOKENIZER_SPECS[name]
    metaspace = name == "mistral-v3"
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True) if metaspace else models.BPE())
    if metaspace:  # Llama/Mistral SentencePiece conversion: byte fallback <0x00>.. after the control tokens
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=name == "starcoder2")
        split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(name)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), "isolated"), byte_level] if split
            else [pre_tokenizers.Digits(individual_digits=True), byte_level])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        if name == "qwen2":
            tok.normalizer = normalizers.NFC()
    at_front = (specials if first == 0 else []) + ([f"<0x{b:02X}>" for b in range(256)] if metaspace else [])
    trainer = trainers.BpeTrainer(vocab_size=merges_vocab + len(at_front), special_tokens=at_front,
                                  initial_alphabet=[] if metaspace else pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    if first:  # pad up to the first special id with entries no merge produces
        vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), first)})
        vocab.update({s: first + i for i, s in enumerate(specials)})
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), size)})
    if name == "llama3":
        spec["model"]["ignore_merges"] = True
    spec["added_tokens"] = [dict(id=vocab[s], content=s, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=s not in ("<tool_call>", "</tool_call>"))
                            for s in specials]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "model_max_length": 131072, "clean_up_tokenization_spaces": False}
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def demo_texts(per_task: int = 60) -> list[str]:
    """Turn contents and documents of the demo data's validation files (code, with blank lines)."""
    from megatron_mft.data.records import parse_line

    out = []
    for f in sorted((Path(__file__).resolve().parents[1] / "examples" / "demo_data" / "raw").glob("*/val.jsonl")):
        for line in f.read_bytes().split(b"\n")[:per_task]:
            rec = parse_line(line)
            if rec is not None:
                out += [t.content for t in rec.turns] if rec.text is None else [rec.text]
    return out


def family_tokenizer(name: str, tmp_path_factory) -> Path:
    """The stand-in of ``name`` with 1500 merges trained on :func:`demo_texts`, built once per test
    session (the template and tokenizer tests share it)."""
    out = tmp_path_factory.getbasetemp() / "family_tokenizers" / name
    if not (out / "tokenizer_config.json").is_file():
        # files end with blank lines: the real vocabularies hold newline runs ("ĊĊ") as tokens
        make_family_tokenizer(name, out, demo_texts() + ["x = 1\n\n", "y\n\n\n"] * 20, merges_vocab=1500)
    return out
