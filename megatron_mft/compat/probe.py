"""Probe the environment once: CUDA, Transformer Engine, flash-attn, apex.

Every hardware-dependent choice in the package reads these flags; nothing else imports the
optional packages to find out whether they exist.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Environment:
    cuda: bool
    te: bool
    flash_attn: bool
    apex: bool
    device_name: str


@lru_cache(maxsize=1)
def probe() -> Environment:
    cuda = torch.cuda.is_available()
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        import platform

        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return Environment(
        cuda=cuda,
        te=cuda and _importable("transformer_engine"),
        flash_attn=cuda and _importable("flash_attn"),
        # apex counts only with its CUDA extensions (megatron's gradient-accumulation fusion
        # needs fused_weight_gradient_mlp_cuda; a pure-Python apex install would crash the build)
        apex=cuda and _importable("apex") and _importable("fused_weight_gradient_mlp_cuda"),
        device_name=name,
    )


def available_memory(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of host memory a new allocation can get without swapping or being killed: the kernel's
    MemAvailable, lowered to the room left under this process's cgroup memory limits (SLURM's
    ``--mem`` with ConstrainRAMSpace, containers), which MemAvailable does not see. None where
    neither can be read (not Linux): callers then skip their check."""
    values = [v for v in (_mem_available(proc), _cgroup_room(proc, cgroup_root)) if v is not None]
    return min(values) if values else None


def _mem_available(proc: str) -> int | None:
    try:
        with open(f"{proc}/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


#: cgroup v2 / v1 files: the limit, the usage, the memory.stat key of reclaimable page cache
_CGROUP_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
_UNLIMITED = 2**60  # v1 writes "no limit" as ~2**63 rounded to the page size; v2 as "max"


def _cgroup_room(proc: str, root: str) -> int | None:
    """The least room (limit - usage + reclaimable page cache) over this process's memory cgroup
    and its ancestors (the tightest limit counts), or None without a limited one."""
    from pathlib import Path

    try:
        lines = Path(f"{proc}/self/cgroup").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError:
        return None
    folders = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        rel = parts[2].strip().lstrip("/")
        if parts[0] == "0" and parts[1] == "":  # v2 (on hybrid hosts mounted at .../unified)
            folders += [(2, Path(root) / rel, Path(root)), (2, Path(root) / "unified" / rel, Path(root) / "unified")]
        elif "memory" in parts[1].split(","):
            folders.append((1, Path(root) / "memory" / rel, Path(root) / "memory"))
    rooms = []
    for version, folder, top in folders:
        limit_name, usage_name, cache_key = _CGROUP_FILES[version]
        while True:
            room = _room_in(folder, limit_name, usage_name, cache_key)
            if room is not None:
                rooms.append(room)
            if folder == top or top not in folder.parents:
                break
            folder = folder.parent
    return min(rooms) if rooms else None


def _room_in(folder, limit_name: str, usage_name: str, cache_key: str) -> int | None:
    try:
        limit = (folder / limit_name).read_text(encoding="ascii").strip()
        if limit == "max" or int(limit) >= _UNLIMITED:
            return None
        usage = int((folder / usage_name).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    cache = 0
    try:
        for line in (folder / "memory.stat").read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - usage + cache)
