"""Raw jsonl lines -> validated records, or a named reason why the line is unusable.

Accepted line shapes (one JSON object per line; other keys are ignored):
  {"chat_rounds": [{"role": "system"|"human"|"user"|"bot"|"assistant", "content": str}, ...]}
  {"prompt": str, "answer": str, "system"?: str}
  {"instruction": str, "input"?: str, "output": str, "system"?: str}
  {"text": str}                      (pretraining continuation: loss on every token)
Blank lines are skipped. Why strict: a silently mis-parsed line trains on garbage, so each
problem gets a reason code that the preprocessing stats count and the error message names.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import NamedTuple

from megatron_mft.errors import UserError

try:  # optional: a strict JSON parser ~2x faster than the stdlib's; the stdlib decides every failure
    from orjson import loads as _strict_loads
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    _strict_loads = None


class Reason(str, Enum):
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_FORMAT = "unknown_format"
    MISSING_ROLE = "missing_role"
    UNKNOWN_ROLE = "unknown_role"
    EMPTY_ANSWER = "empty_answer"
    NO_BOT_TURN = "no_bot_turn"
    #: a turn the template's chat format cannot express (a system turn where the family has none)
    TEMPLATE_UNSUPPORTED = "template_unsupported"
    OVERLONG = "overlong"
    #: longer than the byte limit (--max-line-bytes / data.max_line_bytes): rejected unread
    LINE_TOO_LONG = "line_too_long"


class RecordError(ValueError):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


#: Accepted role spellings -> canonical role.
ROLES = {"system": "system", "human": "human", "user": "human", "bot": "bot", "assistant": "bot"}


class Turn(NamedTuple):
    role: str  # canonical: system | human | bot
    content: str


class Record(NamedTuple):
    """Either a conversation (``turns``) or a plain document (``text``). Tuples: preprocessing
    builds one per line, and a tuple costs a fraction of a frozen dataclass."""

    turns: tuple[Turn, ...] = ()
    text: str | None = None


def _str_field(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(Reason.WRONG_TYPE, f"{where}{key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_str(obj: dict, key: str) -> str:
    return _str_field(obj, key, "") if obj.get(key) is not None else ""


def _chat(obj: dict) -> Record:
    rounds = obj["chat_rounds"]
    if not isinstance(rounds, list):
        raise RecordError(Reason.WRONG_TYPE, f"'chat_rounds' must be a list, got {type(rounds).__name__}")
    turns = []
    has_bot = False
    for i, r in enumerate(rounds):
        if not isinstance(r, dict):
            raise RecordError(Reason.WRONG_TYPE, f"chat_rounds[{i}] must be an object, got {type(r).__name__}")
        if "role" not in r:
            raise RecordError(Reason.MISSING_ROLE, f"chat_rounds[{i}] has no 'role'")
        role = r["role"]
        if not isinstance(role, str):
            raise RecordError(Reason.WRONG_TYPE, f"chat_rounds[{i}]['role'] must be a string, got {type(role).__name__}")
        canon = ROLES.get(role) or ROLES.get(role.strip().lower())
        if canon is None:
            raise RecordError(Reason.UNKNOWN_ROLE, f"chat_rounds[{i}] role {role!r}; known: {', '.join(ROLES)}")
        if "content" not in r:
            raise RecordError(Reason.WRONG_TYPE, f"chat_rounds[{i}] has no 'content' string")
        content = _str_field(r, "content", f"chat_rounds[{i}] ")
        if canon == "bot":
            if not content.strip():
                raise RecordError(Reason.EMPTY_ANSWER, f"chat_rounds[{i}] (bot) is empty")
            has_bot = True
        turns.append(Turn(canon, content))
    if not has_bot:
        raise RecordError(Reason.NO_BOT_TURN, "no bot/assistant turn to learn from")
    return Record(turns=tuple(turns))


def _pair(obj: dict, prompt_key: str, answer_key: str) -> Record:
    for k in (prompt_key, answer_key):
        if k not in obj:
            raise RecordError(Reason.UNKNOWN_FORMAT, f"has {prompt_key!r}/{answer_key!r} format but no {k!r}")
    prompt = _str_field(obj, prompt_key, "")
    answer = _str_field(obj, answer_key, "")
    extra = _optional_str(obj, "input") if prompt_key == "instruction" else ""
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    if not answer.strip():
        raise RecordError(Reason.EMPTY_ANSWER, f"{answer_key!r} is empty")
    system = _optional_str(obj, "system")
    turns = ((Turn("system", system),) if system else ()) + (Turn("human", prompt), Turn("bot", answer))
    return Record(turns=turns)


def _text(obj: dict) -> Record:
    text = _str_field(obj, "text", "")
    if not text.strip():
        raise RecordError(Reason.EMPTY_ANSWER, "'text' is empty")
    return Record(text=text)


_BLANK = object()


def _stdlib_loads(raw: bytes):
    """The reference parse: what the stdlib accepts is accepted, and its errors are the messages."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(Reason.INVALID_UTF8, f"byte {e.start}: {e.reason}") from None
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(Reason.INVALID_JSON, f"column {e.colno}: {e.msg}") from None


def _loads(raw: bytes):
    if _strict_loads is not None:
        try:
            return _strict_loads(raw)
        except ValueError:  # invalid UTF-8, NaN, lone surrogates, huge ints, errors: the stdlib decides
            pass
    return _stdlib_loads(raw)


def parse_line(raw: bytes) -> Record | None:
    """One raw line (without its newline) -> Record; None for a blank line; RecordError otherwise."""
    obj = _loads(raw)
    if obj is _BLANK:
        return None
    if not isinstance(obj, dict):
        raise RecordError(Reason.WRONG_TYPE, f"line must be a JSON object, got {type(obj).__name__}")
    if "chat_rounds" in obj:
        return _chat(obj)
    if "prompt" in obj or "answer" in obj:
        return _pair(obj, "prompt", "answer")
    if "instruction" in obj or "output" in obj:
        return _pair(obj, "instruction", "output")
    if "text" in obj:
        return _text(obj)
    raise RecordError(
        Reason.UNKNOWN_FORMAT,
        f"no chat_rounds, prompt/answer, instruction/output or text key (keys: {', '.join(map(str, obj))})",
    )


class DataError(UserError, ValueError):
    """Unusable input or preprocessed data: one message per problem, each naming ``file:line`` or
    the damaged file (exit 1)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def __reduce__(self):  # multiprocessing re-raises errors of the task generator in a worker
        return type(self), (self.problems,)
