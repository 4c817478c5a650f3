"""Chat template: records -> token ids and the per-token loss mask.

Default (MFTCoder, paper section 2): every turn is
``<|role_start|>{role}<|role_end|>{content}``, and the tokenizer's EOS follows each bot turn.
Loss is taken on bot content and that EOS only (``mode="sft"``) or on every token
(``mode="pretrain"``, and always for ``{"text"}`` records).

Why segment by segment: markers come from the template as their single vocabulary ids (when
the tokenizer knows them); user text is encoded with the markers protected, so a marker string
typed inside content stays plain text and can never fake a turn boundary.

The stored mask is per token: ``mask[i] = 1`` when token ``i`` is a target that takes loss. The
first token of a sample is never a target (nothing in the sample precedes it), so it is 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from megatron_mft.data.records import Record, Turn
from megatron_mft.data.tokenizer import Tokenizer

Mode = Literal["sft", "pretrain"]


@dataclass(frozen=True)
class ChatTemplate:
    name: str = "mftcoder"
    role_start: str = "<|role_start|>"
    role_end: str = "<|role_end|>"
    #: canonical role -> the name written between the markers.
    role_names: dict[str, str] = field(default_factory=lambda: {"system": "system", "human": "human", "bot": "bot"})
    eos_after_bot: bool = True
    #: MFTCoder does not start samples with BOS; set for models that expect it.
    add_bos: bool = False

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(m for m in (self.role_start, self.role_end) if m)

    def to_dict(self) -> dict:
        return asdict(self)


TEMPLATES: dict[str, ChatTemplate] = {
    "mftcoder": ChatTemplate(),
    "mftcoder-bos": ChatTemplate(name="mftcoder-bos", add_bos=True),
}


def load_template(spec: str) -> ChatTemplate:
    """A preset name from ``TEMPLATES`` or a JSON file holding ``ChatTemplate`` fields."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        data = json.loads(p.read_text(encoding="utf-8"))
        unknown = set(data) - set(ChatTemplate.__dataclass_fields__)
        if unknown:
            raise ValueError(f"template {spec}: unknown fields {sorted(unknown)}")
        return ChatTemplate(**data)
    raise ValueError(f"template {spec!r}: not one of {', '.join(TEMPLATES)} and not a .json file")


class ChatFormatter:
    """Encodes records with one template and one tokenizer; batches the tokenizer calls."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer, mode: Mode = "sft"):
        self.template = template
        self.tok = tokenizer
        self.mode = mode
        self._protect = template.markers
        self._start = self._marker_ids(template.role_start)
        self._end = self._marker_ids(template.role_end)
        self._headers = {
            role: self._start + self.tok.encode(name, self._protect) + self._end
            for role, name in template.role_names.items()
        }
        self._bos = [tokenizer.bos_id] if template.add_bos and tokenizer.bos_id is not None else []

    def _marker_ids(self, marker: str) -> list[int]:
        if not marker:
            return []
        single = self.tok.single_id(marker)
        return [single] if single is not None else self.tok.encode(marker)

    @property
    def marker_ids(self) -> dict[str, list[int]]:
        return {self.template.role_start: self._start, self.template.role_end: self._end}

    def encode(self, records: Sequence[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids int32, loss mask uint8) per record; one tokenizer call for the whole batch."""
        texts: list[str] = []
        for r in records:
            if r.text is not None:
                texts.append(r.text)
            else:
                texts.extend(t.content for t in r.turns)
        encoded = iter(self.tok.encode_batch(texts, self._protect))
        out = []
        eos = self.tok.eos_id
        all_loss = self.mode == "pretrain"
        for r in records:
            ids: list[int] = list(self._bos)
            mask: list[int] = [0] * len(ids)
            if r.text is not None:
                body = next(encoded) + [eos]
                ids += body
                mask += [1] * len(body)
            else:
                for turn in r.turns:
                    head = self._headers[turn.role]
                    body = next(encoded)
                    if turn.role == "bot" and self.template.eos_after_bot:
                        body = body + [eos]
                    ids += head
                    ids += body
                    learn = 1 if (turn.role == "bot" or all_loss) else 0
                    mask += [1 if all_loss else 0] * len(head)
                    mask += [learn] * len(body)
            tokens = np.asarray(ids, dtype=np.int32)
            m = np.asarray(mask, dtype=np.uint8)
            if len(m):
                m[0] = 0
            out.append((tokens, m))
        return out

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        """Ids for generation: the given turns, then the header of the bot turn to be written."""
        ids, _ = self.encode([Record(turns=tuple(turns))])[0] if turns else (np.zeros(0, np.int32), None)
        return list(self._bos if not turns else []) + ids.tolist() + self._headers["bot"]
