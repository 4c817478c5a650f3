"""Chat template: records -> token ids and the per-token loss mask.

Default (MFTCoder, paper section 2): every turn is
``<|role_start|>{role}<|role_end|>{content}``, and the tokenizer's EOS follows each bot turn.
Loss is taken on bot content and that EOS only (``mode="sft"``) or on every token
(``mode="pretrain"``, and always for ``{"text"}`` records).

Two encoders, chosen by the tokenizer, one result: the ids of the rendered conversation.
- Tokenizers that report character offsets (Hugging Face ``tokenizer.json``): each sample is
  rendered as one string and encoded whole, cut only at the template's own single-id markers
  and BOS/EOS (as the tokenizer itself cuts at special tokens), so byte-level BPE merges across
  template text and content come out as in the official ``chat_template`` rendering (an
  indented answer after StarCoder2's "### Response\n"). Loss rule: a token takes loss iff its
  last character lies in a trained span: an answer's ``lead`` + content + ``suffix`` (its
  end-of-turn / EOS); a token that merges the header's last newline with an answer's first
  whitespace therefore takes loss.
- SentencePiece ``.model`` files (no offsets): segment by segment, template text and content
  apart, with ``lead`` / ``trail`` keeping the merges that cross a segment boundary.
Either way markers come from the template as their single vocabulary ids (when the tokenizer
knows them) and user text is encoded with them protected (a typed marker string is cut after
its first character), so a marker string typed inside content stays plain text and can never
fake a turn boundary.

The stored mask is per token: ``mask[i] = 1`` when token ``i`` is a target that takes loss. The
first token of a sample is never a target (nothing in the sample precedes it), so it is 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from megatron_mft.data.records import Reason, Record, RecordError, Turn
from megatron_mft.data.tokenizer import Tokenizer, TokenizerError
from megatron_mft.errors import UsageError

Mode = Literal["sft", "pretrain"]


#: placeholders in a family format's strings for the tokenizer's own BOS / EOS tokens
BOS, EOS = "{bos}", "{eos}"


@dataclass(frozen=True)
class ChatTemplate:
    """MFTCoder's marker format (role_start, role_end, role_names, eos_after_bot), or a model
    family's official format given as per-role strings around each turn's content:
    ``prefix`` (no loss) + content + ``suffix`` (loss on bot turns: the end-of-turn token the
    model learns to emit) + ``separator`` (no loss). ``specials`` are the family's control tokens
    (single vocabulary ids, protected in user text); ``{bos}`` / ``{eos}`` stand for the
    tokenizer's own."""

    name: str = "mftcoder"
    role_start: str = "<|role_start|>"
    role_end: str = "<|role_end|>"
    #: canonical role -> the name written between the markers.
    role_names: dict[str, str] = field(default_factory=lambda: {"system": "system", "human": "human", "bot": "bot"})
    eos_after_bot: bool = True
    #: MFTCoder does not start samples with BOS; set for models that expect it.
    add_bos: bool = False
    #: family format (empty: MFTCoder's markers): role -> text before / after / between turns
    prefix: dict[str, str] = field(default_factory=dict)
    suffix: dict[str, str] = field(default_factory=dict)
    separator: dict[str, str] = field(default_factory=dict)
    specials: tuple[str, ...] = ()
    #: text after BOS at the start of every conversation
    preamble: str = ""
    #: system turn inserted when a conversation starts without one ("" = none)
    default_system: str = ""
    #: False: the family's template has no system role; such records are refused
    system: bool = True
    #: strip whitespace around each turn's content (Llama-3's ``| trim``)
    strip: bool = False
    #: roles whose content alone is stripped (Mistral v3 trims only the answers)
    strip_roles: tuple[str, ...] = ()
    #: role -> text written right in front of the turn's content, part of the turn (takes its
    #: loss): Mistral v3's space after ``[INST]`` and before an answer, which its tokenizer merges
    #: into the first word (the segment encoder encodes it with the content, not as a token of
    #: its own)
    lead: dict[str, str] = field(default_factory=dict)
    #: role -> text written right after the turn's content, for turns without loss: StarCoder2's
    #: "\n\n### Response\n" after a user turn (a byte-level BPE splits a whitespace run by what
    #: follows it, GPT-2's ``\s+(?!\S)``: the segment encoder encodes it with that turn)
    trail: dict[str, str] = field(default_factory=dict)
    #: a system turn, empty when the record has none, opens every conversation (Llama-3.1 always
    #: writes its system header with the date lines)
    system_always: bool = False
    #: where the system turn goes: "turn" = a turn of its own; "final_user" = Mistral v3: in front
    #: of the conversation's last turn when that is a user turn (a generation prompt), joined by a
    #: blank line; like the official template, nowhere when the conversation ends with an answer
    #: (every training sample)
    system_placement: str = "turn"
    #: the family's own tokenizer has each special token the template writes as one id; another
    #: tokenizer (one without them) makes them plain text, and preprocessing warns
    single_id_specials: bool = False

    @property
    def markers(self) -> tuple[str, ...]:
        if self.prefix:
            return tuple(self.specials)
        return tuple(m for m in (self.role_start, self.role_end) if m)

    def turn_strings(self, role: str) -> tuple[str, str, str]:
        """(prefix, suffix, separator) of one turn; MFTCoder's format in the same terms."""
        if self.prefix:
            return self.prefix[role], self.suffix.get(role, ""), self.separator.get(role, "")
        end = EOS if role == "bot" and self.eos_after_bot else ""
        return self.role_start + self.role_names[role] + self.role_end, end, ""

    def to_dict(self) -> dict:
        return asdict(self)


