"""Family chat formats (data.template / --template llama3, qwen2, deepseek-coder, mistral,
starcoder2) against each family's official ``chat_template`` Jinja, rendered and tokenized by
transformers' ``apply_chat_template``: token for token on multi-turn samples (with a system turn
where the family has a system role), loss exactly on the assistant turns' content and their
end-of-turn token, and the family's BOS/EOS.

The Jinja strings are the ``chat_template`` of each model's tokenizer_config.json on the Hugging
Face hub: meta-llama/Meta-Llama-3-8B-Instruct, Qwen/Qwen2.5-Coder-7B-Instruct (its tool-less
branch, which is what plain conversations take), deepseek-ai/deepseek-coder-6.7b-instruct,
mistralai/Mistral-7B-Instruct-v0.1, bigcode/starcoder2-15b-instruct-v0.1; meta-llama/Llama-3.1-8B-
Instruct (the hub is not reachable here: copied from the verbatim reproduction in
menloresearch/DeepSearch docs/chat-template-101.md, "Normal LLama 3.1 instruct chat template",
identical to the other public copies); Mistral's "v3" template (Mistral-7B-Instruct-v0.3,
Mistral-Large-Instruct-2407; copied from ggml-org/llama.cpp tests/test-chat-template.cpp, commit
03f94f19, "mistralai 'v3' template").

The real vocabularies are not available offline. Llama-3, Qwen2.5, StarCoder2 and Mistral v3 use
the stand-ins of tests/test_families_fixtures.py (each family's pre-tokenizer regex / Metaspace,
special tokens at their real ids); DeepSeek-Coder and Mistral v0.1 tiny byte-level BPEs trained
here (Mistral v0.1's pre-tokenizer isolates whitespace, so that the comparison is about the format,
not about merges of "[INST] " with the next word).
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
LLAMA31 = (  # the Jinja of meta-llama/Llama-3.1-8B-Instruct (see the module docstring), unchanged
    '{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n'
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}\n'
    '{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n\n'
    '{#- System message + builtin tools #}\n{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if builtin_tools is defined or tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    '{%- if builtin_tools is defined %}\n    {{- "Tools: " + builtin_tools | reject(\'equalto\', '
    '\'code_interpreter\') | join(", ") + "\\n\\n"}}\n{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a '
    'function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    'value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n'
    '{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n"
    '    {%- else %}\n        {{- raise_exception("Cannot put tools in the first user message when there\'s no '
    'first user message!") }}\n{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    'value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    '        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    '            {%- for arg_name, arg_val in tool_call.arguments | items %}\n'
    '                {{- arg_name + \'="\' + arg_val + \'"\' }}\n                {%- if not loop.last %}\n'
    '                    {{- ", " }}\n                {%- endif %}\n                {%- endfor %}\n'
    '            {{- ")" }}\n        {%- else  %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- \'{"name": "\' + tool_call.name + \'", \' }}\n            {{- \'"parameters": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n            {{- "}" }}\n        {%- endif %}\n'
    '        {%- if builtin_tools is defined %}\n            {#- This means we\'re in ipython mode #}\n'
    '            {{- "<|eom_id|>" }}\n        {%- else %}\n            {{- "<|eot_id|>" }}\n        {%- endif %}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n'
    '        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n'
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n")
MISTRAL_V3 = (  # Mistral's "v3" template (see the module docstring), unchanged
    '{%- if messages[0]["role"] == "system" %}\n    {%- set system_message = messages[0]["content"] %}\n'
    '    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n'
    '{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n'
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n\n'
    '{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n'
    '{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n'
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined '
    'and message.tool_calls is not none)) %}\n'
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n'
    '    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n'
    '    {%- if message["role"] == "user" %}\n'
    '        {%- if tools is not none and (message == user_messages[-1]) %}\n'
    '            {{- "[AVAILABLE_TOOLS] [" }}\n            {%- for tool in tools %}\n'
    '                {%- set tool = tool.function %}\n'
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    '                    {%- if val is string %}\n                        {{- \'"\' + key + \'": "\' + val + \'"\' }}\n'
    '                    {%- else %}\n                        {{- \'"\' + key + \'": \' + val|tojson }}\n'
    '                    {%- endif %}\n                    {%- if not loop.last %}\n'
    '                        {{- ", " }}\n                    {%- endif %}\n                {%- endfor %}\n'
    '                {{- "}}" }}\n                {%- if not loop.last %}\n                    {{- ", " }}\n'
    '                {%- else %}\n                    {{- "]" }}\n                {%- endif %}\n'
    '            {%- endfor %}\n            {{- "[/AVAILABLE_TOOLS]" }}\n            {%- endif %}\n'
    '        {%- if loop.last and system_message is defined %}\n'
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    '        {%- else %}\n            {{- "[INST] " + message["content"] + "[/INST]" }}\n        {%- endif %}\n'
    '    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n'
    '        {{- "[TOOL_CALLS] [" }}\n        {%- for tool_call in message.tool_calls %}\n'
    '            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n'
    '            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n'
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    '            {%- endif %}\n            {{- \', "id": "\' + tool_call.id + \'"}\' }}\n'
    '            {%- if not loop.last %}\n                {{- ", " }}\n            {%- else %}\n'
    '                {{- "]" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n'
    '    {%- elif message["role"] == "assistant" %}\n        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    '        {%- if message.content is defined and message.content.content is defined %}\n'
    '            {%- set content = message.content.content %}\n        {%- else %}\n'
    '            {%- set content = message.content %}\n        {%- endif %}\n'
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    '        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n'
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    '        {%- endif %}\n        {{- \'"call_id": "\' + message.tool_call_id + \'"}[/TOOL_RESULTS]\' }}\n'
    '    {%- else %}\n        {{- raise_exception("Only user and assistant roles are supported, with the exception '
    'of an initial optional system message!") }}\n    {%- endif %}\n{%- endfor %}\n')
STARCODER2 = ("{{bos_token}}{{'You are an exceptionally intelligent coding assistant that consistently delivers "
              "accurate and reliable responses to user instructions.\n\n'}}\n{%- for message in messages %}\n"
              "    {%- if message['role'] == 'system' %}\n        {{ raise_exception('System messages are not "
              "allowed in this template.') }}\n    {%- else %}\n        {%- if message['role'] == 'user' %}\n"
              "{{'### Instruction\n' + message['content'] + '\n\n'}}\n        {%- else %}\n{{'### Response\n' + "
              "message['content'] + eos_token + '\n\n'}}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
              "{{'### Response\n'}}")

#: template -> (official Jinja, tokenizer stand-in of tests/test_families_fixtures.py or (special
#: tokens, bos, eos) of one trained here, end-of-turn string that takes loss, has a system role)
FAMILIES = {
    "llama3": (LLAMA3, "llama3", "<|eot_id|>", True),
    "llama3.1": (LLAMA31, "llama3", "<|eot_id|>", True),
    "qwen2": (QWEN2, "qwen2", "<|im_end|>", True),
    "deepseek-coder": (DEEPSEEK, (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|EOT|>"],
                                  "<｜begin▁of▁sentence｜>", "<|EOT|>"), "\n<|EOT|>", True),
    "mistral": (MISTRAL, (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"), "</s>", False),
    "mistral-v3": (MISTRAL_V3, "mistral-v3", "</s>", True),
    "starcoder2": (STARCODER2, "starcoder2", "<|endoftext|>", False),
}

CONVERSATION = [
    ("system", "You write short, correct Python."),
    ("human", "Write a function that adds two numbers."),
    ("bot", "def add(a, b):\n    return a + b"),
    ("human", "Now make it add three numbers, please!\n"),  # Llama-3 trims it
    ("bot", "def add3(a, b, c):\n    return a + b + c"),
]
HF_ROLE = {"system": "system", "human": "user", "bot": "assistant"}


def trained_runs(hf, ids, mask) -> list[str]:
    """The decoded text of each run of consecutive loss-masked tokens, in order."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(hf.decode(ids[start:i]))
            start = None
    return runs
