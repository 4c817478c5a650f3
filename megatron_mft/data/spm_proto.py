"""Just enough protobuf wire format to switch off a SentencePiece model's dummy prefix.

Why: we encode a sample segment by segment (so template markers can never be produced from user
text), and each segment must be encoded as a *continuation*. CodeLlama's model has
``add_dummy_prefix = true``, which would put a spurious "▁" (space) in front of every segment.
The python package exposes no switch for it and ``protobuf`` is not a dependency, so we flip the
one boolean in the serialized ``NormalizerSpec`` ourselves.

It also tells the type of one piece: only user-defined symbols (type 4) are matched verbatim
anywhere in raw text, which is what makes a template marker a single, protectable id.

Schema (sentencepiece_model.proto): ModelProto{1: repeated SentencePiece pieces, 2: TrainerSpec,
3: NormalizerSpec normalizer_spec, ...}; SentencePiece{1: string piece, 2: float score,
3: Type type = NORMAL}; NormalizerSpec{..., 3: bool add_dummy_prefix = true}.
Only the top level and single messages are walked, never the whole vocabulary.
"""

from __future__ import annotations

CONTROL = 3  # SentencePiece.Type
USER_DEFINED = 4
_PIECES = 1  # ModelProto.pieces
_TYPE = 3  # SentencePiece.type
_NORMALIZER = 3  # ModelProto.normalizer_spec
_ADD_DUMMY_PREFIX = 3  # NormalizerSpec.add_dummy_prefix


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


def _walk(buf: bytes):
    """Yield (field number, wire type, start, value start, end) for each top-level field."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _varint(buf, pos)
        elif wire == 1:
            end = pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            end = pos + n
        elif wire == 5:
            end = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in SentencePiece model")
        yield number, wire, start, pos, end
        pos = end


def piece_type(model_proto: bytes, index: int) -> int:
    """The ``SentencePiece.Type`` of vocabulary entry ``index`` (1 = NORMAL when unset)."""
    seen = 0
    for number, wire, _, v, end in _walk(model_proto):
        if number == _PIECES and wire == 2:
            if seen == index:
                piece = model_proto[v:end]
                for n2, w2, _, v2, _ in _walk(piece):
                    if n2 == _TYPE and w2 == 0:
                        return _varint(piece, v2)[0]
                return 1
            seen += 1
    raise IndexError(f"piece {index} not in the model ({seen} pieces)")


def add_dummy_prefix(model_proto: bytes) -> bool:
    for number, wire, _, v, end in _walk(model_proto):
        if number == _NORMALIZER and wire == 2:
            for n2, w2, _, v2, _ in _walk(model_proto[v:end]):
                if n2 == _ADD_DUMMY_PREFIX and w2 == 0:
                    return bool(_varint(model_proto[v:end], v2)[0])
    return True  # proto default


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """The same model with ``normalizer_spec.add_dummy_prefix = false``."""
    flag = _encode_varint((_ADD_DUMMY_PREFIX << 3) | 0) + _encode_varint(0)
    out = bytearray()
    seen = False
    for number, wire, start, v, end in _walk(model_proto):
        if number == _NORMALIZER and wire == 2:
            seen = True
            spec = model_proto[v:end]
            sub = b"".join(spec[s:e] for n2, _, s, _, e in _walk(spec) if n2 != _ADD_DUMMY_PREFIX) + flag
            out += _encode_varint((_NORMALIZER << 3) | 2) + _encode_varint(len(sub)) + sub
        else:
            out += model_proto[start:end]
    if not seen:
        out += _encode_varint((_NORMALIZER << 3) | 2) + _encode_varint(len(flag)) + flag
    return bytes(out)
