#!/usr/bin/env python
"""Demo preference pairs from the demo SFT data: the correct answer against a broken one.

For every task of ``raw/`` (the first ``--train`` training and ``--val`` validation samples),
chosen = the original answer, rejected = a deterministic corruption of it that no longer does
the job: doctest answers get one expected output changed (the doctest fails); code answers get
one operator flipped (``==``/``!=``, ``<``/``>=``, ``+``/``-``, ``True``/``False``, ``and``/``or``)
or, with none of those, their last line dropped; docstrings lose their second half. Pure text
work on the committed files (no interpreter-dependent input), so every rerun gives the same bytes;
``--check`` says whether it does. Output: ``preference/<task>/{train,val}.jsonl`` in the
``{"chosen": [...], "rejected": [...]}`` format (docs/preference.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLIPS = [("==", "!="), ("!=", "=="), (" < ", " >= "), (" > ", " <= "), (" + ", " - "), (" - ", " + "),
         ("True", "False"), ("False", "True"), (" and ", " or "), (" or ", " and ")]


def _rounds(obj: dict) -> list[dict]:
    """Any demo record shape -> chat rounds (system/human/bot)."""
    if "chat_rounds" in obj:
        return [dict(r) for r in obj["chat_rounds"]]
    if "prompt" in obj:
        return [{"role": "human", "content": obj["prompt"]}, {"role": "bot", "content": obj["answer"]}]
    prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    rounds = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    return rounds + [{"role": "human", "content": prompt}, {"role": "bot", "content": obj["output"]}]


def _pick(text: str, n: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % max(n, 1)


def break_doctest(answer: str) -> str:
    lines = answer.split("\n")
    outs = [i for i, l in enumerate(lines) if l.strip() and not l.lstrip().startswith((">>>", "..."))]
    if not outs:
        return break_code(answer)
    i = outs[_pick(answer, len(outs))]
    lines[i] = lines[i] + "0" if not lines[i].rstrip().endswith("0") else lines[i].rstrip()[:-1] + "1"
    return "\n".join(lines)


def break_code(answer: str) -> str:
    hits = [(m.start(), a, b) for a, b in FLIPS for m in re.finditer(re.escape(a), answer)]
    if hits:
        hits.sort()
        pos, a, b = hits[_pick(answer, len(hits))]
        return answer[:pos] + b + answer[pos + len(a):]
    lines = answer.rstrip("\n").split("\n")
    return "\n".join(lines[:-1]) if len(lines) > 1 else answer + "\n    return None"


def break_docstring(answer: str) -> str:
    words = answer.split()
    return " ".join(words[: max(1, len(words) // 2)])


BREAK = {"doctest": break_doctest, "docstring": break_docstring}


def pairs_of(task: str, path: Path, limit: int) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if len(out) == limit:
            break
        chosen = _rounds(json.loads(line))
        good = chosen[-1]["content"]
        bad = BREAK.get(task, break_code)(good)
        if bad.strip() == good.strip() or not bad.strip():
            continue
        rejected = [dict(r) for r in chosen[:-1]] + [{"role": chosen[-1]["role"], "content": bad}]
        out.append({"chosen": chosen, "rejected": rejected})
    return out


def generate(train: int, val: int) -> dict[str, bytes]:
    files = {}
    for task_dir in sorted(p for p in (HERE / "raw").iterdir() if p.is_dir()):
        for split, n in (("train", train), ("val", val)):
            rows = pairs_of(task_dir.name, task_dir / f"{split}.jsonl", n)
            files[f"preference/{task_dir.name}/{split}.jsonl"] = "".join(
                json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=100, help="pairs per task from train.jsonl")
    ap.add_argument("--val", type=int, default=8, help="pairs per task from val.jsonl")
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    a = ap.parse_args(argv)
    files = generate(a.train, a.val)
    if a.check:
        diff = [k for k, v in files.items() if not (HERE / k).is_file() or (HERE / k).read_bytes() != v]
        print("identical" if not diff else "differs: " + ", ".join(diff))
        return 1 if diff else 0
    for rel, data in files.items():
        (HERE / rel).parent.mkdir(parents=True, exist_ok=True)
        (HERE / rel).write_bytes(data)
        print(f"wrote {rel} ({data.count(10)} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
