"""Routed experts' LoRA adapters as a peft adapter for transformers' fused MoE experts.

transformers 5 keeps a Mixtral / Qwen2-MoE / Qwen3-MoE layer's routed experts as two 3-D
parameters of one module, ``model.layers.N.mlp.experts``: ``gate_up_proj`` [E, 2f, h] (rows
[gate; up], as megatron's fc1) and ``down_proj`` [E, h, f]. peft (0.21) adapts such parameters
with ``target_parameters`` (its ``ParamWrapper``): for a parameter of E experts it holds
``lora_A.weight`` [E*r, in] (expert e's A is rows e*r..(e+1)*r) and ``lora_B.weight`` [out, r*E]
(expert e's B is columns e, e+E, ..., i.e. ``B_w.reshape(out, r, E)[..., e]``), and its delta for
expert e is ``scaling * B_e @ A_e``, exactly megatron's per-expert adapter. Both parameters of one
module are wrapped in the module's parameter order, the later one outside, so the inner
wrapper's tensors sit one ``base_layer.`` deeper. peft's ParamWrapper takes no dropout.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

#: megatron's per-expert adapter path (canonical, global expert index)
_EXPERT_PATH = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(linear_fc1|linear_fc2)$")
#: megatron slot -> transformers' fused parameter, in the experts module's parameter order
FUSED_PARAMETERS = (("linear_fc1", "gate_up_proj"), ("linear_fc2", "down_proj"))
#: transformers' module holding the fused experts (all three MoE families)
EXPERTS_MODULE = "model.layers.{}.mlp.experts"


def is_expert_adapter(path: str) -> bool:
    return _EXPERT_PATH.match(path) is not None


class FusedExpertAdapters:
    """Collects per-expert (A, B) pairs and writes them in peft's fused layout."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.pairs: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)

    def add(self, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
        layer, expert, slot = _EXPERT_PATH.match(path).groups()
        self.pairs[(int(layer), slot)][int(expert)] = (a, b)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def target_parameters(self) -> list[str]:
        slots = {slot for _, slot in self.pairs}
        return [f"mlp.experts.{param}" for slot, param in FUSED_PARAMETERS if slot in slots]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """{peft state-dict key: tensor} for every (layer, fused parameter)."""
        slots = [slot for slot, _ in FUSED_PARAMETERS if any(s == slot for _, s in self.pairs)]
        out = {}
        for (layer, slot), experts in sorted(self.pairs.items()):
            missing = sorted(set(range(self.num_experts)) - set(experts))
            if missing:
                raise ValueError(f"layer {layer} {slot}: adapters of experts {missing} missing from the checkpoint")
            a = torch.cat([experts[e][0] for e in range(self.num_experts)], dim=0)  # [E*r, in]
            b = torch.stack([experts[e][1] for e in range(self.num_experts)], dim=-1)  # [out, r, E]
            b = b.reshape(b.shape[0], -1)  # column k*E + e holds B_e[:, k]
            depth = len(slots) - 1 - slots.index(slot)  # wrappers around this parameter's
            module = EXPERTS_MODULE.format(layer) + ".base_layer" * depth
            out[f"{prefix}{module}.lora_A.weight"] = a.contiguous()
            out[f"{prefix}{module}.lora_B.weight"] = b.contiguous()
        return out
