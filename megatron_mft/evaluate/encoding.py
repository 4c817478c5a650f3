"""Prompt text -> token ids, either exactly as training encoded its samples, or as one string.

``training`` (default for the mft template) builds the ids with the training data code,
``megatron_mft.data.template.ChatFormatter.prompt_ids``: role markers as their single vocabulary ids
when the tokenizer has them, each segment (role name, content) encoded on its own with the dummy
prefix / prefix space switched off, BOS only if the chat template (or ``--add-special-tokens``)
says so. This is what the model saw during fine-tuning, token for token.

``text`` renders the prompt string and calls the Hugging Face tokenizer on it once, with
``add_special_tokens`` as given. For the plain template this is the only mode (completion-style
prompting of a base model). For chat prompts it can differ from training at segment boundaries
(SentencePiece's dummy prefix, BPE merges across a marker); the log says whether it does.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from megatron_mft.evaluate.prompts import PromptTemplate

log = logging.getLogger(__name__)

ENCODINGS = ("training", "text")


class PromptEncoder:
    """``encode(problem_prompt) -> (prompt_text, token_ids)`` for one template and tokenizer."""

    def __init__(self, hf_dir: str, hf_tokenizer, template: PromptTemplate, encoding: str,
                 add_special_tokens: Optional[bool], chat_template: str = "mftcoder"):
        if encoding not in ENCODINGS:
            raise ValueError(f"prompt encoding: unknown {encoding!r}; choose one of {', '.join(ENCODINGS)}")
        if template.name == "plain" and encoding == "training":
            raise ValueError("prompt encoding 'training' needs the mft template (plain prompts have no turns)")
        self.hf_tok, self.encoding = hf_tokenizer, encoding
        self.chat_template_name = None
        if encoding == "training":
            try:
                from megatron_mft.data.template import ChatFormatter, load_template
                from megatron_mft.data.tokenizer import load_tokenizer
            except ImportError as e:
                raise ValueError(f"prompt encoding 'training' needs megatron_mft.data ({e}); "
                                   "use --prompt-encoding text") from e

            ct = load_template(chat_template)
            if add_special_tokens is not None and add_special_tokens != ct.add_bos:
                ct = dataclasses.replace(ct, add_bos=add_special_tokens)
            self.add_special_tokens = ct.add_bos
            self.chat_template_name = chat_template
            self.template = dataclasses.replace(
                template, role_start=ct.role_start, role_end=ct.role_end,
                role_names=tuple(sorted(ct.role_names.items())))
            self.formatter = ChatFormatter(ct, load_tokenizer(hf_dir))
        else:
            self.add_special_tokens = bool(add_special_tokens)
            self.template = template

    def encode(self, problem_prompt: str) -> tuple[str, list[int]]:
        text = self.template.render(problem_prompt)
        if self.encoding == "text":
            return text, encode_text(self.hf_tok, text, self.add_special_tokens)
        from megatron_mft.data.records import Turn

        turns = [Turn(role, content) for role, content in self.template.turns(problem_prompt)]
        return text, [int(i) for i in self.formatter.prompt_ids(turns)]

    def describe(self) -> dict:
        return {"prompt_encoding": self.encoding, "chat_template": self.chat_template_name,
                "add_special_tokens": self.add_special_tokens}


def encode_text(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
