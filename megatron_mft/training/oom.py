"""Out of memory, as one message: where in the run it happened, torch's figures, and the settings
of this run that lower peak memory, most effective first.

Without this a CUDA OOM (the most common way a first GPU run ends) was an "internal error ... a
bug" with torch's text, and a failed host allocation the same with an ``alloc_cpu.cpp`` line.
"""

from __future__ import annotations

import torch

from megatron_mft.config import RunConfig
from megatron_mft.errors import UserError

#: torch's failed host allocation (a RuntimeError, not torch.OutOfMemoryError)
_HOST_OOM = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and _HOST_OOM in str(error))


def _torch_figures(error: BaseException) -> str:
    """torch's own sentences (what it tried to allocate, the device's capacity and use), without its
    pointer to the documentation and the C++ location of a host failure."""
    text = " ".join(str(error).split())
    text = text.split(" See documentation for Memory Management")[0]
    if _HOST_OOM in text:
        text = text[text.index(_HOST_OOM):]
    return text.rstrip(". ") + "."


def memory_hints(run: RunConfig) -> list[str]:
    """Settings of ``run`` that lower peak memory, most effective first, each with its value now."""
    m, p, t, d, peft = run.model, run.parallel, run.train, run.data, run.peft
    hints = []
    if peft.method == "none":
        hints.append("peft.method=lora or qlora (now none): no gradients or Adam state for the base weights")
    elif peft.method == "lora":
        hints.append("peft.method=qlora (now lora): the frozen base weights in 4 bits")
    if m.recompute != "full":
        better = "selective or full" if m.recompute == "none" else "full"
        hints.append(f"model.recompute={better} (now {m.recompute}): recompute activations in the backward pass")
    if t.micro_batch_size > 1:
        hints.append(f"train.micro_batch_size={t.micro_batch_size // 2} (now {t.micro_batch_size}); "
                     f"train.global_batch_size ({t.global_batch_size}) keeps the batch the same")
    if not p.distributed_optimizer:
        hints.append("parallel.distributed_optimizer=true (now false): Adam state split over data-parallel ranks")
    hints.append(f"parallel.tp / parallel.pp (now {p.tp} / {p.pp}): the weights spread over more GPUs")
    if t.stage == "dpo" and run.loss.preference.reference == "frozen" and peft.method == "none":
        hints.append("loss.preference.reference=precomputed (now frozen): no second copy of the model")
    hints.append(f"data.seq_length (now {d.seq_length}), or parallel.cp (now {p.cp}) to split long sequences")
    return hints


def out_of_memory_error(error: BaseException, run: RunConfig, where: str) -> UserError:
    """The UserError (exit 1) that replaces an out-of-memory ``error`` raised ``where`` ("step 12")."""
    device = "host" if _HOST_OOM in str(error) else "GPU"
    hints = "\n".join(f"  - {h}" for h in memory_hints(run))
    return UserError(f"out of {device} memory during {where}: {_torch_figures(error)}\n"
                     f"Settings of this run that lower peak memory (docs/operations.md, \"Out of memory\"):\n{hints}")