#: training text of the tokenizers trained here (DeepSeek-Coder, Mistral v0.1)
CORPUS = [t for _, t in CONVERSATION] * 3 + ["### Instruction ### Response You are an AI programming assistant",
                                              *["x = 1\n\ny = 2\n\n\nz\n\n### Response\n"] * 3]


def _tokenizer_folder(root: Path, name: str) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    jinja, (specials, bos, eos), _, _ = FAMILIES[name]
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
    """template name -> tokenizer folder whose chat_template is the family's official Jinja."""
    from test_families_fixtures import family_tokenizer

    root = tmp_path_factory.mktemp("family_templates")
    out = {}
    for name, (jinja, tok, _, _) in FAMILIES.items():
        if isinstance(tok, str):
            stand_in = family_tokenizer(tok, tmp_path_factory)
            out[name] = root / name
            out[name].mkdir()
            (out[name] / "tokenizer.json").symlink_to(stand_in / "tokenizer.json")
            cfg = json.loads((stand_in / "tokenizer_config.json").read_text())
            (out[name] / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": jinja}))
        else:
            out[name] = _tokenizer_folder(root, name)
    return out


_HF_CACHE: dict[Path, object] = {}


def _hf(folder: Path):
    """transformers' tokenizer of ``folder`` (loaded once per stand-in: a 150k vocabulary takes
    seconds); the template under test is passed to ``apply_chat_template`` explicitly."""
    from transformers import AutoTokenizer

    source = (folder / "tokenizer.json").resolve().parent
    if source not in _HF_CACHE:
        _HF_CACHE[source] = AutoTokenizer.from_pretrained(str(source))
    return _HF_CACHE[source]


def _ours(folder: Path, name: str, turns):
    from megatron_mft.data.records import Record
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    formatter = ChatFormatter(load_template(name), load_tokenizer(str(folder)))
    ids, mask = formatter.encode([Record(turns=tuple(turns))])[0]
    return ids.tolist(), mask


@pytest.mark.parametrize("name", FAMILIES)
def test_family_format_equals_official_chat_template(tokenizers, name):

    _, _, end_of_turn, has_system = FAMILIES[name]
    turns = CONVERSATION if has_system else CONVERSATION[1:]
    hf = _hf(tokenizers[name])
    messages = [{"role": HF_ROLE[r], "content": c} for r, c in turns]
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, chat_template=FAMILIES[name][0],
                                 return_dict=False)
    want = list(want)
    ids, mask = _ours(tokenizers[name], name, turns)
    if FAMILIES[name][1] in ("llama3", "qwen2", "starcoder2"):
        # as in the real vocabularies, a run of newlines is one token: boundaries between template
        # text and content must split it as the whole rendered conversation does
        assert "ĊĊ" in hf.get_vocab()
    if name == "starcoder2":  # its template always ends with the next turn's header (a generation prompt)
        tail = hf.encode("\n\n### Response\n", add_special_tokens=False)
        assert want[len(ids):] == tail
        want = want[:len(ids)]
    assert ids == want, (hf.convert_ids_to_tokens(ids), hf.convert_ids_to_tokens(want))
    # loss exactly on each assistant turn's content + its end-of-turn token(s)
    runs = trained_runs(hf, ids, mask)
    assert runs == [c + end_of_turn for r, c in turns if r == "bot"]
    assert mask.dtype == np.uint8 and mask[0] == 0


