"""The raw data layout: one sub-folder per task, jsonl files inside, validation files by name.

Convention (documented in FORMAT.md):
  DATA/<task>/**/*.jsonl            task name = folder name; tasks sorted by name = task ids
  validation files                  any .jsonl under a ``val/`` (``valid/``, ``validation/``, ``dev/``) folder of
                                    the task, or whose file stem has ``val``/``valid``/``validation``/
                                    ``dev`` as a word (``val.jsonl``, ``foo_val.jsonl``, ``val-1.jsonl``)
  otherwise                         the task is split by ``val_ratio`` (seeded, per task)
Why names, not flags: a data directory should describe itself so every run splits it the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_VAL_DIRS = {"val", "valid", "validation", "dev"}
_VAL_STEM = re.compile(r"(^|[._-])(val|valid|validation|dev)([._-]|$)", re.IGNORECASE)


class DataDirError(ValueError):
    pass


@dataclass(frozen=True)
class TaskFiles:
    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]

    @property
    def val_source(self) -> str:
        return "files" if self.val else "ratio"


def is_val_file(relpath: Path) -> bool:
    """True for a task-relative path that the convention marks as validation data."""
    if any(part.lower() in _VAL_DIRS for part in relpath.parts[:-1]):
        return True
    return bool(_VAL_STEM.search(relpath.stem))


def discover_tasks(data_dir: str | Path) -> list[TaskFiles]:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataDirError(f"--data-dir {data_dir}: not a directory")
    tasks = []
    problems = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        files = sorted(f for f in sub.rglob("*.jsonl") if f.is_file())
        if not files:
            problems.append(f"{sub}: task folder has no .jsonl files")
            continue
        val = tuple(str(f) for f in files if is_val_file(f.relative_to(sub)))
        train = tuple(str(f) for f in files if str(f) not in val)
        if not train:
            problems.append(f"{sub}: only validation files, no training data")
            continue
        tasks.append(TaskFiles(sub.name, train, val))
    if problems:
        raise DataDirError("\n".join(problems))
    if not tasks:
        raise DataDirError(f"{data_dir}: no task folders (expected DATA/<task>/*.jsonl)")
    return tasks
