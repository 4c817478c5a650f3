"""SLURM host lists without ``scontrol``.

SLURM compresses node lists: ``gpu[001-003,007],cpu5`` means gpu001, gpu002, gpu003, gpu007,
cpu5. Several bracket groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1, r1n2,
r2n1, r2n2), and a range keeps the zero padding of its lower bound. ``scontrol show hostnames``
does the same, but it is not installed inside most containers, so the launch code and
``run_scripts/common.sh`` use this module instead.

Command line (prints one host per line, like ``scontrol show hostnames``)::

    python -m megatron_mft.launch.hostnames "gpu[001-003,007],cpu5"
    python -m megatron_mft.launch.hostnames            # reads SLURM_JOB_NODELIST
    python -m megatron_mft.launch.hostnames --first    # only the first host (the master)

This module imports nothing heavy: shell scripts call it before every launch.
"""

from __future__ import annotations

import itertools
import os
import sys

__all__ = ["HostListError", "expand_nodelist", "split_top_level"]


class HostListError(ValueError):
    """A node list that SLURM's syntax cannot produce."""


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostListError(f"node list {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostListError(f"node list {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise HostListError(f"node list {text!r}: '[' is never closed")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str, whole: str) -> list[str]:
    """``001-003,007`` -> ["001", "002", "003", "007"]; padding follows the lower bound."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostListError(f"node list {whole!r}: bad range {item!r} inside [{body}]")
        if not sep:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise HostListError(f"node list {whole!r}: range {item!r} runs backwards")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out.extend(str(n).zfill(width) for n in range(a, b + 1))
    return out


def _expand_one(name: str, whole: str) -> list[str]:
    """One comma-free entry, possibly with several bracket groups."""
    pieces: list[list[str]] = []
    rest = name
    while "[" in rest:
        head, _, tail = rest.partition("[")
        body, closed, rest = tail.partition("]")
        if not closed:
            raise HostListError(f"node list {whole!r}: '[' is never closed")
        pieces.append([head])
        pieces.append(_expand_ranges(body, whole))
    if "]" in rest:
        raise HostListError(f"node list {whole!r}: ']' without '['")
    pieces.append([rest])
    return ["".join(p) for p in itertools.product(*pieces)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list into host names, in SLURM's order (duplicates kept)."""
    text = (nodelist or "").strip()
    if not text:
        raise HostListError("node list is empty")
    hosts: list[str] = []
    for entry in split_top_level(text):
        entry = entry.strip()
        if not entry:
            raise HostListError(f"node list {nodelist!r}: empty entry between commas")
        hosts.extend(_expand_one(entry, nodelist))
    return hosts


NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    first = "--first" in args
    args = [a for a in args if a != "--first"]
    if any(a.startswith("-") for a in args) or len(args) > 1:
        print(__doc__.split("Command line")[1].split("This module")[0].strip(), file=sys.stderr)
        return 2
    if args:
        text = args[0]
    else:
        text = next((os.environ[v] for v in NODELIST_VARS if os.environ.get(v)), "")
        if not text:
            print(f"no node list given and none of {', '.join(NODELIST_VARS)} is set", file=sys.stderr)
            return 2
    try:
        hosts = expand_nodelist(text)
    except HostListError as e:
        print(e, file=sys.stderr)
        return 1
    print("\n".join(hosts[:1] if first else hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
