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

    def kernels_line(self) -> str:
        """One log line naming the kernels in force."""
        on = {
            "transformer-engine": self.te and self.cuda,
            "flash-attn varlen": self.flash_attn and self.cuda,
            "apex fused adam/rmsnorm": self.apex and self.cuda,
            "fused rope": self.cuda,
            "fused softmax": self.cuda,
        }
        active = [k for k, v in on.items() if v] or ["none (plain PyTorch: SDPA attention, torch Adam)"]
        return f"device={self.device_name} kernels: {', '.join(active)}"


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
        apex=cuda and _importable("apex"),
        device_name=name,
    )
