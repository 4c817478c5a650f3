"""The raw data layout: one sub-folder per task, jsonl files inside, validation files by name.

Convention (documented in FORMAT.md):
  DATA/<task>/**/*.jsonl            task name = folder name; tasks sorted by name = task ids
  validation files                  any .jsonl under a ``val/`` (``valid/``, ``validation/``, ``dev/``) folder of
                                    the task, or whose file stem has ``val``/``valid``/``validation``/
                                    ``dev`` as a word (``val.jsonl``, ``foo_val.jsonl``, ``val-1.jsonl``)
  otherwise                         the task is split by ``val_ratio`` (seeded, per task)
  skipped                           folders starting with ``.`` or ``_`` (at any depth) and folders
                                    holding a preprocessing output (its manifest.json), so an output
                                    written inside the data folder is never read back as data
  refused                           a broken symbolic link that could be input: any name but a document's
                                    (README.md, notes.txt: ignored with a warning), named with where it
                                    points, so a missing mount or a moved file is never a silently
                                    missing task or file; two task folders that are one folder, or one
                                    that holds the data folder
  followed                          working symbolic links, each folder and file once, never into
                                    another task nor up to a folder holding the task (warned)
Why names, not flags: a data directory should describe itself so every run splits it the same way.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_mft.compat.fsops import broken_link
from megatron_mft.data.outdir import is_output_dir
from megatron_mft.errors import UsageError

log = logging.getLogger(__name__)

_VAL_DIRS = {"val", "valid", "validation", "dev"}
_VAL_STEM = re.compile(r"(^|[._-])(val|valid|validation|dev)([._-]|$)", re.IGNORECASE)


class DataDirError(UsageError, ValueError):
    """An unusable ``--data-dir`` / ``data.path`` (exit 2)."""


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


def _shown(path: str | Path) -> str:
    """A path for a message, undecodable bytes as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:  # os.fsdecode's surrogate escapes of undecodable bytes
        return True


def _skipped(name: str) -> bool:
    return name.startswith((".", "_"))


#: suffixes of files that sit beside data and are never data or a task folder (a folder named
#: ``py3.10`` or ``v1.2`` has a "suffix" too: only these make a broken link ignorable)
_NOT_DATA = frozenset((".md", ".txt", ".rst", ".html", ".htm", ".pdf", ".log", ".yaml", ".yml", ".json", ".csv",
                       ".tsv", ".png", ".jpg", ".jpeg", ".svg", ".sh", ".ipynb", ".gz", ".zip", ".tar"))


def _broken(path: Path, problems: list[str], warn: Callable[[str], None]) -> bool:
    """Whether ``path`` is a broken symbolic link: one that could be input (a task folder or
    sub-folder, a .jsonl: any name but a document's) goes to ``problems``; a document's (README.md,
    notes.txt) is ignored with a warning, so a stray link beside the data does not refuse it."""
    broken = broken_link(path)
    if broken and path.suffix.lower() not in _NOT_DATA:
        problems.append(f"{_shown(path)}: {broken}")
    elif broken:
        warn(f"{_shown(path)}: {broken}; ignored (a {path.suffix} file is no task folder or data file)")
    return bool(broken)


def _within(path: str, folder: str) -> bool:
    """Real path ``path`` is ``folder`` or lies below it (``/`` holds everything)."""
    return os.path.commonpath([path, folder]) == folder


def _overlapping(real: str, tasks: dict[str, str]) -> Optional[str]:
    """The task (``tasks``: real path -> name) whose folder is, holds or lies inside ``real``."""
    return next((name for top, name in tasks.items() if _within(real, top) or _within(top, real)), None)


