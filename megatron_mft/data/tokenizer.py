"""Tokenizers behind one small interface: SentencePiece ``.model`` files and Hugging Face folders.

Why a wrapper: the chat template encodes a sample in pieces (segment by segment, or, with a
backend that reports character offsets, whole between its own markers), so that special markers
are emitted only by the template and never recognised inside user text. That needs what the raw
libraries do not give directly: a *continuation* encoding (no dummy-prefix space in front of
every piece), an encoding that refuses to match protected strings, and each token's character
end (for the loss mask of a whole-sample encoding). They live here, once, for both backends.
Loading is offline: only local files are read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    _orjson = None

from megatron_mft.data import spm_proto
from megatron_mft.errors import UsageError


class TokenizerError(UsageError, ValueError):
    """A tokenizer path that cannot be loaded, with the reason (exit 2)."""


def identity_sha256(path: str | Path) -> str | None:
    """The sha256 a manifest records for the tokenizer at ``path`` (a SentencePiece/tiktoken file
    itself; a folder's tokenizer.json, else its tokenizer.model); None when there is no such file."""
    file = identity_file(path)
    return None if file is None else file_sha256(file)


def identity_file(path: str | Path) -> Path | None:
    """The file that identifies the tokenizer at ``path``: the file itself, or a folder's
    tokenizer.json, else its tokenizer.model (the folder loaders' order, load_tokenizer)."""
    path = Path(path)
    if path.is_file():
        return path
    return next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), None)


