"""Adapters: LoRA / QLoRA on megatron's parallel linear layers. Owned by megatron_mft.peft
(design and sharding rules: docs/peft.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: linear slots of a decoder layer that can carry an adapter (column: qkv, fc1; row: proj, fc2)
PEFT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class PeftConfig:
    #: none = full fine-tuning; lora = frozen base + low-rank adapters; qlora = the same with the
    #: targeted base weights stored as NF4 (4-bit, double-quantised), dequantised on the fly.
    method: Literal["none", "lora", "qlora"] = "none"
    #: adapter rank r: A is [r, in], B is [out, r].
    rank: int = 8
    #: the adapter output is scaled by alpha / r (alpha / sqrt(r) with rslora).
    alpha: float = 16.0
    #: dropout probability on the adapter input (training only).
    dropout: float = 0.0
    #: linear slots to adapt, any of PEFT_TARGETS.
    target_modules: list[str] = field(default_factory=lambda: list(PEFT_TARGETS))
    #: rsLoRA: scale by alpha / sqrt(rank) instead of alpha / rank.
    rslora: bool = False

    def warnings(self) -> list[str]:
        """Adapter settings in a full fine-tune: fine when a LoRA recipe is run with peft.method=none
        on purpose, a forgotten peft.method otherwise."""
        if self.method != "none":
            return []
        default = PeftConfig()
        changed = [name for name in ("rank", "alpha", "dropout", "target_modules", "rslora")
                   if getattr(self, name) != getattr(default, name)]
        return [f"peft.{', peft.'.join(changed)} set, but peft.method is none: full fine-tuning, no adapters "
                f"(set peft.method: lora or qlora for adapters)"] if changed else []

    def validate(self) -> list[str]:
        p = []
        if self.method != "none":
            if self.rank < 1:
                p.append("peft.rank: must be >= 1")
            if self.alpha <= 0:
                p.append("peft.alpha: must be > 0")
            if not 0.0 <= self.dropout < 1.0:
                p.append("peft.dropout: must be in [0, 1)")
            bad = [t for t in self.target_modules if t not in PEFT_TARGETS]
            if bad:
                p.append(f"peft.target_modules: unknown {bad}; choose from {list(PEFT_TARGETS)}")
            if not self.target_modules:
                p.append("peft.target_modules: empty")
            if len(set(self.target_modules)) != len(self.target_modules):
                p.append("peft.target_modules: duplicates")
        return p
