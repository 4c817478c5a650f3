"""Just enough protobuf wire format to read and patch a SentencePiece ``.model`` file.

Why: we encode a sample segment by segment (so template markers can never be produced from user
text), and each segment must be encoded as a *continuation*. CodeLlama's model has
``add_dummy_prefix = true``, which would put a spurious "▁" (space) in front of every segment.
The python package exposes no switch for it and ``protobuf`` is not a dependency, so we flip the
one boolean in the serialized ``NormalizerSpec`` ourselves. We also read the piece types to know
which pieces are user-defined symbols (matched verbatim anywhere in raw text).

Schema (sentencepiece_model.proto): ModelProto{1: repeated SentencePiece pieces, 2: TrainerSpec,
3: NormalizerSpec normalizer_spec, ...}; SentencePiece{1: string piece, 2: float score, 3: Type};
NormalizerSpec{..., 3: bool add_dummy_prefix (default true), ...}.
"""

from __future__ import annotations

from dataclasses import dataclass

USER_DEFINED = 4  # SentencePiece.Type
NORMAL = 1


@dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    value: bytes | int
    raw: bytes  # the whole field, key included, for verbatim re-serialization


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _encode_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: bytes) -> list[_Field]:
    out, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in SentencePiece model")
        out.append(_Field(number, wire, value, buf[start:pos]))
    return out


def piece_types(model_proto: bytes) -> list[tuple[str, int]]:
    """(piece, type) for every vocabulary entry, in id order."""
    out = []
    for f in _fields(model_proto):
        if f.number == 1 and f.wire == 2:
            piece, typ = "", NORMAL
            for g in _fields(f.value):  # type: ignore[arg-type]
                if g.number == 1:
                    piece = g.value.decode("utf-8")  # type: ignore[union-attr]
                elif g.number == 3:
                    typ = int(g.value)  # type: ignore[arg-type]
            out.append((piece, typ))
    return out


def add_dummy_prefix(model_proto: bytes) -> bool:
    for f in _fields(model_proto):
        if f.number == 3 and f.wire == 2:
            for g in _fields(f.value):  # type: ignore[arg-type]
                if g.number == 3:
                    return bool(g.value)
    return True  # proto default


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """The same model with ``normalizer_spec.add_dummy_prefix = false``."""
    out = bytearray()
    seen = False
    for f in _fields(model_proto):
        if f.number == 3 and f.wire == 2:
            seen = True
            sub = b"".join(g.raw for g in _fields(f.value) if g.number != 3)  # type: ignore[arg-type]
            sub += _encode_varint((3 << 3) | 0) + _encode_varint(0)
            out += _encode_varint((3 << 3) | 2) + _encode_varint(len(sub)) + sub
        else:
            out += f.raw
    if not seen:
        sub = _encode_varint((3 << 3) | 0) + _encode_varint(0)
        out += _encode_varint((3 << 3) | 2) + _encode_varint(len(sub)) + sub
    return bytes(out)