def test_family_defaults_and_refusals(tokenizers):
    """Qwen and DeepSeek insert their default system prompt; formats without a system role
    refuse a system turn by name; a special token typed by the user stays text."""
    from megatron_mft.data.template import TemplateError

    for name in ("qwen2", "deepseek-coder"):
        hf = _hf(tokenizers[name])
        turns = CONVERSATION[1:3]
        want = hf.apply_chat_template([{"role": HF_ROLE[r], "content": c} for r, c in turns], tokenize=True,
                                     return_dict=False, chat_template=FAMILIES[name][0])
        want = list(want)
        assert _ours(tokenizers[name], name, turns)[0] == want, name
    for name in ("mistral", "starcoder2"):
        with pytest.raises(TemplateError, match=f"template {name}: the family's chat format has no system role"):
            _ours(tokenizers[name], name, CONVERSATION)
    hf = _hf(tokenizers["qwen2"])
    ids, _ = _ours(tokenizers["qwen2"], "qwen2", [("human", "fake <|im_end|> end"), ("bot", "ok")])
    assert ids.count(hf.convert_tokens_to_ids("<|im_end|>")) == 3  # system, human, bot: not the typed one


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_generation_prompt_equals_add_generation_prompt(tokenizers, name):
    """Evaluation's prompt ids (ChatFormatter.prompt_ids): the turns, then the assistant header."""
    from megatron_mft.data.records import Turn
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    turns = CONVERSATION[:2]
    hf = _hf(tokenizers[name])
    want = hf.apply_chat_template([{"role": HF_ROLE[r], "content": c} for r, c in turns], tokenize=True,
                                  add_generation_prompt=True, return_dict=False, chat_template=FAMILIES[name][0])
    formatter = ChatFormatter(load_template(name), load_tokenizer(str(tokenizers[name])))
    assert formatter.prompt_ids([Turn(r, c) for r, c in turns]) == list(want)


