"""Family chat formats (data.template / --template llama3, qwen2, deepseek-coder, mistral,
starcoder2) against each family's official ``chat_template`` Jinja, rendered and tokenized by
transformers' ``apply_chat_template``: token for token on multi-turn samples (with a system turn
where the family has a system role), loss exactly on the assistant turns' content and their
end-of-turn token, and the family's BOS/EOS.

The Jinja strings are the ``chat_template`` of each model's tokenizer_config.json on the Hugging
Face hub: meta-llama/Meta-Llama-3-8B-Instruct, Qwen/Qwen2.5-Coder-7B-Instruct (its tool-less
branch, which is what plain conversations take), deepseek-ai/deepseek-coder-6.7b-instruct,
mistralai/Mistral-7B-Instruct-v0.1, bigcode/starcoder2-15b-instruct-v0.1. The tokenizers are tiny
byte-level BPEs trained here with each family's special tokens (the real vocabularies are not
available offline); Mistral's pre-tokenizer isolates whitespace, so that the comparison is about
the format, not about merges of "[INST] " with the next word.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
QWEN2 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
         "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
         "helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == "
         "\"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}"
         "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
DEEPSEEK = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
            "{%- set ns = namespace(found=false) -%}{%- for message in messages -%}{%- if message['role'] == "
            "'system' -%}{%- set ns.found = true -%}{%- endif -%}{%- endfor -%}{{bos_token}}{%- if not ns.found -%}"
            "{{'You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek "
            "Company, and you only answer questions related to computer science. For politically sensitive "
            "questions, security and privacy issues, and other non-computer science questions, you will refuse "
            "to answer\n'}}{%- endif %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
            "{{ message['content'] }}{%- else %}{%- if message['role'] == 'user' %}{{'### Instruction:\n' + "
            "message['content'] + '\n'}}{%- else %}{{'### Response:\n' + message['content'] + '\n<|EOT|>\n'}}"
            "{%- endif %}{%- endif %}{%- endfor %}{% if add_generation_prompt %}{{'### Response:'}}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
           "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception("
           "'Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
STARCODER2 = ("{{bos_token}}{{'You are an exceptionally intelligent coding assistant that consistently delivers "
              "accurate and reliable responses to user instructions.\n\n'}}\n{%- for message in messages %}\n"
              "    {%- if message['role'] == 'system' %}\n        {{ raise_exception('System messages are not "
              "allowed in this template.') }}\n    {%- else %}\n        {%- if message['role'] == 'user' %}\n"
              "{{'### Instruction\n' + message['content'] + '\n\n'}}\n        {%- else %}\n{{'### Response\n' + "
              "message['content'] + eos_token + '\n\n'}}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
              "{{'### Response\n'}}")

#: template -> (official Jinja, special tokens, bos, eos, end-of-turn string that takes loss, has system)
FAMILIES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", True),
    "qwen2": (QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>", True),
    "deepseek-coder": (DEEPSEEK, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|EOT|>"],
                       "<｜begin▁of▁sentence｜>", "<|EOT|>", "\n<|EOT|>", True),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", False),
    "starcoder2": (STARCODER2, ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", False),
}

CONVERSATION = [
    ("system", "You write short, correct Python."),
    ("human", "Write a function that adds two numbers."),
    ("bot", "def add(a, b):\n    return a + b"),
    ("human", "Now make it add three numbers, please!\n"),  # Llama-3 trims it
    ("bot", "def add3(a, b, c):\n    return a + b + c"),
]
HF_ROLE = {"system": "system", "human": "user", "bot": "assistant"}
CORPUS = [t for _, t in CONVERSATION] * 3 + ["### Instruction ### Response You are an AI programming assistant"]


def _tokenizer_folder(root: Path, name: str) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    jinja, specials, bos, eos, _, _ = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=name != "mistral")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), "isolated"), byte_level])
                         if name == "mistral" else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    out = root / name
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": jinja}))
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_tokenizers")
    return {name: _tokenizer_folder(root, name) for name in FAMILIES}


def _ours(folder: Path, name: str, turns):
    from megatron_mft.data.records import Record
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    formatter = ChatFormatter(load_template(name), load_tokenizer(str(folder)))
    ids, mask = formatter.encode([Record(turns=tuple(turns))])[0]
    return ids.tolist(), mask


@pytest.mark.parametrize("name", FAMILIES)
def test_family_format_equals_official_chat_template(tokenizers, name):
    from transformers import AutoTokenizer

    _, _, _, _, end_of_turn, has_system = FAMILIES[name]
    turns = CONVERSATION if has_system else CONVERSATION[1:]
    hf = AutoTokenizer.from_pretrained(str(tokenizers[name]))
    messages = [{"role": HF_ROLE[r], "content": c} for r, c in turns]
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                 return_dict=False)
    want = list(want)
    ids, mask = _ours(tokenizers[name], name, turns)
    if name == "starcoder2":  # its template always ends with the next turn's header (a generation prompt)
        tail = hf.encode("### Response\n", add_special_tokens=False)
        assert want[len(ids):] == tail
        want = want[:len(ids)]
    assert ids == want, (hf.convert_ids_to_tokens(ids), hf.convert_ids_to_tokens(want))
    # loss exactly on each assistant turn's content + its end-of-turn token(s)
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(hf.decode(ids[start:i]))
            start = None
    assert runs == [c + end_of_turn for r, c in turns if r == "bot"]
    assert mask.dtype == np.uint8 and mask[0] == 0


def test_family_defaults_and_refusals(tokenizers):
    """Qwen and DeepSeek insert their default system prompt; formats without a system role
    refuse a system turn by name; a special token typed by the user stays text."""
    from megatron_mft.data.template import TemplateError
    from transformers import AutoTokenizer

    for name in ("qwen2", "deepseek-coder"):
        hf = AutoTokenizer.from_pretrained(str(tokenizers[name]))
        turns = CONVERSATION[1:3]
        want = hf.apply_chat_template([{"role": HF_ROLE[r], "content": c} for r, c in turns], tokenize=True,
                                     return_dict=False)
        want = list(want)
        assert _ours(tokenizers[name], name, turns)[0] == want, name
    for name in ("mistral", "starcoder2"):
        with pytest.raises(TemplateError, match=f"template {name}: the family's chat format has no system role"):
            _ours(tokenizers[name], name, CONVERSATION)
    hf = AutoTokenizer.from_pretrained(str(tokenizers["qwen2"]))
    ids, _ = _ours(tokenizers["qwen2"], "qwen2", [("human", "fake <|im_end|> end"), ("bot", "ok")])
    assert ids.count(hf.convert_tokens_to_ids("<|im_end|>")) == 3  # system, human, bot: not the typed one


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_generation_prompt_equals_add_generation_prompt(tokenizers, name):
    """Evaluation's prompt ids (ChatFormatter.prompt_ids): the turns, then the assistant header."""
    from megatron_mft.data.records import Turn
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer
    from transformers import AutoTokenizer

    turns = CONVERSATION[:2]
    hf = AutoTokenizer.from_pretrained(str(tokenizers[name]))
    want = hf.apply_chat_template([{"role": HF_ROLE[r], "content": c} for r, c in turns], tokenize=True,
                                  add_generation_prompt=True, return_dict=False)
    formatter = ChatFormatter(load_template(name), load_tokenizer(str(tokenizers[name])))
    assert formatter.prompt_ids([Turn(r, c) for r, c in turns]) == list(want)
