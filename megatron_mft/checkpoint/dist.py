"""megatron-core dist_checkpointing save/load with a crash-safe ``latest`` pointer.

Layout of ``<output_dir>/checkpoints``::

    step_000100/            a complete megatron dist checkpoint (model, optimizer, common state)
    step_000100/rng/rank_0003.pt   per-rank RNG states (restored when the layout is unchanged)
    step_000100/run.json    config, step, consumed rows, task names: the checkpoint describes itself
    latest                  text file naming the last complete step directory

A save never removes the last good checkpoint before its replacement is durable: it writes into
``step_N.tmp``, fsyncs every file and the folders, then publishes. A new step is a rename; a
step that already exists (a re-run of a finished job, a stop signal at a save step) is swapped
with the new copy in one atomic ``renameat2(RENAME_EXCHANGE)`` where the file system has it,
else moved aside to ``step_N.old`` first (``latest`` readers fall back to it, and the next save
puts it back). ``latest`` is replaced atomically afterwards, and only then is the old copy
deleted. A crash anywhere therefore leaves ``latest`` on a complete checkpoint, plus a stale
``*.tmp`` that the next save removes. A failed save (e.g. no space left on device) removes its
``step_N.tmp`` and says which path filled up.

Resuming is strict (:func:`resume_checkpoint`): checkpoints without a usable ``latest`` stop the
run with the steps found and the ``train.resume_from=`` to pick one, never a silent restart;
:func:`checkpoint_problems` checks a step folder's files against its metadata, so a truncated
shard is named instead of surfacing as a bare ``EOFError``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_mft.checkpoint.optimizer_state import is_chained_legacy, load_optimizer_state, optimizer_sharded_state
from megatron_mft.compat.fsops import exchange_paths, fsync_path, fsync_tree, replace_file_atomically
from megatron_mft.errors import UserError
from megatron_mft.launch.agree import every_rank
from megatron_mft.launch.signals import shield_checkpoint_helper

LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked (damaged, missing, refused); exit 1."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def step_dirs(root: str | Path) -> list[Path]:
    """Published step folders under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def _complete(path: Path) -> bool:
    return (path / "run.json").is_file()


