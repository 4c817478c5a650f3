"""Out of memory in a training run, as one message: where in the run it happened, torch's figures,
and the settings of this run that lower peak memory, most effective first.

Without this a CUDA OOM (the most common way a first GPU run ends) was an "internal error ... a
bug" with torch's text, and a failed host allocation the same with an ``alloc_cpu.cpp`` line.
"""

from __future__ import annotations

from megatron_mft.config import RunConfig
from megatron_mft.errors import UserError, out_of_memory_text


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
    return UserError(out_of_memory_text(error, where, memory_hints(run),
                                        'docs/operations.md, "Out of memory"; settings of this run, most effective first'))