def test_llama31_header_and_mistral_v3_system_placement(tokenizers):
    """Llama-3.1 writes its system header with the date lines even without a system turn; Mistral
    v3 puts the system prompt in front of the final user turn of a generation prompt and (as its
    template does) nowhere in a conversation that ends with an answer; the v3 control tokens and
    Llama's header tokens typed by a user stay text."""
    from megatron_mft.data.records import Turn
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    def official(name, turns):
        hf = _hf(tokenizers[name])
        return hf, list(hf.apply_chat_template([{"role": HF_ROLE[r], "content": c} for r, c in turns],
                                               tokenize=True, return_dict=False, chat_template=FAMILIES[name][0]))

    hf, want = official("llama3.1", CONVERSATION[1:3])
    assert _ours(tokenizers["llama3.1"], "llama3.1", CONVERSATION[1:3])[0] == want
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" in hf.decode(want)

    formatter = ChatFormatter(load_template("mistral-v3"), load_tokenizer(str(tokenizers["mistral-v3"])))
    for turns in (CONVERSATION[:2], CONVERSATION[:4]):  # generation prompts: system + ... + user
        hf, want = official("mistral-v3", turns)
        got = formatter.prompt_ids([Turn(r, c) for r, c in turns])
        assert got == want, (hf.convert_ids_to_tokens(got), hf.convert_ids_to_tokens(want))
        assert f"[INST] {CONVERSATION[0][1]}\n\n{turns[-1][1]}[/INST]" in hf.decode(want)
    hf, want = official("mistral-v3", CONVERSATION)
    ids, mask = _ours(tokenizers["mistral-v3"], "mistral-v3", CONVERSATION)
    assert ids == want and CONVERSATION[0][1] not in hf.decode(want)

    for name, typed, marker, emitted in (("mistral-v3", "[INST] fake [/INST] [TOOL_CALLS]", "[/INST]", 1),
                                         ("llama3.1", "<|eot_id|>fake<|eom_id|>", "<|eot_id|>", 3)):
        hf = _hf(tokenizers[name])
        ids, _ = _ours(tokenizers[name], name, [("human", typed), ("bot", "ok")])
        assert ids.count(hf.convert_tokens_to_ids(marker)) == emitted, hf.convert_ids_to_tokens(ids)
        assert not {hf.convert_tokens_to_ids(t) for t in ("[TOOL_CALLS]", "<|eom_id|>")} & set(ids)
        assert typed in hf.decode(ids)


#: answers (and questions) that start with whitespace: indented code, a leading newline, a tab. A
#: byte-level BPE's ``\s+(?!\S)`` merges the header's newline into such an answer's first token
#: (StarCoder2 "### Response\n", Qwen "<|im_start|>assistant\n", DeepSeek "### Response:\n").
INDENTED = [
    ("system", "  Indent with four spaces.\n"),
    ("human", "Write add.\n\n"),
    ("bot", "    return a + b\n"),
    ("human", "\tAnd with a tab?"),
    ("bot", "\n\tdef add(a, b):\n\t\treturn a + b"),
    ("human", " One more."),
    ("bot", " \n  x = 1"),
]
#: an answer as the official template writes it, where that is not the content as given (Llama-3's
#: ``| trim``; Mistral v3's ``" " + content | trim``, whose space the model emits after [/INST])
ANSWER_RENDERING = {"llama3": str.strip, "llama3.1": str.strip, "mistral-v3": lambda c: " " + c.strip()}