def _roles(system: str, human: str, bot: str) -> dict[str, str]:
    return {"system": system, "human": human, "bot": bot}


_IM = ("<|im_start|>", "<|im_end|>")
_L3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_L3_HEADERS = tuple(f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ("system", "user", "assistant"))
#: Llama-3.1's system header: its template writes these date lines (date_string defaults to 26 Jul 2024)
_L31_DATES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
SYSTEM_PLACEMENTS = ("turn", "final_user")

#: Family formats follow each model's official ``chat_template`` (tokenizer_config.json):
#: llama3 = Meta-Llama-3-8B-Instruct; llama3.1 = Llama-3.1-8B-Instruct without tools (a system
#: header with the date lines opens every conversation); qwen2 = Qwen2.5(-Coder)-Instruct, no tools
#: (ChatML, Qwen's default system prompt); deepseek-coder = deepseek-coder-*-instruct; mistral =
#: Mistral-7B-Instruct-v0.1 (no system role); mistral-v3 = Mistral's "v3" template (Mistral-7B-
#: Instruct-v0.3, v3 tokenizer: [INST] control tokens, the system prompt in front of the final user
#: turn only); starcoder2 = starcoder2-15b-instruct-v0.1 (no system role).
TEMPLATES: dict[str, ChatTemplate] = {
    "mftcoder": ChatTemplate(),
    "mftcoder-bos": ChatTemplate(name="mftcoder-bos", add_bos=True),
    "llama3": ChatTemplate(
        name="llama3", add_bos=True, single_id_specials=True, specials=_L3, strip=True, prefix=_roles(*_L3_HEADERS),
        suffix=_roles("<|eot_id|>", "<|eot_id|>", "<|eot_id|>")),
    "llama3.1": ChatTemplate(
        name="llama3.1", add_bos=True, single_id_specials=True, specials=(*_L3, "<|eom_id|>", "<|python_tag|>"), strip=True,
        system_always=True, prefix=_roles(_L3_HEADERS[0] + _L31_DATES, *_L3_HEADERS[1:]),
        suffix=_roles("<|eot_id|>", "<|eot_id|>", "<|eot_id|>")),
    "qwen2": ChatTemplate(
        name="qwen2", single_id_specials=True, specials=_IM,
        prefix=_roles(*(f"<|im_start|>{r}\n" for r in ("system", "user", "assistant"))),
        suffix=_roles("<|im_end|>", "<|im_end|>", "<|im_end|>"), separator=_roles("\n", "\n", "\n"),
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "deepseek-coder": ChatTemplate(
        name="deepseek-coder", add_bos=True, single_id_specials=True, specials=("<|EOT|>",),
        prefix=_roles("", "### Instruction:\n", "### Response:\n"), suffix=_roles("", "\n", "\n<|EOT|>"),
        separator=_roles("", "", "\n"),
        default_system="You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
                       "Deepseek Company, and you only answer questions related to computer science. For "
                       "politically sensitive questions, security and privacy issues, and other non-computer "
                       "science questions, you will refuse to answer\n"),
    "mistral": ChatTemplate(
        name="mistral", add_bos=True, system=False, specials=("[INST]", "[/INST]"),
        # the space after [INST] goes with the question (lead): SentencePiece merges it into the
        # first word ("▁Write"), which the segment path would leave as a token of its own
        prefix=_roles("", "[INST]", ""), lead=_roles("", " ", ""), suffix=_roles("", " [/INST]", EOS)),
    "mistral-v3": ChatTemplate(
        name="mistral-v3", add_bos=True, single_id_specials=True, system_placement="final_user", strip_roles=("bot",),
        specials=("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]"),
        prefix=_roles("", "[INST]", ""), lead=_roles("", " ", " "), suffix=_roles("", "[/INST]", EOS)),
    # StarCoder2's blank lines are written with the text after them ("\n\n### Instruction\n") or,
    # after a user turn, with the turn ("...\n\n### Response\n"; the segment encoder needs that:
    # encoded alone, "\n\n" would be one token where the rendered conversation has two). A sample
    # ends with the answer's EOS (the template's "\n\n### Response\n" after it opens the next
    # answer). An answer that starts with whitespace (indented code): its tokenizer.json has
    # offsets, so the sample is encoded whole and the header's newline merges into the answer's
    # first token as in the official rendering (that token takes loss).
    "starcoder2": ChatTemplate(
        name="starcoder2", add_bos=True, system=False,
        preamble="You are an exceptionally intelligent coding assistant that consistently delivers accurate and "
                 "reliable responses to user instructions.",
        prefix=_roles("", "\n\n### Instruction\n", ""), trail=_roles("", "\n\n### Response\n", ""),
        suffix=_roles("", "", EOS)),
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
        if isinstance(want, tuple) and isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue  # JSON has no tuples: a list of strings
        if type(value) is not type(want):  # noqa: E721 - bool is not an int here
            problems.append(f"{key!r} must be a {type(want).__name__}, got {type(value).__name__} {value!r}")
        elif isinstance(want, dict) and (value or want) and (not {"system", "human", "bot"} <= set(value)
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
        if data.get("system_placement", "turn") not in SYSTEM_PLACEMENTS:
            problems.append(f"'system_placement' must be one of {', '.join(SYSTEM_PLACEMENTS)}, "
                            f"got {data['system_placement']!r}")
        if problems:
            raise TemplateError(f"template {spec}: " + "; ".join(problems))
        data = {**data, **{k: tuple(data[k]) for k in ("specials", "strip_roles") if k in data}}
        return ChatTemplate(**data)
    raise TemplateError(f"template {spec!r}: not one of {', '.join(TEMPLATES)} and not a .json file")


class ChatFormatter:
    """Encodes records with one template and one tokenizer; batches the tokenizer calls."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer, mode: Mode = "sft"):
        self.template = template
        self.tok = tokenizer
        self._protect = template.markers
        if template.trail.get("bot") and mode == "sft":
            raise TemplateError(f"template {template.name}: 'trail' cannot be set for bot turns (the answer's "
                                f"end must stay a token boundary for the loss mask)")
        roles = ("system", "human", "bot")
        turns = {r: [self._ids(t) for t in template.turn_strings(r)] for r in roles}
        self._headers = {r: turns[r][0] for r in roles}
        self._bos = [tokenizer.bos_id] if template.add_bos and tokenizer.bos_id is not None else []
        opening = self._bos + self._ids(template.preamble)
        # Segment kinds (the roles, then plain documents) as tables indexed by kind code.
        self._kind_code = {role: i for i, role in enumerate(roles)}
        # a turn's text between its header and end of turn: lead + content (stripped) + trail
        self._body_fix = {r: (template.strip or r in template.strip_roles, template.lead.get(r, ""),
                              template.trail.get(r, "")) for r in roles}
        self._text_kind = len(roles)
        eos = [tokenizer.eos_id]
        heads = [turns[r][0] for r in roles] + [[]]
        tails = [turns[r][1] for r in roles] + [eos]
        seps = [turns[r][2] for r in roles] + [[]]
        self._prefix = [np.asarray(h, dtype=np.int32) for h in heads]
        self._prefix_first = [np.asarray(opening + h, dtype=np.int32) for h in heads]
        self._suffix = [np.asarray(t + sep, dtype=np.int32) for t, sep in zip(tails, seps)]
        self._prefix_len = np.array([len(h) for h in heads], dtype=np.int64)
        self._suffix_len = np.array([len(t) for t in tails], dtype=np.int64)
        self._sep_len = np.array([len(sep) for sep in seps], dtype=np.int64)
        self._opening_len = len(opening)
        all_loss = mode == "pretrain"
        self._prefix_value = np.array([int(all_loss)] * len(roles) + [1], dtype=np.uint8)
        self._body_value = np.array([int(r == "bot" or all_loss) for r in roles] + [1], dtype=np.uint8)
        # ids that user text must never produce: single-id markers and the tokenizer's specials
        self._protected_ids = np.asarray(sorted(tokenizer.protected_ids(self._protect)), dtype=np.int64)
        self._mode = mode
        #: samples whose system turn the template dropped (Mistral v3 on a sample that ends with an
        #: answer), for the caller to report: see ``take_system_dropped``
        self.system_dropped = 0
        # Offset-capable tokenizers encode each conversation as one string (see encode_flat).
        self._joint = tokenizer.has_offsets
        if self._joint:
            self._joint_parts = {r: tuple(self._parts(s) for s in template.turn_strings(r)) for r in roles}
            self._joint_opening = ([tokenizer.bos_id] if self._bos else []) + self._parts(template.preamble)
            self._template_ids: dict[str, list[int]] = {}  # template-only texts between two ids, encoded once
            self._rendered = self._render_verbatim(roles)

    def _render_verbatim(self, roles: Sequence[str]) -> dict | None:
        """The joint path's template pieces as plain strings, each placed id written as its
        token's string, when the tokenizer turns exactly those strings back into exactly those
        ids (``Tokenizer.verbatim``): then a whole sample is one text for the tokenizer, as in
        the official rendering, instead of runs of text cut at the ids (fewer, longer texts:
        ~10% less time). None when some placed id cannot be written so."""
        pieces = [self._joint_opening, *(p for r in roles for p in self._joint_parts[r])]
        placed = {p for ps in pieces for p in ps if p.__class__ is int}
        eos = self.tok.eos_id
        strings = self.tok.verbatim(placed | {eos})
        if strings is None:
            return None
        protected = set(self._protected_ids.tolist())

        def text(ps) -> str:
            return "".join(strings[p] if p.__class__ is int else p for p in ps)

        def n_protected(ps) -> int:
            return sum(1 for p in ps if p.__class__ is int and p in protected)

        return {
            "opening": (text(self._joint_opening), n_protected(self._joint_opening)),
            "eos": (strings[eos], int(eos in protected)),
            **{r: (*(text(ps) for ps in self._joint_parts[r]), sum(map(n_protected, self._joint_parts[r])))
               for r in roles},
        }

    def _parts(self, text: str) -> list:
        """Template text -> its pieces for the joint path: the template's own markers that are
        single ids and {bos}/{eos} as ids (int), the rest as text (str), encoded with the content."""
        named = {BOS: self.tok.bos_id, EOS: self.tok.eos_id}
        singles = [m for m in self._protect if self.tok.single_id(m) is not None]
        cut = re.compile("|".join(re.escape(m) for m in sorted((*singles, BOS, EOS), key=len, reverse=True)))
        out: list = []
        pos = 0
        for m in cut.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            if m.group(0) in named:
                if named[m.group(0)] is None:
                    raise TemplateError(f"template {self.template.name}: the tokenizer has no {m.group(0)} token")
                out.append(named[m.group(0)])
            else:
                out.append(self.tok.single_id(m.group(0)))
            pos = m.end()
        return out + ([text[pos:]] if pos < len(text) else [])

    def _marker_ids(self, marker: str) -> list[int]:
        if not marker:
            return []
        single = self.tok.single_id(marker)
        return [single] if single is not None else self.tok.encode(marker)

    def _ids(self, text: str) -> list[int]:
        """Template text -> ids for the segment path: single-id markers and {bos}/{eos} as their
        ids, the text between them encoded whole (a marker that is plain text in the vocabulary,
        Mistral v0.1's "[/INST]", stays with the text around it: " [/INST]" is "▁[", not "▁", "[")."""
        out: list[int] = []
        for piece in self._parts(text) if text else ():
            out += [piece] if piece.__class__ is int else self.tok.encode(piece)
        return out

    def split_specials(self) -> list[str]:
        """The special tokens this template writes that the tokenizer has no single id for (only
        for templates whose family's tokenizer has them all): a sign of another family's tokenizer."""
        t = self.template
        if not t.single_id_specials:
            return []
        written = "".join([t.preamble, *(s for r in ("system", "human", "bot") for s in t.turn_strings(r))])
        return [m for m in t.specials if m in written and self.tok.single_id(m) is None]

    @property
    def marker_ids(self) -> dict[str, list[int]]:
        return {m: self._marker_ids(m) for m in self.template.markers}

    def encode(self, records: Sequence[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids int32, loss mask uint8) per record; one tokenizer call for the whole batch."""
        ids, mask, bounds = self.encode_flat(records)
        return [(ids[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def encode_flat(self, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """All records' ids and masks concatenated, and the ``len(records) + 1`` sample bounds.

        Built with one concatenation and one ``np.repeat`` per batch: per-sample conversion would
        cost as much as the template itself.
        """
        if self._joint:
            return self._encode_joint(records)
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
                turns = self._turns(r.turns)
                for role, content in turns:
                    texts.append(self._body(role, content))
                    kinds.append(kind_of[role])
                n_segments.append(len(turns))
        if not records:
            return np.zeros(0, np.int32), np.zeros(0, np.uint8), [0]
        if min(n_segments) == 0:
            raise ValueError("a record without turns has nothing to encode")
        encoded = self.tok.encode_arrays(texts, self._protect)  # protected ids: checked below, at once
        if encoded:
            self._refuse_protected(np.concatenate(encoded))
        # Every segment is [prefix][body][suffix][separator]: prefix = (BOS + preamble if it opens
        # a sample) + role header, suffix = end of turn (EOS after bot turns and documents),
        # separator = text between turns. Ids: one concatenation; the mask: runs (value, length)
        # built with numpy and expanded by one np.repeat.
        k = np.asarray(kinds, dtype=np.intp)
        first = np.zeros(len(kinds), dtype=bool)
        seg_start = np.concatenate([[0], np.cumsum(n_segments)[:-1]])
        first[seg_start] = True
        prefixes, prefixes_first, suffixes = self._prefix, self._prefix_first, self._suffix
        pieces = [a for kind, opens, body in zip(kinds, first.tolist(), encoded)
                  for a in ((prefixes_first if opens else prefixes)[kind], body, suffixes[kind])]
        body_len = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        pre_len = self._prefix_len[k] + first * self._opening_len
        suf_len, sep_len = self._suffix_len[k], self._sep_len[k]
        run_len = np.stack([pre_len, body_len, suf_len, sep_len], axis=1).ravel()
        run_val = np.stack([self._prefix_value[k], self._body_value[k], self._body_value[k], self._prefix_value[k]],
                           axis=1).ravel()
        flat_ids = np.concatenate(pieces).astype(np.int32, copy=False)
        flat_mask = np.repeat(run_val, run_len)
        sample_len = np.add.reduceat(pre_len + body_len + suf_len + sep_len, seg_start)
        bounds = np.concatenate([[0], np.cumsum(sample_len)])
        flat_mask[bounds[:-1]] = 0  # a sample's first token is nobody's target
        return flat_ids, flat_mask, bounds.tolist()

    def _body(self, role: str, content: str) -> str:
        strip, lead, trail = self._body_fix[role]
        return lead + (content.strip() if strip else content) + trail

    def _count_protected(self, ids: np.ndarray) -> int:
        """How many of ``ids`` are protected ids."""
        return int(np.isin(ids, self._protected_ids).sum()) if len(self._protected_ids) else 0

    def _refuse_protected(self, ids: np.ndarray) -> None:
        """Protected strings in user text are cut before encoding; a normalizer (e.g. NFKC) could
        still produce a marker's id from other characters: refused, never trained on."""
        if self._count_protected(ids):
            raise TokenizerError("user text produced a protected special id (marker or special token)")

    def _encode_joint(self, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``encode_flat`` for tokenizers with offsets: whole samples (``_encode_whole``) when the
        template's ids can be written as their strings, else runs of text cut at the ids
        (``_encode_runs``); the same ids and mask either way."""
        if self._rendered is None or not records:
            return self._encode_runs(records)
        typed = self._with_typed_markers(records)
        if not typed:
            whole = self._encode_whole(records)
            return whole if whole is not None else self._encode_runs(records)
        # the samples holding a typed marker take the runs path, the rest stay whole (one
        # typed marker must not send its whole chunk through two encodings)
        typed_set = set(typed)
        clean = [i for i in range(len(records)) if i not in typed_set]
        runs = self._encode_runs([records[i] for i in typed])
        if not clean:
            return runs
        rest = [records[i] for i in clean]
        whole = self._encode_whole(rest)
        return _in_order(len(records), (clean, whole if whole is not None else self._encode_runs(rest)),
                         (typed, runs))

    def _with_typed_markers(self, records: Sequence[Record]) -> list[int]:
        """Indices of the records whose text holds a protected string that is a single id (one
        scan of the chunk first; the records only when it finds one)."""
        pattern = self.tok.id_string_pattern(self._protect)
        if pattern is None:
            return []

        def text_of(r: Record) -> str:
            return r.text if r.text is not None else "\x00".join(content for _, content in r.turns)

        if pattern.search("\x00".join(map(text_of, records))) is None:
            return []
        return [i for i, r in enumerate(records) if pattern.search(text_of(r)) is not None]

    def _encode_whole(self, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
        """Each sample rendered as one string, the template's ids written as their token strings
        (``_render_verbatim``), and encoded whole. Only where that is exact: a protected string
        in a record's content (a typed marker, which ``_encode_runs`` defuses) would come back
        as a protected id, so the ids are counted: any protected id beyond those the template
        placed -> None (the caller uses ``_encode_runs``). Loss rule as in ``_encode_runs``: a
        token takes loss iff its last character lies in a trained span (an answer's lead +
        content + suffix; a document and its EOS)."""
        rendered = self._rendered
        assert rendered is not None
        opening, n_opening = rendered["opening"]
        eos, n_eos = rendered["eos"]
        sft = self._mode == "sft"
        texts: list[str] = []
        marks: list[list[int]] = []  # per sample: the trained spans' edges (characters)
        expected = 0  # protected ids the template placed
        for r in records:
            if r.text is not None:
                texts.append(r.text + eos)
                marks.append([0, len(r.text) + len(eos)] if sft else [])
                expected += n_eos
                continue
            if not r.turns:
                raise ValueError("a record without turns has nothing to encode")
            out = [opening]
            pos = len(opening)
            edges: list[int] = []
            for role, content in self._turns(r.turns):
                head, tail, sep, n = rendered[role]
                body = self._body(role, content)
                start = pos + len(head)
                end = start + len(body) + len(tail)
                if sft and role == "bot" and end > start:
                    edges += (start, end)
                out += (head, body, tail, sep)
                pos = end + len(sep)
                expected += n
            texts.append("".join(out))
            marks.append(edges)
            expected += n_opening
        ids, counts, marked = self.tok.encode_raw_marked(texts, marks)
        if self._count_protected(ids) != expected:
            return None
        bounds = np.concatenate([[0], np.cumsum(counts)])
        total = int(bounds[-1])
        if self._mode == "pretrain":
            flat_mask = np.ones(total, dtype=np.uint8)
        else:
            flat_mask = _trained_mask(total, bounds[:-1].tolist(), marked)
        flat_mask[bounds[:-1][counts > 0]] = 0  # a sample's first token is nobody's target
        return ids, flat_mask, bounds.tolist()

    def _encode_runs(self, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``_encode_joint`` in runs: each sample is rendered as one string
        (the template's single-id markers and BOS/EOS cut out as their ids) and encoded whole, so
        the ids equal those of the rendered conversation, BPE merges across the template/content
        boundaries included (StarCoder2's header newline merged into an indented answer's first
        token). Loss rule: a token takes loss iff its last character lies in a trained span: an
        answer's lead + content + suffix (end-of-turn, EOS); every token in pretrain mode and for
        documents. Each marker or BOS/EOS id counts as one character of the rendering."""
        parts, opening, eos = self._joint_parts, self._joint_opening, self.tok.eos_id
        bot_trained = self._mode == "sft"
        template_ids, protect = self._template_ids, self._protect
        # Units in order: a run of text (one string to encode) or one id. One pass: each run
        # knows the trained spans' edges inside it (local characters), each id whether it lies
        # in a trained span; runs never cross a sample's end.
        texts: list[str] = []
        marks: list[list[int]] = []  # per text: the trained spans' edges inside it, local
        unit_text: list[int] = []  # per unit: index into texts, or -1 for an id
        fixed: list[int] = []  # the ids, in order
        fixed_trained: list[bool] = []  # per id: inside a trained span
        sample_end: list[int] = []  # per sample: units so far
        run: list[str] = []  # the text run being built
        run_len = 0
        run_template = True  # the run is template text only (no content)
        edges: list[int] = []  # the run's trained edges so far
        open_at = -1  # where the open trained span started in the run (-1: none open)

        def flush() -> None:
            """End the text run (at an id or a sample's end); an open span goes on after it."""
            nonlocal run, run_len, run_template, edges, open_at
            if run_len:
                if open_at >= 0 and run_len > open_at:
                    edges += (open_at, run_len)
                text = "".join(run)
                if run_template and not edges:
                    # between two ids, template text encodes the same every time: as ids, untrained
                    cached = template_ids.get(text)
                    if cached is None:
                        cached = template_ids[text] = self.tok.encode_marked([text], [[]], protect)[0].tolist()
                    unit_text.extend([-1] * len(cached))
                    fixed.extend(cached)
                    fixed_trained.extend([False] * len(cached))
                else:
                    unit_text.append(len(texts))
                    texts.append(text)
                    marks.append(edges)
                edges = []
            run, run_len, run_template = [], 0, True
            if open_at >= 0:
                open_at = 0

        def add(pieces) -> None:
            """Template pieces: text joins the run, an id ends it."""
            nonlocal run_len
            for piece in pieces:
                if piece.__class__ is int:
                    flush()
                    unit_text.append(-1)
                    fixed.append(piece)
                    fixed_trained.append(open_at >= 0)
                else:
                    run.append(piece)
                    run_len += len(piece)

        for r in records:
            if r.text is not None:
                open_at = 0  # a document and its EOS are trained
                run.append(r.text)
                run_len += len(r.text)
                run_template = False
                add((eos,))
            elif not r.turns:
                raise ValueError("a record without turns has nothing to encode")
            else:
                add(opening)
                for role, content in self._turns(r.turns):
                    head, tail, sep = parts[role]
                    add(head)
                    if role == "bot" and bot_trained:
                        open_at = run_len
                    body = self._body(role, content)
                    run.append(body)
                    run_len += len(body)
                    run_template = False
                    add(tail)
                    if open_at >= 0:
                        if run_len > open_at:
                            edges += (open_at, run_len)
                        open_at = -1
                    add(sep)
            flush()
            open_at = -1
            sample_end.append(len(unit_text))
        if not records:
            return np.zeros(0, np.int32), np.zeros(0, np.uint8), [0]
        ids, counts, marked = self.tok.encode_marked(texts, marks, self._protect)
        self._refuse_protected(ids)
        kinds = np.asarray(unit_text, dtype=np.int64)
        is_text = kinds >= 0
        unit_len = np.ones(len(kinds), dtype=np.int64)
        unit_len[is_text] = counts
        unit_end = np.concatenate([[0], np.cumsum(unit_len)])
        unit_start = unit_end[:-1]
        total = int(unit_end[-1])
        text_first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        dest = np.repeat(unit_start[is_text] - text_first, counts) + np.arange(len(ids), dtype=np.int64)
        flat_ids = np.empty(total, dtype=np.int32)
        flat_ids[dest] = ids
        flat_ids[unit_start[~is_text]] = fixed
        if self._mode == "pretrain":
            flat_mask = np.ones(total, dtype=np.uint8)
        else:
            flat_mask = _trained_mask(total, unit_start[is_text].tolist(), marked,
                                      unit_start[~is_text][np.asarray(fixed_trained, dtype=bool)])
        bounds = unit_end[np.concatenate([[0], sample_end]).astype(np.int64)]
        sample_len = np.diff(bounds)
        flat_mask[bounds[:-1][sample_len > 0]] = 0  # a sample's first token is nobody's target
        return flat_ids, flat_mask, bounds.tolist()

    def check_record(self, record: Record) -> None:
        """Raise a RecordError (a bad line, named with its file:line and skippable) for a record
        this template cannot express, before the batch that holds it is encoded."""
        if record.turns:
            dropped = self.system_dropped  # counted when the record is encoded, not here
            try:
                self._turns(record.turns)
            except TemplateError as e:
                raise RecordError(Reason.TEMPLATE_UNSUPPORTED, str(e)) from None
            finally:
                self.system_dropped = dropped

    def _turns(self, turns: Sequence[Turn]) -> Sequence[Turn]:
        """The record's turns, with the family's default system turn where it has none."""
        t = self.template
        if not t.system and any(role == "system" for role, _ in turns):
            raise TemplateError(f"template {t.name}: the family's chat format has no system role; "
                                f"drop the system turn or fold it into the first human turn")
        if t.system_placement == "final_user":
            return self._system_in_final_user(turns)
        if (t.default_system or t.system_always) and turns and turns[0][0] != "system":
            return (("system", t.default_system), *turns)
        return turns

    def _system_in_final_user(self, turns: Sequence[Turn]) -> Sequence[Turn]:
        """Mistral v3: the opening system turn joins the last turn if that is a user turn."""
        if any(role == "system" for role, _ in turns[1:]):
            raise TemplateError(f"template {self.template.name}: a system turn may only open the conversation")
        if not turns or turns[0][0] != "system":
            return turns
        system, rest = turns[0][1], tuple(turns[1:])
        if rest and rest[-1][0] == "human":
            return (*rest[:-1], ("human", f"{system}\n\n{rest[-1][1]}"))
        self.system_dropped += 1
        return rest

    def take_system_dropped(self) -> int:
        """Samples whose system turn was dropped since the last call (the count restarts)."""
        n, self.system_dropped = self.system_dropped, 0
        return n

    def prompt_ids(self, turns: Sequence[Turn]) -> list[int]:
        """Ids for generation: the given turns, then the header of the bot turn to be written."""
        ids, _ = self.encode([Record(turns=tuple(turns))])[0] if turns else (np.zeros(0, np.int32), None)
        return list(self._bos if not turns else []) + ids.tolist() + self._headers["bot"]


def _in_order(n: int, *parts: tuple[list[int], tuple[np.ndarray, np.ndarray, list[int]]]
              ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Flat (ids, mask, bounds) of n samples from parts that each encoded the samples at the
    given indices (in order within each part)."""
    ids: list = [None] * n
    mask: list = [None] * n
    for indices, (flat_ids, flat_mask, bounds) in parts:
        for i, a, b in zip(indices, bounds[:-1], bounds[1:]):
            ids[i], mask[i] = flat_ids[a:b], flat_mask[a:b]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    return (np.concatenate(ids), np.concatenate(mask), np.concatenate([[0], np.cumsum(lengths)]).tolist())


def _trained_mask(total: int, text_start: list[int], marked: list[list[int]],
                  single: np.ndarray | None = None) -> np.ndarray:
    """The loss mask of ``total`` tokens: +1 where a trained run starts, -1 where it ends, the
    mask is the running sum. ``marked``: per encoded text starting at ``text_start[i]``, its
    trained runs' token edges (start, end, start, end, ...); ``single``: positions of single
    trained tokens (template ids inside an answer)."""
    edge_at = [text_start[i] + k for i, m in enumerate(marked) for k in m]
    edge_sign = [1 - 2 * (j & 1) for m in marked for j in range(len(m))]
    delta = np.zeros(total + 1, dtype=np.int64)
    np.add.at(delta, np.asarray(edge_at, dtype=np.int64), np.asarray(edge_sign, dtype=np.int64))
    if single is not None:
        np.add.at(delta, single, 1)
        np.add.at(delta, single + 1, -1)
    return (np.cumsum(delta[:-1]) > 0).astype(np.uint8)
