"""The preprocessing output folder: recognising an earlier output, and replacing it safely.

Why so careful: ``--overwrite`` used to delete whatever ``--output-dir`` named, the input data
included. A folder is replaced only when it is recognisably an earlier output of this tool (a
readable manifest of our format and no file the tool does not write) and it neither is nor holds
the data or the tokenizer. The new output is written beside it and swapped in only when complete
(an atomic exchange where the kernel offers one), so a failed or interrupted run never destroys
the previous good output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_mft.compat.fsops import cannot_write_in, exchange_paths, fsync_tree

#: ``manifest.json``'s ``format`` of an offline output (FORMAT.md section 3).
OUTPUT_FORMAT = "megatron-mft/packed-v1"
MANIFEST = "manifest.json"
_SPLITS = ("train", "val")
_PARTS = ("tokens", "loss_mask", "task_ids", "sample_uids")
#: every name the tool writes into an output folder
OUTPUT_FILES = frozenset(
    {MANIFEST, "stats.json", "rejected.jsonl", "_reference_logps"}  # the last: DPO reference log-probs
    | {f"{s}_{p}.{ext}" for s in _SPLITS for p in _PARTS for ext in ("bin", "idx")}
)


def manifest_problem(folder: Path) -> str | None:
    """None when ``folder/manifest.json`` is a readable manifest of an offline output, else why not."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return f"has no {MANIFEST}"
    except (OSError, ValueError) as e:
        return f"{path} is not valid JSON ({e})"
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != OUTPUT_FORMAT:
        return f"{path} has format {fmt!r}, not {OUTPUT_FORMAT!r}"
    return None


def is_output_dir(folder: Path) -> bool:
    """True for a folder holding an offline output's manifest (data discovery skips these)."""
    return (folder / MANIFEST).is_file() and manifest_problem(folder) is None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_dir_problems(output_dir: str, data_dir: str, tokenizer: str, overwrite: bool) -> list[str]:
    """Why ``--output-dir`` may not be (re)written; empty when it may. Paths are compared with
    symlinks resolved, so a link to the data folder is the data folder."""
    flag = f"--output-dir {output_dir}"
    out = Path(output_dir).resolve()
    problems = []
    if out.exists() and not out.is_dir():
        return [f"{flag}: exists and is not a folder"]
    ancestor = next((a for a in out.parents if a.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        return [f"{flag}: {ancestor} is not a folder"]
    if ancestor is not None:  # known now, not after hours of tokenizing: a probe folder, removed at once
        why = cannot_write_in(ancestor)
        if why:
            return [f"{flag}: cannot write in {ancestor} ({why})"]
    if not out.exists() or not any(out.iterdir()):
        return []
    for what, path in (("the data folder (--data-dir)", data_dir), ("the tokenizer (--tokenizer-model)", tokenizer)):
        if path and _inside(Path(path).resolve(), out):
            problems.append(f"{flag}: {'is' if Path(path).resolve() == out else 'holds'} {what} {path}; "
                            f"refusing to replace it")
    if problems:
        return problems
    if not overwrite:
        return [f"{flag}: exists and is not empty (pass --overwrite to replace an earlier output of this tool)"]
    why = manifest_problem(out)
    if why is not None:
        return [f"{flag}: not an earlier output of preprocess_mft.py ({why}); refusing to replace it. "
                f"Choose a new or empty folder"]
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
    if foreign:
        return [f"{flag}: holds files this tool did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it. Move them, or choose another folder"]
    return []


def temp_dir_for(out: Path) -> Path:
    """The hidden sibling the new output is written to (data discovery skips hidden folders)."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def swap_into_place(tmp: Path, out: Path) -> None:
    """Make the complete folder ``tmp`` the folder ``out``; the previous ``out`` is deleted only
    after the new one is in place. With an atomic exchange there is no moment without a complete
    ``out``; otherwise (two renames) an exception between them moves the previous one back."""
    fsync_tree(tmp)  # durable before the previous output can go
    if not out.exists():
        os.rename(tmp, out)
        return
    if exchange_paths(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous output
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)

