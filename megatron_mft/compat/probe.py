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


def available_memory() -> int | None:
    """Bytes of host memory a new allocation can get without swapping (the kernel's MemAvailable),
    or None where /proc/meminfo cannot be read (not Linux): callers then skip their check."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None
