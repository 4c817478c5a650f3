#!/usr/bin/env python
"""Build the demo multi-task set from the Python standard library, and its tokenizer.

Four code tasks, derived deterministically from the stdlib source of the running interpreter
(walked in sorted order, parsed with ``ast``, functions chosen by a hash of their name):

  code-completion   prompt/answer          header + docstring -> the rest of the function
  text-to-code      chat_rounds (human/bot, some with a system turn, some two-round)
                                           signature + docstring -> code; then "add a docstring"
  docstring         instruction/output     function without docstring -> its docstring
  doctest           chat_rounds (user/assistant)
                                           function + description -> its >>> examples

Each task gets ``raw/<task>/train.jsonl`` and ``raw/<task>/val.jsonl`` (the val file name
marks validation data). A SentencePiece BPE tokenizer (vocab 2048 = the ``tiny`` preset,
CodeLlama-style options: byte fallback, identity normalization, dummy prefix, digits split)
is trained on the training text with the template markers as user-defined symbols.

The outputs are committed; running this script again on the same Python version rewrites
them byte for byte (``SOURCE.json`` records the version and the sha256 of every output).

    python examples/demo_data/make_demo_data.py [--out examples/demo_data] [--check]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import platform
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKERS = ["<|role_start|>", "<|role_end|>"]
VOCAB_SIZE = 2048
TRAIN_PER_TASK = 1500
VAL_PER_TASK = 50
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "tkinter",
             "ensurepip", "pydoc_data", "encodings", "__pycache__", "venv"}
SYSTEM = "You are a careful Python programmer. Answer with correct, idiomatic code."


@dataclass(frozen=True)
class Func:
    where: str  # "module/path.py:qualname"
    name: str
    signature: str
    source: str  # dedented function source (no decorators)
    no_doc: str  # the same without its docstring
    header: str  # def line(s) + docstring
    rest: str  # body after the docstring
    doc: str  # cleaned docstring


def _key(*parts: str) -> str:
    return hashlib.sha1(":".join(parts).encode()).hexdigest()


def _functions(path: Path, rel: str) -> list[Func]:
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = src.splitlines()
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef):
                f = _one(child, prefix, lines, rel)
                if f is not None:
                    out.append(f)

    visit(tree, "")
    return out


def _one(node: ast.FunctionDef, prefix: str, lines: list[str], rel: str) -> Func | None:
    doc = ast.get_docstring(node)
    body0 = node.body[0]
    if not doc or len(doc) < 30 or len(node.body) < 2:
        return None
    if not (isinstance(body0, ast.Expr) and isinstance(body0.value, ast.Constant)):
        return None
    start, end = node.lineno - 1, node.end_lineno or node.lineno
    if not 4 <= end - start <= 60:
        return None
    seg = lines[start:end]
    if any("\t" in s for s in seg):
        return None
    text = textwrap.dedent("\n".join(seg))
    if len(text) > 2500:
        return None
    d0, d1 = body0.lineno - 1 - start, (body0.end_lineno or body0.lineno) - start
    flines = text.splitlines()
    header = "\n".join(flines[:d1])
    body = flines[d1:]
    while body and not body[0].strip():  # the blank line that usually follows a docstring
        body.pop(0)
    rest = "\n".join(body)
    no_doc = "\n".join(flines[:d0] + body)
    if not rest.strip():
        return None
    sig = f"{node.name}({ast.unparse(node.args)})"
    return Func(f"{rel}:{prefix}{node.name}", node.name, sig, text, no_doc, header, rest, doc)


def collect(stdlib: Path) -> list[Func]:
    funcs = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                funcs += _functions(p, p.relative_to(stdlib).as_posix())
    return funcs


def _code(s: str) -> str:
    return f"```python\n{s}\n```"


def completion(f: Func) -> dict | None:
    return {"prompt": f"Complete this Python function:\n\n{_code(f.header)}", "answer": f.rest,
            "source": f.where}


def text_to_code(f: Func) -> dict | None:
    k = int(_key(f.where, "t2c")[:4], 16)
    rounds = []
    if k % 3 == 0:
        rounds.append({"role": "system", "content": SYSTEM})
    rounds += [{"role": "human", "content": f"Write a Python function `{f.signature}`.\n\n{f.doc}"},
               {"role": "bot", "content": _code(f.no_doc)}]
    if k % 4 == 1:
        rounds += [{"role": "human", "content": "Now add a docstring that explains it."},
                   {"role": "bot", "content": _code(f.source)}]
    return {"chat_rounds": rounds, "source": f.where}


def docstring(f: Func) -> dict | None:
    return {"instruction": "Write a docstring for this Python function.", "input": _code(f.no_doc),
            "output": f.doc, "source": f.where}


def doctest(f: Func) -> dict | None:
    lines = f.doc.splitlines()
    first = next((i for i, s in enumerate(lines) if s.lstrip().startswith(">>>")), None)
    if first is None:
        return None
    pre = "\n".join(lines[:first]).strip()
    examples = textwrap.dedent("\n".join(lines[first:])).strip()
    if not pre or len(examples) < 10:
        return None
    prompt = f"Write doctest examples for this Python function.\n\n{_code(f.no_doc)}\n\nWhat it does: {pre}"
    return {"chat_rounds": [{"role": "user", "content": prompt}, {"role": "assistant", "content": examples}],
            "source": f.where}


TASKS = {"code-completion": completion, "docstring": docstring, "doctest": doctest, "text-to-code": text_to_code}


def build_tasks(funcs: list[Func]) -> dict[str, tuple[list[dict], list[dict]]]:
    out = {}
    for task, make in TASKS.items():
        ranked = sorted(funcs, key=lambda f: _key(task, f.where))
        samples = []
        for f in ranked:
            s = make(f)
            if s is not None:
                samples.append(s)
            if len(samples) == TRAIN_PER_TASK + VAL_PER_TASK:
                break
        n_val = max(1, len(samples) // 11) if len(samples) < TRAIN_PER_TASK + VAL_PER_TASK else VAL_PER_TASK
        out[task] = (samples[n_val:], samples[:n_val])
    return out


def _texts(sample: dict) -> list[str]:
    if "chat_rounds" in sample:
        return [r["content"] for r in sample["chat_rounds"]]
    return [v for k, v in sample.items() if k in ("prompt", "answer", "instruction", "input", "output")]


def train_tokenizer(samples: list[dict]) -> bytes:
    import sentencepiece as spm

    lines = [ln for s in samples for t in _texts(s) for ln in t.split("\n") if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=VOCAB_SIZE,
        user_defined_symbols=MARKERS, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, max_sentence_length=16384,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2,
    )
    return buf.getvalue()


def _dump(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def generate() -> dict[str, bytes]:
    """All output files (relative path -> bytes)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    funcs = collect(stdlib)
    tasks = build_tasks(funcs)
    files: dict[str, bytes] = {}
    for task, (train, val) in tasks.items():
        files[f"raw/{task}/train.jsonl"] = _dump(train)
        files[f"raw/{task}/val.jsonl"] = _dump(val)
    files["tokenizer/demo_sp2048.model"] = train_tokenizer([s for tr, _ in tasks.values() for s in tr])
    source = {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "candidate_functions": len(funcs),
        "tasks": {t: {"train": len(tr), "val": len(va)} for t, (tr, va) in tasks.items()},
        "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())},
    }
    files["SOURCE.json"] = (json.dumps(source, indent=2, sort_keys=True) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE), help="output folder (default: next to this script)")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    recorded = out / "SOURCE.json"
    if recorded.is_file():
        was = json.loads(recorded.read_text()).get("python")
        if was != platform.python_version():
            print(f"note: committed data was made with Python {was}; this is {platform.python_version()}, "
                  "so the stdlib (and the output) may differ", file=sys.stderr)
    files = generate()
    if args.check:
        diff = [k for k, v in files.items() if not (out / k).is_file() or (out / k).read_bytes() != v]
        print("identical" if not diff else "differs: " + ", ".join(diff))
        return 1 if diff else 0
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    total = sum(len(v) for v in files.values())
    print(f"wrote {len(files)} files, {total / 1e6:.2f} MB, to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
