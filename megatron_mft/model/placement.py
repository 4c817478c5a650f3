"""Every tensor a model holds must live on the training device.

megatron puts its weights on ``torch.cuda.current_device()`` (``use_cpu_initialization=False``)
and moves nothing afterwards, so a module of ours that allocates without a device leaves a
tensor on the host, and the first kernel that mixes it with device tensors fails deep inside the
step. The recipe calls :func:`check_placement` at the end of setup to fail early with the name.
"""

from __future__ import annotations

from typing import Iterator

import torch


def model_tensors(chunks: list) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter, buffer and plain tensor attribute (e.g. RoPE's
    ``inv_freq``) of every module; objects that hold tensors outside torch's bookkeeping (NF4
    weights) expose them through a ``named_tensors()`` method."""
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        for mname, module in chunk.named_modules():
            where = f"{prefix}{mname + '.' if mname else ''}"
            for name, t in [*module._parameters.items(), *module._buffers.items(), *vars(module).items()]:
                if torch.is_tensor(t):
                    yield where + name, t
                elif callable(getattr(t, "named_tensors", None)):
                    for sub, st in t.named_tensors():
                        yield f"{where}{name}.{sub}", st


def misplaced_tensors(chunks: list, device: torch.device) -> list[tuple[str, torch.device]]:
    """(name, device) of every model tensor that is not on ``device`` (each tensor once)."""
    device = torch.device(device)
    seen, out = set(), []
    for name, t in model_tensors(chunks):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            out.append((name, t.device))
    return out


def check_placement(chunks: list, device: torch.device) -> None:
    """Raise naming the first misplaced tensors (and how many there are) unless all are on ``device``."""
    bad = misplaced_tensors(chunks, device)
    if bad:
        listed = ", ".join(f"{n} on {d}" for n, d in bad[:5])
        raise RuntimeError(f"model tensors are not on the training device {device}: {listed}"
                           f"{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''}")
