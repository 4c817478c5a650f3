"""megatron-core dist_checkpointing save/load with a crash-safe ``latest`` pointer.

Layout of ``<output_dir>/checkpoints``::

    step_000100/            a complete megatron dist checkpoint (model, optimizer, common state)
    step_000100/rng/rank_0003.pt   per-rank RNG states (restored when the layout is unchanged)
    step_000100/run.json    config, step, consumed rows, task names: the checkpoint describes itself
    latest                  text file naming the last complete step directory

A save writes into ``step_N.tmp`` and renames it after every rank finished; ``latest`` is
replaced atomically afterwards. A crash mid-save therefore leaves ``latest`` on the previous
complete checkpoint, and a stale ``*.tmp`` that the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker

LATEST = "latest"
#: Distributed-optimizer state in a canonical per-parameter layout, so a checkpoint saved with
#: one TP/PP/DP layout resumes in another (megatron's 'fully_reshardable').
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The last complete checkpoint under ``root`` (a checkpoints dir), or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "run.json").is_file() else None


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _trainable_only(chunk, sd: dict) -> dict:
    """Keep only entries of trainable parameters (adapters): PEFT checkpoints hold just those,
    and name their frozen base in run.json."""
    names = {n for n, p in chunk.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k in names}


def model_sharded_state_dict(chunks: list, trainable_only: bool = False) -> dict:
    def one(c):
        sd = c.sharded_state_dict()
        return _trainable_only(c, sd) if trainable_only else sd

    if len(chunks) == 1:
        return {"model": one(chunks[0])}
    return {f"model{i}": one(c) for i, c in enumerate(chunks)}


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
        "layout": _layout(),
    }


def _layout() -> tuple:
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_data_parallel_world_size())


def _restore_rng(state: dict) -> bool:
    if tuple(state.get("layout", ())) != _layout():
        return False
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    return True


def _fault_injection_pause(step: int) -> None:
    """Tests kill a run mid-save: MFT_FAULT_SLEEP_IN_SAVE="STEP:SECONDS" pauses the save of that
    step after the shards are written and before the checkpoint is published."""
    spec = os.environ.get("MFT_FAULT_SLEEP_IN_SAVE")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            import time

            time.sleep(float(seconds))


def save_checkpoint(root: str | Path, step: int, chunks: list, optimizer=None, *, common: dict,
                    run_info: dict, trainable_only: bool = False) -> Path:
    """Save model (+ optimizer) sharded state and ``common`` (plain picklable state) for ``step``."""
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp.mkdir()
    _barrier()
    sharded = model_sharded_state_dict(chunks, trainable_only)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sharded_state_dict(chunks),
                                                            metadata=OPTIMIZER_METADATA)
    sharded["common"] = common
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _fault_injection_pause(step)
    _barrier()
    if _rank() == 0:
        (tmp / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=1, default=str))
        os.replace(tmp, final)
        pointer_tmp = root / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
    _barrier()
    return final


def _materialize_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state lazily at the first step, but megatron's sharded optimizer
    state dict (the load template) needs it to exist. Take one step with zero gradients and
    lr = 0 (a no-op on the parameters); the load then overwrites the state."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if inner is None or len(inner.state) > 0:
            continue
        saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd
            for p in g["params"]:
                p.grad = None


def _load_sharded(template: dict, path: str | Path) -> dict:
    """``dist_checkpointing.load`` of ``template``, except that module extra state
    (``..._extra_state``, e.g. Transformer Engine's FP8 metadata) absent from the checkpoint is
    skipped: checkpoints written by the local spec (CPU runs, ``convert hf-to-mcore``) have none,
    yet a TE-spec model asks for it. Entries the checkpoint has and the model does not ask for
    are not read, so the reverse direction (TE checkpoint, local model) needs nothing. Any other
    absent entry is an error naming it."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state, _, absent = dist_checkpointing.load(template, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    needed = sorted(k for k in absent if not k.endswith("_extra_state"))
    if needed:
        raise RuntimeError(f"checkpoint {path} does not hold {len(needed)} entries this model needs: "
                           f"{', '.join(needed[:8])}{' ...' if len(needed) > 8 else ''}")
    return state


def load_checkpoint(path: str | Path, chunks: list, optimizer=None, *, trainable_only: bool = False) -> dict:
    """Load into ``chunks`` (any TP/PP layout) and ``optimizer``; return the saved common state."""
    path = Path(path)
    template = model_sharded_state_dict(chunks, trainable_only)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(model_sharded_state_dict(chunks), is_loading=True,
                                                             metadata=OPTIMIZER_METADATA)
    state = _load_sharded(template, path)
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        _load_into(chunk, state[key], partial=trainable_only)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        _restore_rng(torch.load(rng_file, weights_only=False))
    return state.get("common", {})


def _load_into(chunk, state: dict, partial: bool) -> None:
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if unexpected or (missing and not partial):
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def load_model_weights(path: str | Path, chunks: list) -> None:
    """Base weights only (fine-tuning start from a converted or earlier checkpoint). Adapter
    parameters (trainable ones, when PEFT is on) may be absent from a base checkpoint. A model
    with NF4 bases (QLoRA) is read one decoder layer at a time, each targeted shard quantised
    on arrival (``peft.load_base_weights``): the generic load would need the whole model dense."""
    from megatron_mft.peft import iter_adapters, load_base_weights

    if any(m.quantized for _, m in iter_adapters(chunks)):
        load_base_weights(path, chunks)
        return
    template = model_sharded_state_dict(chunks)
    adapters = {n for c in chunks for n, _ in c.named_parameters() if ".lora_" in n}
    template = {k: {n: v for n, v in sd.items() if n not in adapters} for k, sd in template.items()}
    state = _load_sharded(template, path)
    for i, chunk in enumerate(chunks):
        _load_into(chunk, state["model" if len(chunks) == 1 else f"model{i}"], partial=bool(adapters))