def file_sha256(path: str | Path) -> str:
    return _sha256(Path(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Backend(Protocol):
    """What a tokenizer library must provide; ``Tokenizer`` adds the protection on top."""

    kind: str
    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode_raw_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Continuation encoding of each text, without BOS/EOS; may match special strings."""
        ...

    def special_strings(self) -> tuple[str, ...]:
        """Strings the library itself maps to special ids when they occur in raw text."""
        ...

    def single_id(self, text: str) -> int | None:
        """The id of ``text`` if the vocabulary holds it as one token matched verbatim in raw text."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def identity_file(self) -> Path: ...

    #: offset-capable backends only (``None`` elsewhere): ``encode_raw_arrays`` that also tells,
    #: for given character positions, which tokens end after them (see ``Tokenizer.encode_marked``)
    encode_raw_marked: Callable[[list[str], list[list[int]]], tuple[np.ndarray, np.ndarray, list[list[int]]]] | None


@dataclass(frozen=True)
class _Protection:
    strings: tuple[str, ...]
    pattern: re.Pattern | None
    ids: frozenset[int]
    #: the strings that are single vocabulary ids (the only ones a tokenizer can turn into a special id)
    singles: tuple[str, ...]
    id_pattern: re.Pattern | None


class Tokenizer:
    """Text <-> ids over one backend. ``encode*`` never emit an id for a protected string found in
    the text: template markers passed as ``protect`` and the backend's own special tokens."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.kind, self.path = backend.kind, backend.path
        self.vocab_size = backend.vocab_size
        self.bos_id, self.eos_id, self.pad_id = backend.bos_id, backend.eos_id, backend.pad_id
        self._protect_cache: dict[tuple[str, ...], _Protection] = {}

    def single_id(self, text: str) -> int | None:
        return self.backend.single_id(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(ids)

    def identity(self) -> dict:
        """What a manifest needs to tell whether data was made with this tokenizer."""
        return {
            "kind": self.kind,
            "path": self.path,
            "sha256": _sha256(self.backend.identity_file()),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def _protection(self, protect: tuple[str, ...]) -> _Protection:
        hit = self._protect_cache.get(protect)
        if hit is None:
            found = {s for s in protect + self.backend.special_strings() if len(s) > 1}
            strings = tuple(sorted(found, key=len, reverse=True))
            pattern = re.compile("|".join(re.escape(s) for s in strings)) if strings else None
            singles = tuple(s for s in strings if self.backend.single_id(s) is not None)
            ids = frozenset(i for i in (self.backend.single_id(s) for s in singles) if i is not None)
            id_pattern = re.compile("|".join(re.escape(s) for s in singles)) if singles else None
            hit = self._protect_cache[protect] = _Protection(strings, pattern, ids, singles, id_pattern)
        return hit

    def protected_ids(self, protect: tuple[str, ...] = ()) -> frozenset[int]:
        """Ids that ``encode_batch(..., protect)`` guarantees never to emit."""
        return self._protection(tuple(protect)).ids

    def id_string_pattern(self, protect: tuple[str, ...] = ()) -> re.Pattern | None:
        """A regex matching the protected strings that are single vocabulary ids (the ones raw
        encoding could turn into a protected id); None when there are none."""
        return self._protection(tuple(protect)).id_pattern

    def verbatim(self, ids: Iterable[int]) -> dict[int, str] | None:
        """Each id's string, when the backend turns every occurrence of that string in raw text
        into exactly that id and nothing around it changes (see ``HFBackend.verbatim``); None if
        any id is not so (or the backend cannot tell)."""
        verbatim = getattr(self.backend, "verbatim", None)
        return verbatim(ids) if verbatim is not None else None

    def encode_raw_marked(self, texts: Sequence[str], marks: Sequence[Sequence[int]]
                          ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """``encode_marked`` without protection: the backend's special strings in the texts
        become their ids. For texts whose special strings were all placed by the caller, which
        checks the ids it gets back."""
        return self.backend.encode_raw_marked(list(texts), [list(m) for m in marks])  # type: ignore[misc]

    def encode_batch(self, texts: Sequence[str], protect: tuple[str, ...] = ()) -> list[list[int]]:
        """Continuation-encode each text; occurrences of protected strings become plain text.

        A protected occurrence is cut after its first character and each part encoded on its
        own, so the vocabulary entry for the whole string cannot match. The result is verified
        to hold no protected id (normalization, e.g. NFKC, could still produce one).
        """
        texts = list(texts)
        prot = self._protection(tuple(protect))
        out = [a.tolist() for a in self.encode_arrays(texts, protect)]
        if prot.ids and not prot.ids.isdisjoint(chain.from_iterable(out)):
            bad = next(i for i, ids in enumerate(out) if not prot.ids.isdisjoint(ids))
            raise TokenizerError(f"encoding text #{bad} produced a protected special id; text={texts[bad][:80]!r}")
        return out

    def encode_arrays(self, texts: Sequence[str], protect: tuple[str, ...] = ()) -> list[np.ndarray]:
        """``encode_batch`` as int32 arrays, unchecked: for callers that verify whole chunks at once."""
        texts = list(texts)
        split = _split_protected(texts, self._protection(tuple(protect)))
        if split is None:
            return self.backend.encode_raw_arrays(texts)
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for i, ids in zip(split[1], self.backend.encode_raw_arrays(split[0])):
            parts[i].append(ids)
        return [np.concatenate(p) if p else np.zeros(0, np.int32) for p in parts]

    def encode(self, text: str, protect: tuple[str, ...] = ()) -> list[int]:
        return self.encode_batch([text], protect)[0]

    @property
    def has_offsets(self) -> bool:
        """Whether the backend reports where tokens lie in the text (HF fast tokenizers do)."""
        return getattr(self.backend, "encode_raw_marked", None) is not None

    def encode_marked(self, texts: Sequence[str], marks: Sequence[Sequence[int]], protect: tuple[str, ...] = ()
                      ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """Whole texts encoded at once, for backends with offsets: (ids int32 of all texts
        concatenated, tokens per text int64, per text and per mark ``p`` in ``marks`` (increasing
        character positions) the index of its first token that ends after ``p``, i.e. whose last
        character is at or after ``p``; the token count when none).

        A protected string that is a single vocabulary id is cut after its first character (the
        parts encoded apart, so the tokenizer cannot match it); everything else is encoded as one
        string, so BPE merges across what were segment boundaries come out as in the whole text.
        Unchecked, like ``encode_arrays``: the caller verifies the ids.
        """
        texts = list(texts)
        prot = self._protection(tuple(protect))
        encode = self.backend.encode_raw_marked  # type: ignore[attr-defined]
        # one regex scan of all texts (a set of literals: ~10x faster than a substring test per string)
        if prot.id_pattern is None or prot.id_pattern.search("\x00".join(texts)) is None:
            return encode(texts, [list(m) for m in marks])
        pieces: list[str] = []
        piece_marks: list[list[int]] = []
        owner: list[int] = []
        for i, (text, text_marks) in enumerate(zip(texts, marks)):
            bounds = [0, *_cuts(text, prot.id_pattern), len(text)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                pieces.append(text[a:b])
                # a mark belongs to the piece holding its character (the last piece: marks at the end)
                piece_marks.append([p - a for p in text_marks if a <= p < b or (p >= b == len(text))])
                owner.append(i)
        ids, counts, marked = encode(pieces, piece_marks)
        per_text = np.zeros(len(texts), dtype=np.int64)
        out: list[list[int]] = [[] for _ in texts]
        for i, n, m in zip(owner, counts.tolist(), marked):
            out[i] += [per_text[i] + k for k in m]
            per_text[i] += n
        return ids, per_text, [[int(k) for k in m] for m in out]

def _split_protected(texts: list[str], prot: _Protection) -> tuple[list[str], list[int]] | None:
    """None when no text holds a protected string (one fast scan); else (pieces, owner index)."""
    if prot.pattern is None:
        return None
    if prot.pattern.search("\x00".join(texts)) is None:  # one scan (see Tokenizer.encode_marked)
        return None
    pieces: list[str] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        for p in _defuse(text, prot.pattern) if prot.pattern.search(text) else (text,):
            pieces.append(p)
            owners.append(i)
    return pieces, owners


def _cuts(text: str, pattern: re.Pattern) -> list[int]:
    """Positions to split ``text`` at so that no part holds a whole match of ``pattern``: one
    character into each match, scanning on from there (the leftmost match comes first, so no
    part before a cut can hold one)."""
    cuts, pos = [], 0
    while (m := pattern.search(text, pos)) is not None:
        pos = m.start() + 1
        cuts.append(pos)
    return cuts


def _defuse(text: str, pattern: re.Pattern) -> list[str]:
    """Split ``text`` so that no part contains a whole protected string."""
    parts: list[str] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        s = m.group(0)
        parts.append(s[0])
        rest = s[1:]
        parts.extend(_defuse(rest, pattern) if pattern.search(rest) else [rest])
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


class SentencePieceBackend:
    """CodeLlama's format. Segments are encoded with the dummy prefix switched off."""

    kind = "sentencepiece"
    #: no character offsets: the chat template encodes segment by segment
    encode_raw_marked = None

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self._file = Path(path)
        self.path = str(path)
        self._single: dict[str, int | None] = {}
        try:
            self._proto = self._file.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=spm_proto.without_dummy_prefix(self._proto))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad files
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        bos, eos, pad = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        if eos < 0:
            raise TokenizerError(f"{path}: the model defines no EOS piece")
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos
        self.pad_id = pad if pad >= 0 else eos

    def encode_raw_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return self.sp.encode(texts, num_threads=1, out_type="numpy") if texts else []

    def special_strings(self) -> tuple[str, ...]:
        return ()  # control symbols (<s>, </s>) are never matched from text by SentencePiece

    def single_id(self, text: str) -> int | None:
        # user-defined symbols (matched verbatim in raw text) and control symbols other than
        # BOS/EOS/pad (never produced from text: Mistral v3's [INST]/[/INST]), which the template
        # places as their ids
        if text not in self._single:
            i = self.sp.piece_to_id(text) if text else self.sp.unk_id()
            kind = spm_proto.piece_type(self._proto, i)
            ok = i != self.sp.unk_id() and (kind == spm_proto.USER_DEFINED or (
                kind == spm_proto.CONTROL and i not in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())))
            self._single[text] = i if ok else None
        return self._single[text]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(map(int, ids)))

    def identity_file(self) -> Path:
        return self._file