def _read_pointer(root: Path) -> tuple[Optional[Path], Optional[str]]:
    """(checkpoint named by ``latest``, None) or (None, what is wrong with ``latest``)."""
    pointer = root / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot be read ({type(e).__name__}: {e})"
    if not STEP_DIR.fullmatch(name):
        return None, (f"names {name!r}, which is not a step folder inside {root}" if name else "is empty")
    path = root / name
    if _complete(path):
        return path, None
    backup = root / (name + ".old")
    if _complete(backup):  # a re-save was interrupted while the old copy was moved aside
        return backup, None
    return None, f"names {name}, which is missing or incomplete (no run.json)"


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The checkpoint ``root/latest`` names, or None (no pointer, or one that is not usable)."""
    root = Path(root)
    if not (root / LATEST).exists():
        return None
    return _read_pointer(root)[0]


def _steps_line(root: Path) -> str:
    steps = step_dirs(root)
    if not steps:
        return "no step folders"
    return "steps found: " + ", ".join(p.name + ("" if _complete(p) else " (incomplete)") for p in steps)


def resume_checkpoint(root: str | Path, resume_from: Optional[str] = None) -> Optional[Path]:
    """The checkpoint a run in this checkpoints folder continues from; None = a fresh start.

    ``resume_from``: None (the step ``latest`` names), a step number (``step_N`` of ``root``),
    or the path of a step folder (another run's, to continue it in a new output_dir). Checkpoints
    that exist but cannot be resumed stop the run: it never starts over them from step 0."""
    root = Path(root)
    if resume_from is not None and str(resume_from).strip() != "":
        return _explicit_checkpoint(root, str(resume_from).strip())
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        if not step_dirs(root):
            return None
        problem = "there is no `latest` file"
    else:
        found, problem = _read_pointer(root)
        if found is not None:
            return found
        problem = f"`latest` {problem}"
    complete = [p for p in step_dirs(root) if _complete(p)]
    pick = (f"pick one with train.resume_from=STEP (e.g. train.resume_from={_step_of(complete[-1])})"
            if complete else "no step is complete")
    raise CheckpointError(
        f"cannot tell which checkpoint to resume in {root}: {problem}; {_steps_line(root)}. "
        f"Nothing was changed: {pick}, or use a new output_dir to start afresh.")


def _step_of(path: Path) -> int:
    m = STEP_DIR.fullmatch(path.name[:-4] if path.name.endswith(".old") else path.name)
    return int(m.group(1)) if m else -1


def _explicit_checkpoint(root: Path, value: str) -> Path:
    if value.isdigit():
        path = step_dir(root, int(value))
        if _complete(path):
            return path
        raise CheckpointError(f"train.resume_from={value}: {path} is not a complete checkpoint; "
                              f"{_steps_line(root)} in {root}", exit_code=2)
    path = Path(value)
    if _complete(path):
        return path
    raise CheckpointError(f"train.resume_from={value}: not a complete checkpoint step folder (no run.json); "
                          f"give a step number of {root} ({_steps_line(root)}) or the path of a step_N folder",
                          exit_code=2)


def checkpoint_problems(path: str | Path) -> list[str]:
    """What is damaged in the checkpoint folder ``path`` (empty when every file is whole): a
    missing or unreadable run.json / metadata, and shard files shorter than their metadata says."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    problems = []
    try:
        json.loads((path / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass  # conversion outputs and init checkpoints have none
    except (OSError, ValueError) as e:
        problems.append(f"{path / 'run.json'}: unreadable ({e})")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read the metadata means damage
        return problems + [f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e})"]
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size < size:
            problems.append(f"{f}: truncated ({f.stat().st_size} of at least {size} bytes)")
    for f in [path / "common.pt"] + sorted((path / "rng").glob("*.pt")):
        if f.is_file():
            try:
                torch.load(f, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{f}: unreadable ({type(e).__name__}: {e})")
    return problems


def intact_before(path: Path) -> Optional[Path]:
    """The newest complete, undamaged step folder beside ``path`` with a smaller step."""
    step = _step_of(path)
    for p in reversed(step_dirs(path.parent)):
        if _step_of(p) < step and _complete(p) and not checkpoint_problems(p):
            return p
    return None


def damaged_checkpoint_error(path: Path, problems: list[str]) -> CheckpointError:
    earlier = intact_before(path)
    way = (f"the newest intact earlier checkpoint is {earlier}: resume from it with "
           f"train.resume_from={_step_of(earlier)}" if earlier else "no earlier intact checkpoint was found")
    return CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}. {way}.")


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


def _fault_injection(step: int) -> None:
    """The project's fault hook, for tests that break a save at a known point:
    MFT_FAULT_SLEEP_IN_SAVE="STEP:SECONDS" pauses the save of that step after the shards are
    written and before the checkpoint is published (a window to SIGKILL the run in);
    MFT_FAULT_ENOSPC_IN_SAVE="STEP" makes that save fail as a full disk would."""
    spec = os.environ.get("MFT_FAULT_SLEEP_IN_SAVE")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            import time

            time.sleep(float(seconds))
    if os.environ.get("MFT_FAULT_ENOSPC_IN_SAVE", "") == str(step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(MFT_FAULT_ENOSPC_IN_SAVE)")


def _fsync_own_files(tmp: Path) -> None:
    """Each rank makes the shards it wrote durable (on a shared file system another client's
    fsync would not flush this one's cache): dcp names them ``__<rank>_<i>.distcp``."""
    rank = _rank()
    for f in list(tmp.glob(f"__{rank}_*.distcp")) + [tmp / "rng" / f"rank_{rank:05d}.pt"]:
        if f.is_file():
            fsync_path(f)


#: what a save writes into a step folder (dcp shards and metadata, megatron's common state, RNG
#: states, run.json); anything else in a step folder is not the trainer's
_SAVE_WRITES = re.compile(r"^(__\d+_\d+\.distcp|\.metadata|metadata\.json|common\.pt|run\.json|rng)$")


def _foreign(folder: Path) -> list[str]:
    """Names in a step folder (or its leftover copy) that a save did not write."""
    try:
        return sorted(e.name for e in folder.iterdir() if not _SAVE_WRITES.match(e.name))
    except OSError:
        return []


def _adopt_foreign(old: Path, new: Path) -> list[str]:
    """Move what a save did not write (a user's files, e.g. an HF export placed in the step folder)
    from the replaced copy ``old`` into its successor ``new``, before ``old`` is deleted: a re-save
    replaces the checkpoint, not the user's files beside it. An entry that cannot move (its name
    taken in ``new``, or the file system refuses) stays in ``old``. Returns the names moved."""
    moved = []
    for name in _foreign(old) if old.is_dir() and new.is_dir() else []:
        if (new / name).exists() or (new / name).is_symlink():
            continue
        try:
            os.replace(old / name, new / name)
        except OSError:
            continue
        moved.append(name)
    return moved


def _remove_leftover(leftover: Path, final: Path) -> None:
    """Delete a replaced copy, or an interrupted save's or re-save's leftover folder. A user's files
    in it go to ``final`` first (:func:`_adopt_foreign`); where one cannot, the folder stays and a
    warning names it. Never raises: the save it follows is already durable."""
    if not leftover.is_dir() or leftover.is_symlink():
        return
    kept = _adopt_foreign(leftover, final)
    if kept:
        print(f"note: kept {', '.join(kept)} (not written by a save) in {final}", flush=True)
    left = _foreign(leftover)
    if left:
        print(f"warning: {leftover} holds {', '.join(left)}, which a save did not write; it is left in place "
              f"(move those out, then delete it)", flush=True)
        return
    shutil.rmtree(leftover, ignore_errors=True)
    if leftover.exists():
        print(f"warning: could not remove the replaced copy {leftover}; delete it by hand", flush=True)


def _publish(tmp: Path, final: Path) -> Optional[Path]:
    """Move the durable ``tmp`` to ``final``; return the replaced old copy (to delete once
    ``latest`` is updated), or None. The old copy stays reachable at every instant."""
    if not final.exists():
        os.replace(tmp, final)
        return None
    if exchange_paths(tmp, final):  # tmp now holds the old copy
        return tmp
    backup = final.with_name(final.name + ".old")
    _remove_leftover(backup, final)  # an earlier crash's; a user's files in it go to final first
    if backup.exists():
        raise CheckpointError(f"cannot re-save {final}: {backup}, left by an interrupted re-save, holds "
                              f"{', '.join(_foreign(backup))}, which a save did not write and which also exist "
                              f"in {final}; move them out of {backup} and rerun")
    os.replace(final, backup)  # latest readers fall back to step_N.old in this window
    os.replace(tmp, final)
    return backup


def _write_latest(root: Path, final: Path) -> None:
    replace_file_atomically(str(root / LATEST), lambda tmp: Path(tmp).write_text(final.name + "\n", encoding="utf-8"))


def _prepare_root(root: Path) -> None:
    """Rank 0, before a save: remove broken saves, put back a step moved aside by an
    interrupted re-save (so ``latest`` names a real folder again). A user's files in what is
    removed are kept (:func:`_remove_leftover`)."""
    root.mkdir(parents=True, exist_ok=True)
    for backup in root.glob("step_*.old"):
        if not backup.is_dir():
            continue
        final = backup.with_name(backup.name[:-4])
        if not _complete(final) and _complete(backup):
            if final.is_dir():
                _adopt_foreign(final, backup)
                if _foreign(final):  # a user's file that could not move: keep the partial copy too
                    print(f"warning: {final} (an incomplete save) holds {', '.join(_foreign(final))}; "
                          f"it is left in place", flush=True)
                    continue
            shutil.rmtree(final, ignore_errors=True)
            os.replace(backup, final)
        else:
            _remove_leftover(backup, final)
    for stale in root.glob("step_*.tmp"):
        if stale.is_dir():
            _remove_leftover(stale, stale.with_name(stale.name[:-4]))


def _prepare_on_rank0(root: Path, tmp: Path, final: Path) -> None:
    """Rank 0 prepares ``root`` and creates ``tmp``; every rank learns whether that worked (the
    others used to wait for rank 0 in a barrier for ever when its mkdir failed) and raises rank
    0's message."""
    problem = ""
    if _rank() == 0:
        try:
            _prepare_root(root)
            if tmp.exists():  # a leftover kept for a user's files in it (_remove_leftover)
                problem = (f"{tmp} is left from an interrupted save and holds {', '.join(_foreign(tmp)) or 'files'}, "
                           f"which a save did not write; move those out of it, delete it, and rerun")
            else:
                tmp.mkdir()
        except Exception as e:  # any failure: the other ranks must hear of it, not wait for ever
            problem = f"{type(e).__name__}: {e}"
    if every_rank(not problem):
        return
    if torch.distributed.is_initialized():  # only the failure path pays for the message
        box = [problem]
        torch.distributed.broadcast_object_list(box, src=0)
        problem = box[0]
    raise CheckpointError(f"cannot save checkpoint {final}: preparing {tmp} on rank 0 failed ({problem}); "
                          f"nothing was written. Make {root} a writable folder (or point output_dir elsewhere) and rerun")


_INTERRUPTS = (KeyboardInterrupt, SystemExit)


def _no_space(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def save_checkpoint(root: str | Path, step: int, chunks: list, optimizer=None, *, common: dict,
                    run_info: dict, trainable_only: bool = False) -> Path:
    """Save model (+ optimizer) sharded state and ``common`` (plain picklable state) for ``step``."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    _prepare_on_rank0(root, tmp, final)
    error = None
    try:
        sharded = model_sharded_state_dict(chunks, trainable_only)
        if optimizer is not None:
            sharded["optimizer"] = optimizer_sharded_state(optimizer, model_sharded_state_dict(chunks))
        sharded["common"] = common
        shield_checkpoint_helper()  # megatron's writer helper, ours: gone with this process (a no-op once it exists)
        dist_checkpointing.save(sharded, str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
        _fsync_own_files(tmp)
        _fault_injection(step)
    except _INTERRUPTS:
        raise
    except BaseException as e:  # noqa: BLE001 - every rank must learn that the save failed (dcp's
        error = e  # CheckpointException derives from BaseException)
    if not every_rank(error is None):
        full = error is not None and (_no_space(error) or _nearly_full(tmp))  # before freeing the partial
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        _raise_save_error(root, final, tmp, error, full)
    if _rank() == 0:
        old = None
        try:
            (tmp / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=1, default=str))
            fsync_tree(tmp)
            old = _publish(tmp, final)  # from here tmp (exchanged) may hold the old copy: never rmtree it
            _write_latest(root, final)
        except (OSError, CheckpointError) as e:
            error = e
            full = isinstance(e, OSError) and (_no_space(e) or _nearly_full(tmp))
            if old is None and tmp.exists():  # not published (publishing moves tmp): our partial save
                shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:  # the new copy is durable and published: the old one goes, a user's files stay
            _remove_leftover(old, final)
    if not every_rank(error is None):
        _raise_save_error(root, final, tmp, error, error is not None and full)
    return final


def _nearly_full(path: Path) -> bool:
    """Less than 1 MiB left where ``path`` lives: torch's zip writer reports a full disk as
    "unexpected pos", without ENOSPC."""
    try:
        st = os.statvfs(path if path.exists() else path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _raise_save_error(root: Path, final: Path, tmp: Path, error: Optional[BaseException], full: bool) -> None:
    kept = latest_checkpoint(root)
    kept_line = f"`latest` still names {kept}" if kept else "there is no earlier checkpoint"
    if error is None:  # another rank failed; it reports the cause
        raise CheckpointError(f"saving {final} failed on another rank; the partial {tmp} was removed; {kept_line}")
    if full:
        raise CheckpointError(f"no space left on device while saving checkpoint {final} (writing {tmp}); "
                              f"the partial {tmp} was removed and {kept_line}. Free space on that file system "
                              f"(or point output_dir elsewhere) and rerun: it resumes from there.") from error
    raise error


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
        if path.is_dir() and is_chained_legacy(_saved_optimizer_common(path)):
            raise CheckpointError(f"checkpoint {path} holds its optimizer state in megatron's chained-optimizer "
                                  f"format (a MoE run at EP > 1 saved before the layout-free format), which this "
                                  f"version does not read: start from its weights with train.init_checkpoint="
                                  f"{path} (the optimizer state and the step start afresh)")
        _materialize_optimizer_state(optimizer)
        template["optimizer"] = optimizer_sharded_state(optimizer, model_sharded_state_dict(chunks), is_loading=True)
    try:
        state = _load_sharded(template, path)
        rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    except _INTERRUPTS:
        raise
    except BaseException as e:  # noqa: BLE001 - damage surfaces as EOFError, pickle or dcp's CheckpointException
        problems = checkpoint_problems(path)
        if problems:
            raise damaged_checkpoint_error(path, problems) from e
        raise
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        _load_into(chunk, state[key], partial=trainable_only)
    if optimizer is not None:
        load_optimizer_state(optimizer, state["optimizer"])
    if rng is not None:
        _restore_rng(rng)
    return state.get("common", {})


def _saved_optimizer_common(path: Path) -> object:
    """The optimizer's non-tensor part of a saved checkpoint (its format marker), None if unreadable."""
    try:
        return dist_checkpointing.load_common_state_dict(str(path)).get("optimizer")
    except Exception:  # noqa: BLE001 - a damaged checkpoint is reported by the load itself
        return None


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