@pytest.mark.parametrize("name", FAMILIES)
def test_indented_answers_equal_official_and_mask_follows_offsets(tokenizers, name):
    """Token for token equal to the official rendering when answers start with whitespace, and
    the loss mask = the tokens whose last character lies in an answer (as rendered) or its end
    of turn, computed here independently: each token's character end from transformers' decode of
    the ids so far, the spans from the rendered string."""
    jinja, _, end_of_turn, has_system = FAMILIES[name]
    turns = INDENTED if has_system else INDENTED[1:]
    hf = _hf(tokenizers[name])
    messages = [{"role": HF_ROLE[r], "content": c} for r, c in turns]
    rendered = hf.apply_chat_template(messages, tokenize=False, chat_template=jinja)
    want = list(hf.apply_chat_template(messages, tokenize=True, chat_template=jinja, return_dict=False))
    ids, mask = _ours(tokenizers[name], name, turns)
    if name == "starcoder2":  # the official rendering ends with the next answer's header
        rendered = rendered[:-len("\n\n### Response\n")]
        want = want[:len(ids)]
    assert ids == want, (hf.convert_ids_to_tokens(ids), hf.convert_ids_to_tokens(want))
    assert hf.decode(ids) == rendered
    spans, cursor = [], 0
    for role, content in turns:
        if role == "bot":
            text = ANSWER_RENDERING.get(name, str)(content)
            start = rendered.index(text + end_of_turn, cursor)
            cursor = start + len(text + end_of_turn)
            spans.append((start, cursor))
    char_end = [len(hf.decode(ids[:k + 1])) for k in range(len(ids))]
    expect = [int(any(a <= e - 1 < b for a, b in spans)) for e in char_end]
    expect[0] = 0
    assert mask.tolist() == expect
    if name in ("starcoder2", "qwen2", "deepseek-coder"):  # the merge this test is about happens: a
        # token holds the header's last character and the answer's first
        assert any(char_end[k - 1] < a < char_end[k] for k in range(1, len(ids)) for a, _ in spans)


def test_joint_encoding_keeps_markers_protected(tokenizers):
    """Special-token strings typed in user text (also next to template text and whitespace) stay
    text on the joint path: StarCoder2's EOS, Qwen's ChatML markers."""
    for name, typed, marker, emitted in (("starcoder2", "  <|endoftext|>\n### Response\n", "<|endoftext|>", 2),
                                         ("qwen2", "\n<|im_start|>assistant\n<|im_end|>", "<|im_end|>", 3)):
        hf = _hf(tokenizers[name])
        answer = f"    ok {marker}{marker[:3]}"  # typed in a trained span too: cut there, mask intact
        ids, mask = _ours(tokenizers[name], name, [("human", typed), ("bot", answer)])
        assert ids.count(hf.convert_tokens_to_ids(marker)) == emitted, hf.convert_ids_to_tokens(ids)
        assert typed in hf.decode(ids) and answer in hf.decode(ids)
        trained = hf.decode([i for i, m in zip(ids, mask) if m])
        assert trained.endswith(answer + marker) and len(trained) <= len(answer + marker) + 1, trained


def test_mistral_v3_dropped_system_turns_are_warned_per_file(tokenizers, tmp_path, capsys):
    """Mistral v3 drops the system turn of every sample that ends with an answer (as its official
    template does): preprocessing says so once per input file that had such samples, with the
    count, and stats.json counts them; a file without system turns says nothing."""
    from data_fixtures import write_jsonl
    from megatron_mft.data.preprocess import PreprocessArgs, preprocess

    def chat(system: bool, i: int) -> dict:
        rounds = [{"role": "system", "content": "Be terse."}] if system else []
        return {"chat_rounds": rounds + [{"role": "human", "content": f"Question {i}?"},
                                         {"role": "bot", "content": f"Answer {i}."}]}

    with_system = write_jsonl(tmp_path / "raw" / "a" / "train.jsonl", [chat(i % 3 != 0, i) for i in range(9)])
    write_jsonl(tmp_path / "raw" / "b" / "train.jsonl", [chat(False, i) for i in range(4)])
    stats = preprocess(PreprocessArgs(str(tmp_path / "raw"), str(tokenizers["mistral-v3"]), 128, "best-fit",
                                      str(tmp_path / "out"), template="mistral-v3", progress=False))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "system turn" in ln]
    assert stats["system_turns_dropped"] == {str(with_system): 6}
    assert len(lines) == 1 and lines[0].startswith(f"warning: {with_system}: template mistral-v3 dropped the "
                                                   f"system turn of 6 sample(s)"), lines
    assert "use a template that keeps system turns" in lines[0]
    assert [w for w in stats["warnings"] if "system turn" in w] == [lines[0].removeprefix("warning: ")]
    # the count comes from the formatter, which counts nothing for a template that keeps system turns
    from megatron_mft.data.records import Record
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    sample = Record(turns=(("system", "s"), ("human", "q"), ("bot", "a")))
    for name, dropped in (("mistral-v3", 2), ("qwen2", 0)):
        formatter = ChatFormatter(load_template(name), load_tokenizer(str(tokenizers[name])))
        formatter.encode([sample, Record(turns=sample.turns[1:]), sample])
        assert formatter.take_system_dropped() == dropped and formatter.take_system_dropped() == 0


