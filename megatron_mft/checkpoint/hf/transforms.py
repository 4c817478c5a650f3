"""Row layouts between Hugging Face tensors and megatron's fused tensors.

Every transform works on dim 0 (output rows) and keeps the trailing dims as they are, so the
same code moves a base weight ``[out, in]`` and a LoRA ``B`` ``[out, r]``. The megatron side is
always the *tensor-parallel size 1* layout, which is also the global layout of megatron's dist
checkpoints: a TP shard is a contiguous row block of it (qkv), or a row block of each half
(gated fc1, through megatron's swiglu sharded factory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mft.config import ArchSpec


class Transform:
    """HF tensors (in map order) <-> one megatron tensor."""

    def fuse(self, tensors: list[torch.Tensor], arch: ArchSpec) -> torch.Tensor:
        raise NotImplementedError

    def split(self, tensor: torch.Tensor, arch: ArchSpec) -> list[torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Copy(Transform):
    """One tensor, same layout."""

    def fuse(self, tensors, arch):
        (t,) = tensors
        return t

    def split(self, tensor, arch):
        return [tensor]


@dataclass(frozen=True)
class Vocab(Transform):
    """Embedding / output rows. Megatron pads the vocabulary to a multiple of TP; the padding rows
    are added (zeros) where a layout needs them and dropped on the way back."""

    def fuse(self, tensors, arch):
        (t,) = tensors
        return t

    def split(self, tensor, arch):
        return [tensor[: arch.vocab_size]]


@dataclass(frozen=True)
class GroupedQKV(Transform):
    """q, k, v -> megatron ``linear_qkv``: for each query group, that group's
    ``heads/groups`` query heads, then its key head, then its value head (rows of ``head_dim``)."""

    def _dims(self, arch: ArchSpec) -> tuple[int, int, int]:
        g, d = arch.num_query_groups, arch.head_dim
        return g, arch.num_attention_heads // g, d

    def fuse(self, tensors, arch):
        q, k, v = tensors
        g, per, d = self._dims(arch)
        rest = q.shape[1:]
        return torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)],
                         dim=1).reshape(g * (per + 2) * d, *rest)

    def split(self, tensor, arch):
        g, per, d = self._dims(arch)
        rest = tensor.shape[1:]
        q, k, v = tensor.reshape(g, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
        return [q.reshape(g * per * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)]


@dataclass(frozen=True)
class Gated(Transform):
    """gate, up -> megatron ``linear_fc1`` ``[gate; up]`` (SwiGLU takes silu of the first half)."""

    def fuse(self, tensors, arch):
        gate, up = tensors
        return torch.cat([gate, up], dim=0)

    def split(self, tensor, arch):
        return list(tensor.chunk(2, dim=0))


COPY, VOCAB, QKV, GATED = Copy(), Vocab(), GroupedQKV(), Gated()
