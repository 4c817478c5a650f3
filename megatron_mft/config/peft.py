"""Adapters: LoRA / QLoRA on megatron's parallel linear layers. Owned by megatron_mft.peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PEFT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "qlora"] = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(PEFT_TARGETS))
    #: rsLoRA: scale by alpha / sqrt(rank) instead of alpha / rank.
    rslora: bool = False

    def validate(self) -> list[str]:
        p = []
        if self.method != "none":
            if self.rank < 1:
                p.append("peft.rank: must be >= 1")
            if not 0.0 <= self.dropout < 1.0:
                p.append("peft.dropout: must be in [0, 1)")
            bad = [t for t in self.target_modules if t not in PEFT_TARGETS]
            if bad:
                p.append(f"peft.target_modules: unknown {bad}; choose from {list(PEFT_TARGETS)}")
            if not self.target_modules:
                p.append("peft.target_modules: empty")
        return p