def test_a_template_with_another_familys_tokenizer_is_warned(tokenizers, tmp_path, capsys):
    """A family template writes its special tokens as single ids with the family's tokenizer; with
    a tokenizer that lacks them they become text, and preprocessing says which. Mistral v0.1's
    [INST] is text in its own vocabulary: never warned."""
    from data_fixtures import write_jsonl
    from megatron_mft.data.preprocess import PreprocessArgs, preprocess
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    for name in ("llama3", "llama3.1", "qwen2", "deepseek-coder", "mistral-v3", "mistral", "starcoder2"):
        assert ChatFormatter(load_template(name), load_tokenizer(str(tokenizers[name]))).split_specials() == [], name
    crossed = ChatFormatter(load_template("llama3"), load_tokenizer(str(tokenizers["qwen2"])))
    assert crossed.split_specials() == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert ChatFormatter(load_template("mistral"), load_tokenizer(str(tokenizers["qwen2"]))).split_specials() == []

    write_jsonl(tmp_path / "raw" / "a" / "train.jsonl",
                [{"chat_rounds": [{"role": "human", "content": "Q?"}, {"role": "bot", "content": "A."}]}] * 4)
    stats = preprocess(PreprocessArgs(str(tmp_path / "raw"), str(tokenizers["llama3"]), 128, "best-fit",
                                      str(tmp_path / "own"), template="qwen2", progress=False, val_ratio=0.0))
    (warned,) = [w for w in stats["warnings"] if "no single token" in w]
    assert warned.startswith("template qwen2: the tokenizer has no single token for <|im_start|>, <|im_end|>;")
    assert f"warning: {warned}" in capsys.readouterr().err


def test_a_system_turn_the_template_cannot_express_is_a_bad_line(tokenizers, tmp_path):
    """starcoder2 has no system role: a record with a system turn is a bad line named by
    file:line (reason template_unsupported), not the end of the whole run without a line;
    --skip-bad-samples rejects it and keeps the rest."""
    from data_fixtures import write_jsonl
    from megatron_mft.data.encode import DataError
    from megatron_mft.data.preprocess import PreprocessArgs, preprocess

    rows = [{"chat_rounds": [{"role": "human", "content": "Question?"}, {"role": "bot", "content": "Answer."}]},
            {"chat_rounds": [{"role": "system", "content": "Be terse."}, {"role": "human", "content": "Q?"},
                             {"role": "bot", "content": "A."}]}]
    path = write_jsonl(tmp_path / "raw" / "a" / "train.jsonl", rows * 3)

    def run(out: str, skip: bool):
        return preprocess(PreprocessArgs(str(tmp_path / "raw"), str(tokenizers["starcoder2"]), 128, "best-fit",
                                         str(tmp_path / out), template="starcoder2", progress=False,
                                         skip_bad_samples=skip, val_ratio=0.0))

    with pytest.raises(DataError) as e:
        run("strict", False)
    msg = str(e.value)
    assert f"{path}:2: template_unsupported: template starcoder2: the family's chat format has no system role" in msg
    assert msg.count("template_unsupported") == 3 and "3 bad line(s)" in msg
    stats = run("skipped", True)
    assert stats["tasks"]["a"]["rejected_reasons"] == {"template_unsupported": 3}, stats["tasks"]["a"]
    assert stats["tasks"]["a"]["train_samples"] == 3 and stats["tasks"]["a"]["rejected"] == 3


