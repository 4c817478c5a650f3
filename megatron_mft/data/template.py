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
from megatron_mft.errors import UsageError

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


class TemplateError(UsageError, ValueError):
    """A ``--template`` / ``data.template`` that cannot be used (exit 2)."""


def _field_problems(data: dict) -> list[str]:
    """Each field of a template file must have its default's type (role_names: the three roles)."""
    problems = [f"unknown field {k!r}" for k in sorted(set(data) - set(ChatTemplate.__dataclass_fields__))]
    default = ChatTemplate()
    for key, value in data.items():
        want = getattr(default, key, None)
        if key not in ChatTemplate.__dataclass_fields__ or want is None:
            continue
        if type(value) is not type(want):  # noqa: E721 - bool is not an int here
            problems.append(f"{key!r} must be a {type(want).__name__}, got {type(value).__name__} {value!r}")
        elif isinstance(want, dict) and (not {"system", "human", "bot"} <= set(value)
                                         or not all(isinstance(v, str) for v in value.values())):
            problems.append(f"{key!r} must map system, human and bot to strings, got {value!r}")
    return problems


def load_template(spec: str) -> ChatTemplate:
    """A preset name from ``TEMPLATES`` or a JSON file holding ``ChatTemplate`` fields."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        try:
            data = json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            raise TemplateError(f"template {spec}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise TemplateError(f"template {spec}: must hold a JSON object of ChatTemplate fields, "
                                f"got {type(data).__name__}")
        problems = _field_problems(data)
        if problems:
            raise TemplateError(f"template {spec}: " + "; ".join(problems))
        return ChatTemplate(**data)
    raise TemplateError(f"template {spec!r}: not one of {', '.join(TEMPLATES)} and not a .json file")


class ChatFormatter:
    """Encodes records with one template and one tokenizer; batches the tokenizer calls."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer, mode: Mode = "sft"):
        self.template = template
        self.tok = tokenizer
        self._protect = template.markers
        self._start = self._marker_ids(template.role_start)
        self._end = self._marker_ids(template.role_end)
        self._headers = {
            role: self._start + self.tok.encode(name, self._protect) + self._end
            for role, name in template.role_names.items()
        }
        self._bos = [tokenizer.bos_id] if template.add_bos and tokenizer.bos_id is not None else []
        # Segment kinds (the roles, then plain documents) as tables indexed by kind code.
        roles = list(self._headers)
        self._kind_code = {role: i for i, role in enumerate(roles)}
        self._text_kind = len(roles)
        eos = [tokenizer.eos_id]
        heads = [self._headers[r] for r in roles] + [[]]
        tails = [eos if (r == "bot" and template.eos_after_bot) else [] for r in roles] + [eos]
        self._prefix = [np.asarray(h, dtype=np.int32) for h in heads]
        self._prefix_first = [np.asarray(self._bos + h, dtype=np.int32) for h in heads]
        self._suffix = [np.asarray(t, dtype=np.int32) for t in tails]
        self._prefix_len = np.array([len(h) for h in heads], dtype=np.int64)
        self._suffix_len = np.array([len(t) for t in tails], dtype=np.int64)
        self._with_bos = bool(self._bos)
        all_loss = mode == "pretrain"
        self._prefix_value = np.array([int(all_loss)] * len(roles) + [1], dtype=np.uint8)
        self._body_value = np.array([int(r == "bot" or all_loss) for r in roles] + [1], dtype=np.uint8)
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
        kind_of = self._kind_code
        texts: list[str] = []
        kinds: list[int] = []  # per segment (turn or document): row of the kind tables
        n_segments: list[int] = []  # per record
        for r in records:
            if r.text is not None:
                texts.append(r.text)
                kinds.append(self._text_kind)
                n_segments.append(1)
            else:
                for role, content in r.turns:
                    texts.append(content)
                    kinds.append(kind_of[role])
                n_segments.append(len(r.turns))
        if not records:
            return np.zeros(0, np.int32), np.zeros(0, np.uint8), [0]
        if min(n_segments) == 0:
            raise ValueError("a record without turns has nothing to encode")
        encoded = self.tok.encode_arrays(texts, self._protect)  # protected ids: checked below, at once
        if len(self._protected_ids) and encoded and np.isin(np.concatenate(encoded), self._protected_ids).any():
            raise TokenizerError("user text produced a protected special id (marker or special token)")
        # Every segment is [prefix][body][suffix]: prefix = (BOS if it opens a sample) + role
        # header, suffix = EOS after bot turns and documents. Ids: one concatenation; the mask:
        # runs (value, length) built with numpy and expanded by one np.repeat.
        k = np.asarray(kinds, dtype=np.intp)
        first = np.zeros(len(kinds), dtype=bool)
        seg_start = np.concatenate([[0], np.cumsum(n_segments)[:-1]])
        first[seg_start] = True
        prefixes, prefixes_first, suffixes = self._prefix, self._prefix_first, self._suffix
        pieces = [a for kind, opens, body in zip(kinds, first.tolist(), encoded)
                  for a in ((prefixes_first if opens else prefixes)[kind], body, suffixes[kind])]
        body_len = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        pre_len = self._prefix_len[k] + (first & self._with_bos)
        suf_len = self._suffix_len[k]
        run_len = np.stack([pre_len, body_len, suf_len], axis=1).ravel()
        run_val = np.stack([self._prefix_value[k], self._body_value[k], self._body_value[k]], axis=1).ravel()
        flat_ids = np.concatenate(pieces).astype(np.int32, copy=False)
        flat_mask = np.repeat(run_val, run_len)
        sample_len = np.add.reduceat(pre_len + body_len + suf_len, seg_start)
        bounds = np.concatenate([[0], np.cumsum(sample_len)])
        flat_mask[bounds[:-1]] = 0  # a sample's first token is nobody's target
        return flat_ids, flat_mask, bounds.tolist()

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        """Ids for generation: the given turns, then the header of the bot turn to be written."""
        ids, _ = self.encode([Record(turns=tuple(turns))])[0] if turns else (np.zeros(0, np.int32), None)
        return list(self._bos if not turns else []) + ids.tolist() + self._headers["bot"]