def _jsonl_files(task_dir: Path, problems: list[str], warn: Callable[[str], None],
                 other_tasks: dict[str, str]) -> list[Path]:
    """The task's .jsonl files, sorted, without hidden folders and preprocessing outputs; a linked
    sub-folder is read, unless it leads inside this task (read there), to a folder holding it (an
    endless walk) or into another task (``other_tasks``: real path -> name; counted twice), each
    skipped with a warning. Broken links that could be input go to ``problems``."""
    task_real = os.path.realpath(task_dir)
    real_of = {str(task_dir): task_real}  # walked folder -> its real path
    walked = {task_real}  # the same, as a set: each folder read once (a loop ends here)
    files_found: list[tuple[Path, str, bool]] = []  # (path, real path, is a link)

    for here, dirs, files in os.walk(task_dir, followlinks=True,
                                     onerror=lambda e: problems.append(f"{_shown(e.filename)}: "
                                                                       f"cannot list ({e.strerror})")):
        kept = []
        for d in sorted(dirs):
            path = Path(here) / d
            if _skipped(d) or is_output_dir(path):
                continue
            link = path.is_symlink()
            real = os.path.realpath(path) if link else os.path.join(real_of[here], d)
            why = None
            if real in walked:  # through another link: the same files twice, or a loop
                why = "a folder this task already reads"
            elif link:  # a linked sub-folder is read (os.walk skipped it silently) unless it leads
                other = _overlapping(real, other_tasks)
                why = ("inside this task, read there" if _within(real, task_real) else
                       "a folder that holds this task" if _within(task_real, real) else
                       f"task {other}'s folder: its files would count for two tasks" if other else None)
            if why:
                warn(f"{_shown(path)}: links to {_shown(real)}, {why}; not read through this link" if link else
                     f"{_shown(path)}: {_shown(real)} is {why}; not read twice")
                continue
            real_of[str(path)] = real
            walked.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in files:
            path = Path(here) / name
            if _skipped(name) and not name.endswith(".jsonl"):
                continue  # hidden or named as a skipped folder (_old): not data, as at the top
            if _broken(path, problems, warn):
                continue
            if name.endswith(".jsonl") and path.is_file():
                if _not_utf8(str(path)):
                    problems.append(f"{_shown(path)}: file name is not valid UTF-8; rename it")
                else:
                    link = path.is_symlink()
                    real = os.path.realpath(path) if link else os.path.join(real_of[here], name)
                    files_found.append((path, real, link))
    # linked files last: one that leads to a file this task reads anyway (a val/ file linked
    # among the training files) or into another task is not read through the link
    read = {real for _, real, link in files_found if not link}
    found = [path for path, _, link in files_found if not link]
    for path, real, link in files_found:
        if not link:
            continue
        other = _overlapping(real, other_tasks)
        why = ("a file this task already reads" if real in read else
               f"a file of task {other}: it would count for two tasks" if other else None)
        if why:
            warn(f"{_shown(path)}: links to {_shown(real)}, {why}; not read through this link")
            continue
        read.add(real)
        found.append(path)
    return sorted(found)


def discover_tasks(data_dir: str | Path, warn: Optional[Callable[[str], None]] = None) -> list[TaskFiles]:
    """The tasks of ``data_dir`` (the convention above); ``warn`` (default: this module's logger)
    gets one line per broken link that is ignored and per linked folder that is not read. Raises
    DataDirError with every problem."""
    warn = warn or log.warning
    root = Path(data_dir)
    if not root.is_dir():
        raise DataDirError(f"data folder {data_dir}: not a folder")
    tasks = []
    problems: list[str] = []
    try:
        entries = sorted(p for p in root.iterdir() if not _skipped(p.name))
    except OSError as e:
        raise DataDirError(f"data folder {data_dir}: cannot list ({e.strerror})") from None
    for p in entries:
        _broken(p, problems, warn)
    subs = [p for p in entries if p.is_dir() and not is_output_dir(p)]
    roots: dict[str, str] = {}  # real path -> task name
    data_real, refused = os.path.realpath(root), set()
    for sub in subs:
        real = os.path.realpath(sub)
        same = _overlapping(real, roots)
        if _within(data_real, real):  # data/all -> .. or -> /: the whole tree
            problems.append(f"{_shown(sub)}: links to {_shown(real)}, a folder that holds the data folder itself")
            refused.add(sub)
        elif same is not None:
            problems.append(f"{_shown(sub)}: the same folder as task {same} (or one inside the other, through a "
                            f"symbolic link): one task per folder, or its samples count twice")
            refused.add(sub)
        else:
            roots[real] = sub.name
    for sub in (s for s in subs if s not in refused):
        if _not_utf8(sub.name):
            problems.append(f"{_shown(sub)}: task folder name is not valid UTF-8; rename it")
            continue
        known = len(problems)
        others = {top: name for top, name in roots.items() if name != sub.name}
        files = _jsonl_files(sub, problems, warn, others)
        if not files and len(problems) == known:  # else the broken links are the reason
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