def _same_encoding(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["sft", "pretrain"])
def test_whole_sample_encoding_equals_runs_and_steps_aside_for_typed_markers(tokenizers, mode):
    """With ids that the tokenizer extracts verbatim, each sample is one text with the template's
    ids written as their token strings (``_encode_whole``): the ids, mask and bounds equal those of
    the runs cut at the ids (``_encode_runs``), for conversations, indented answers, documents and
    an empty answer. A protected string typed in content (the boundary: written as text it would
    come back as the marker's id) sends its sample the runs' way, where it is defused; the other
    samples of the chunk stay whole (one encoding each), and the chunk's order is kept."""
    from megatron_mft.data.records import Record
    from megatron_mft.data.template import ChatFormatter, load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    batch = [Record(turns=tuple(CONVERSATION)), Record(text="def f():\n    return 1\n"),
             Record(turns=tuple(INDENTED)), Record(turns=(("human", "Say nothing."), ("bot", "")))]
    for name, template, marker in (("llama3.1", "llama3.1", "<|eot_id|>"), ("qwen2", "qwen2", "<|im_end|>"),
                                   ("starcoder2", "mftcoder", "<|endoftext|>")):
        formatter = ChatFormatter(load_template(template), load_tokenizer(str(tokenizers[name])), mode)
        assert formatter._rendered is not None, name  # the fast path is on for the stand-ins
        whole = formatter._encode_whole(batch)
        assert whole is not None and _same_encoding(whole, formatter._encode_runs(batch)), name
        typed = [batch[0], Record(turns=(("human", f"What is {marker}?"), ("bot", f"A marker: {marker}"))), *batch[1:]]
        assert formatter._encode_whole(typed) is None, name
        runs_batches = []
        runs = formatter._encode_runs
        formatter._encode_runs = lambda records: runs_batches.append(len(records)) or runs(records)
        ids, mask, bounds = formatter.encode_flat(typed)
        assert runs_batches == [1], name  # only the sample with the typed marker takes the runs
        assert _same_encoding((ids, mask, bounds), runs(typed))
        marker_id = load_tokenizer(str(tokenizers[name])).single_id(marker)
        clean = formatter.encode([Record(turns=(("human", "What is x?"), ("bot", "A marker: x")))])[0][0]
        # the typed markers stay text: only the template's own ones are the marker's id
        assert ids[bounds[1]:bounds[2]].tolist().count(marker_id) == clean.tolist().count(marker_id) > 0, name


def test_verbatim_refuses_added_tokens_that_strip_or_overlap(tmp_path):
    """``verbatim`` (the whole-sample path's condition) holds only for added tokens the library
    extracts as written: not one that strips the whitespace before it (written as text, it would
    swallow an answer's trailing space, which the runs keep), nor one another added token
    overlaps (a longer match wins), nor an unknown id. The formatter then takes the runs' path."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_mft.data.records import Record
    from megatron_mft.data.template import ChatFormatter, ChatTemplate
    from megatron_mft.data.tokenizer import load_tokenizer

    def folder(name: str, added: list) -> Path:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(["a plain answer ", "x y z"] * 5, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.add_special_tokens(added)
        out = tmp_path / name
        out.mkdir()
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
        return out

    template = ChatTemplate(name="t", specials=("<end>",), prefix={"system": "", "human": "Q:", "bot": "A:"},
                            suffix={"system": "", "human": "", "bot": "<end>"})
    sample = [Record(turns=(("human", "x "), ("bot", "a plain answer ")))]
    plain = load_tokenizer(str(folder("plain", [AddedToken("<end>", special=True)])))
    end = plain.single_id("<end>")
    assert plain.verbatim([end, plain.eos_id]) == {end: "<end>", plain.eos_id: "<eos>"}
    assert plain.verbatim([plain.vocab_size + 5]) is None
    assert ChatFormatter(template, plain)._rendered is not None
    for name, added in (("lstrip", [AddedToken("<end>", special=True, lstrip=True)]),
                        ("overlap", [AddedToken("<end>", special=True), AddedToken("r <e", special=True)])):
        tok = load_tokenizer(str(folder(name, added)))
        formatter = ChatFormatter(template, tok)
        ids, mask, bounds = formatter.encode_flat(sample)
        assert _same_encoding((ids, mask, bounds), formatter._encode_runs(sample)), name  # "<end>" is its id
        assert tok.decode(ids.tolist()) == "Q:x A:a plain answer <end>", name  # the answer's space kept
        assert tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m]) == "a plain answer <end>"
        assert tok.verbatim([tok.single_id("<end>")]) is None, name
        assert formatter._rendered is None, name
    lstrip = load_tokenizer(str(tmp_path / "lstrip"))
    written = lstrip.encode_raw_marked(["Q:x A:a plain answer <end>"], [[]])[0].tolist()
    assert lstrip.decode(written) != "Q:x A:a plain answer <end>"  # why: written as text, the space goes
