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
from megatron_mft.data.tokenizer import Tokenizer, TokenizerError

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
        self._bos_arr = np.asarray(self._bos, dtype=np.int32)
        # role -> (header ids, header length, loss value of the content, EOS after it)
        self._role_parts = {
            role: (np.asarray(h, dtype=np.int32), len(h), int(role == "bot" or mode == "pretrain"),
                   role == "bot" and template.eos_after_bot)
            for role, h in self._headers.items()
        }
        self._eos_arr = np.asarray([tokenizer.eos_id], dtype=np.int32)
        # ids that user text must never produce: single-id markers and the tokenizer's specials
        self._protected_ids = np.asarray(sorted(tokenizer.protected_ids(self._protect)), dtype=np.int64)

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
        ids, mask, bounds = self.encode_flat(records)
        return [(ids[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def encode_flat(self, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """All records' ids and masks concatenated, and the ``len(records) + 1`` sample bounds.

        Built with one concatenation and one ``np.repeat`` per batch: per-sample conversion would
        cost as much as the template itself.
        """
        texts: list[str] = []
        for r in records:
            if r.text is not None:
                texts.append(r.text)
            else:
                texts.extend([content for _, content in r.turns])
        encoded = self.tok.encode_arrays(texts, self._protect)  # protected ids: checked below, at once
        if len(self._protected_ids) and encoded and np.isin(np.concatenate(encoded), self._protected_ids).any():
            raise TokenizerError("user text produced a protected special id (marker or special token)")
        eos = self._eos_arr
        head_value = 1 if self.mode == "pretrain" else 0
        parts = self._role_parts
        # ids as a list of arrays joined once; the mask as runs (value, length) expanded by one
        # np.repeat: no per-token Python work
        pieces: list[np.ndarray] = []
        run_val: list[int] = []
        run_len: list[int] = []
        starts: list[int] = []
        pos = 0
        k = 0
        for r in records:
            starts.append(pos)
            if self._bos:
                pieces.append(self._bos_arr)
                run_val.append(0)
                run_len.append(1)
                pos += 1
            if r.text is not None:
                body = encoded[k]
                k += 1
                pieces += (body, eos)
                run_val += (1, 1)
                run_len += (len(body), 1)
                pos += len(body) + 1
                continue
            for role, _ in r.turns:
                body = encoded[k]
                k += 1
                head, n_head, learn, with_eos = parts[role]
                n = len(body)
                if with_eos:
                    pieces += (head, body, eos)
                    run_val += (head_value, learn, learn)
                    run_len += (n_head, n, 1)
                    pos += n_head + n + 1
                else:
                    pieces += (head, body)
                    run_val += (head_value, learn)
                    run_len += (n_head, n)
                    pos += n_head + n
        flat_ids = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else np.zeros(0, np.int32)
        flat_mask = np.repeat(np.array(run_val, dtype=np.uint8), run_len)
        if starts:
            flat_mask[starts] = 0  # a sample's first token is nobody's target
        return flat_ids, flat_mask, starts + [pos]

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        """Ids for generation: the given turns, then the header of the bot turn to be written."""
        ids, _ = self.encode([Record(turns=tuple(turns))])[0] if turns else (np.zeros(0, np.int32), None)
        return list(self._bos if not turns else []) + ids.tolist() + self._headers["bot"]