class HFBackend:
    """A Hugging Face tokenizer folder (``tokenizer.json`` + optional ``tokenizer_config.json``)."""

    kind = "huggingface"

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Tok

        self._folder = Path(folder)
        self.path = str(folder)
        spec = _read_json(self._folder / "tokenizer.json")
        try:
            self.tok = _Tok.from_str(_dumps(_no_prefix_space(spec)))
        except Exception as e:
            raise TokenizerError(f"{folder}/tokenizer.json: cannot be loaded ({e})") from None
        added = self.tok.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in added.items()}
        self._special = tuple(t.content for t in added.values() if t.special)
        cfg = _read_json(self._folder / "tokenizer_config.json") | _read_json(self._folder / "special_tokens_map.json")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = self._id_of(cfg.get("eos_token"), ("</s>", "<|endoftext|>", "<eos>"))
        if eos is None:
            raise TokenizerError(f"{folder}: no EOS token (set eos_token in tokenizer_config.json)")
        self.eos_id = eos
        self.bos_id = self._id_of(cfg.get("bos_token"), ("<s>", "<bos>"))
        pad = self._id_of(cfg.get("pad_token"), ("<pad>",))
        self.pad_id = pad if pad is not None else eos

    def _id_of(self, value, fallbacks: tuple[str, ...]) -> int | None:
        """The configured token's id; else the first conventional name that is an added token
        (Qwen's config has no BOS, and its vocabulary holds ``<s>`` as ordinary text, an HTML tag)."""
        if isinstance(value, dict):
            value = value.get("content")
        if value and (i := self.tok.token_to_id(value)) is not None:
            return i
        return next((self._added[name] for name in fallbacks if name in self._added), None)

    def encode_raw_arrays(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self.tok.encode_batch(texts, add_special_tokens=False) if texts else []
        return [np.asarray(e.ids, dtype=np.int32) for e in encoded]

    def encode_raw_marked(self, texts: list[str], marks: list[list[int]]
                          ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        encoded = self.tok.encode_batch(texts, add_special_tokens=False) if texts else []
        per_text = [e.ids for e in encoded]  # each access builds a new list: once
        counts = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        ids = np.fromiter(chain.from_iterable(per_text), dtype=np.int32, count=int(counts.sum()))
        marked: list[list[int]] = []
        for e, m, text, n_ids in zip(encoded, marks, texts, map(len, per_text)):
            if not m:
                marked.append([])
                continue
            n, at = len(text), e.char_to_token  # the token holding the mark's character, mostly
            marked.append([n_ids if p >= n else k if (k := at(p)) is not None else _first_token_ending_after(e, p, n)
                           for p in m])
        return ids, counts, marked

    def special_strings(self) -> tuple[str, ...]:
        return self._special

    def single_id(self, text: str) -> int | None:
        return self._added.get(text)

    def verbatim(self, ids: Iterable[int]) -> dict[int, str] | None:
        """Each id's string, if it is an added token that the library extracts from raw text
        wherever the string occurs, alone and as written: not stripping the whitespace around it
        (lstrip / rstrip), not only as a whole word, matched before normalization, and no other
        added token overlapping it (a longer or overlapping match could win). Then a sample
        rendered with these strings encodes as the sample cut at them with the ids placed."""
        if getattr(self.tok, "encode_special_tokens", False):
            return None
        added = self.tok.get_added_tokens_decoder()
        out: dict[int, str] = {}
        for i in ids:
            t = added.get(i)
            if t is None or t.lstrip or t.rstrip or t.single_word or t.normalized:
                return None
            out[i] = t.content
        for i, s in out.items():
            if any(_overlap(s, t.content) for j, t in added.items() if j != i):
                return None
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def identity_file(self) -> Path:
        return self._folder / "tokenizer.json"


def _overlap(a: str, b: str) -> bool:
    """Whether strings ``a`` and ``b`` can share characters in a text: one holds the other, or
    an end of one is a start of the other."""
    if a in b or b in a:
        return True
    return any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def _first_token_ending_after(encoding, pos: int, length: int) -> int:
    """Index of the first token of ``encoding`` whose character span ends after ``pos`` (the
    token holding that character; offsets only where no token holds it)."""
    if pos >= length:
        return len(encoding.ids)
    k = encoding.char_to_token(pos)
    if k is None:
        k = bisect.bisect_right([end for _, end in encoding.offsets], pos)
    return k


def _loads(data: bytes):
    """``json.loads``, through orjson when it accepts the text (the stdlib decides the rest).
    A 128k-entry vocabulary through the stdlib creates and frees millions of objects, and in a
    process with a large heap (torch imported) the garbage collector's passes over it made
    loading a Llama-3-sized ``tokenizer.json`` cost ~0.4 s instead of ~0.07 s."""
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(data)


def _dumps(spec: dict) -> str:
    """``json.dumps`` for ``Tokenizer.from_str``, through orjson when it can (see ``_loads``)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(spec).decode()
        except TypeError:  # e.g. an integer beyond 64 bits: the stdlib writes it
            pass
    return json.dumps(spec)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} when there is no such file); a damaged one is named."""
    if not path.is_file():
        return {}
    try:
        data = _loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON, the file is damaged or truncated ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _no_prefix_space(spec: dict) -> dict:
    """Turn off the 'prepend ▁ / add prefix space' steps so each segment encodes as a continuation."""

    def fix(node):
        if isinstance(node, dict):
            typ = node.get("type")
            if typ == "Prepend":
                return None
            if typ == "Sequence":
                for key in ("normalizers", "pretokenizers", "processors"):
                    if key in node:
                        node[key] = [n for n in (fix(x) for x in node[key]) if n is not None]
            if typ == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)
            if typ == "ByteLevel" and "add_prefix_space" in node:
                node["add_prefix_space"] = False
        return node

    spec = dict(spec)
    # the post-processor only adds special tokens (never asked for) and trims offsets (ours must
    # cover whitespace too: the loss mask is read from them)
    spec["post_processor"] = None
    spec["normalizer"] = fix(spec.get("normalizer"))
    spec["pre_tokenizer"] = fix(spec.get("pre_tokenizer"))
    return spec


# Registry: the first loader whose probe accepts the path builds the backend.
_LOADERS: list[tuple[Callable[[Path], bool], Callable[[Path], Backend]]] = [
    (lambda p: p.is_file() and p.suffix == ".model", SentencePieceBackend),
    (lambda p: p.is_dir() and (p / "tokenizer.json").is_file(), HFBackend),
    (lambda p: p.is_dir() and (p / "tokenizer.model").is_file(), lambda p: SentencePieceBackend(p / "tokenizer.model")),
]


@lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece ``.model`` file, or a folder with ``tokenizer.json`` (or ``tokenizer.model``)."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer {path}: does not exist")
    for probe, build in _LOADERS:
        if probe(p):
            return Tokenizer(build(p))
    raise TokenizerError(
        f"tokenizer {path}: expected a SentencePiece .model file or a folder holding tokenizer.json"
    )
