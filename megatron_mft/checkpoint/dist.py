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
from typing import Any, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker

LATEST = "latest"


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


def model_sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


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


def save_checkpoint(root: str | Path, step: int, chunks: list, optimizer=None, *, common: dict,
                    run_info: dict) -> Path:
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
    sharded = model_sharded_state_dict(chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded)
    sharded["common"] = common
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=1, default=str))
        os.replace(tmp, final)
        pointer_tmp = root / (LATEST + ".tmp")
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
    _barrier()
    return final


def load_checkpoint(path: str | Path, chunks: list, optimizer=None, *, strict_rng: bool = False) -> dict:
    """Load into ``chunks`` (any TP/PP layout) and ``optimizer``; return the saved common state."""
    path = Path(path)
    template = model_sharded_state_dict(chunks)
    if optimizer is not None:
        template["optimizer"] = optimizer.sharded_state_dict(template, is_loading=True)
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        chunk.load_state_dict(state[key], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        _restore_rng(torch.load(rng_file, weights_only=False))
    return state.get("common", {})


def load_model_weights(path: str | Path, chunks: list) -> None:
    """Weights only (fine-tuning start from a converted or earlier checkpoint)."""
    template = model_sharded_state_dict(chunks)
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=False)


def read_run_info(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "run.json").read_text())
