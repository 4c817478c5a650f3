"""Reference log-probabilities for DPO: where log pi_ref(y|x) of every response comes from.

- LoRA / QLoRA (``AdapterReference``): the model being trained with its adapters switched off
  (``peft.layers.adapters_disabled``) is exactly the starting model, so a no-grad forward of the
  step's micro batches in the same step gives the reference: no second copy of the weights.
- Full fine-tuning, ``loss.preference.reference: frozen`` (``FrozenReference``): a second,
  no-grad copy of the starting weights in the policy's layout, run forward per micro batch.
- Full fine-tuning, ``precomputed`` (the default, ``PrecomputedReference``): the weights move,
  so a no-grad pre-pass over the whole training split with the starting weights runs once,
  before the first step, and stores one log-prob per response (by sample uid) in
  ``<data.path>/_reference_logps/<key>.npz``. The key ties it to the starting checkpoint (a
  fingerprint of its path and files) and to the data (the manifest); a resumed run reads it back, and a
  run whose checkpoint or data do not match the stored file computes a new one on a fresh start
  and refuses on a resume.

All set ``micro_batch["ref_logps"]``: float64 [b*s + 1], the sequence log-prob per sample slot
(sample id), which ``loss.preference.preference_loss`` reads.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state as ps

from megatron_mft.compat.fsops import replace_file_atomically
from megatron_mft.data.collate import host_tensor
from megatron_mft.errors import UsageError, UserError
from megatron_mft.loss.preference import sequence_logps
from megatron_mft.training.step import StepContext, _ce_only_loss_func, reduce_report_vector, run_schedule

REFERENCE_DIR = "_reference_logps"
#: micro batches per forward-only schedule call of the pre-pass (bounds its host memory)
_CHUNK = 32


def _reference_forward(chunks: list, micro_batches: list[dict], ctx: StepContext) -> list[torch.Tensor]:
    """Per micro batch, the slot log-probs of a no-grad forward (last pipeline stage; [] elsewhere)."""
    with torch.no_grad():
        reports = run_schedule(chunks, micro_batches, ctx, _ce_only_loss_func, forward_only=True)
    return [sequence_logps(r["token_ce"], r["batch"], ctx.num_tasks).detach().double() for r in reports]


class AdapterReference:
    """LoRA/QLoRA: the base model (adapters disabled) in the same step."""

    #: a no-grad forward per step (counted in the model FLOPs)
    per_step_forward = True

    def attach(self, chunks: list, micro_batches: list[dict], ctx: StepContext) -> None:
        from megatron_mft.peft.layers import adapters_disabled

        with adapters_disabled(chunks) as n:
            if not n:
                raise UsageError("train.stage dpo with peft: the model has no LoRA layer to disable")
            logps = _reference_forward(chunks, micro_batches, ctx)
        for mb, lp in zip(micro_batches, logps):
            mb["ref_logps"] = lp


def _starting_weights(run) -> str:
    source = run.model.hf_init or run.train.init_checkpoint
    if not source:
        raise UsageError("train.stage dpo with full fine-tuning takes its reference from the starting weights: "
                         "set train.init_checkpoint (e.g. the SFT run's checkpoint) or model.hf_init")
    return str(source)


class FrozenReference:
    """Full fine-tuning with ``loss.preference.reference: frozen``: a second copy of the starting
    weights, sharded as the policy (same TP/PP/VPP layout), without gradients, run forward on the
    step's micro batches. One model's memory more and a forward per step, against the stored
    pre-pass's one-off cost and file; nothing to store, so data.path may be read-only."""

    per_step_forward = True

    def __init__(self, chunks: list):
        self.chunks = chunks

    def attach(self, chunks: list, micro_batches: list[dict], ctx: StepContext) -> None:
        for mb, lp in zip(micro_batches, _reference_forward(self.chunks, micro_batches, ctx)):
            mb["ref_logps"] = lp

    @classmethod
    def build(cls, run, env, device, say=print) -> "FrozenReference":
        """Build and load the copy without moving any random state the run uses afterwards (its
        initialisation draws from the same generators as the policy's), so a frozen-reference run
        takes the same steps as a precomputed-reference one."""
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        from megatron_mft.model import build_model_chunks, check_placement
        from megatron_mft.training.recipe import load_starting_weights

        source = _starting_weights(run)
        tracker = get_cuda_rng_tracker()
        cpu_state, tracker_states = torch.get_rng_state(), tracker.get_states()
        cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        try:
            chunks = build_model_chunks(run.model, run.parallel, env)
        finally:
            torch.set_rng_state(cpu_state)
            tracker.set_states(tracker_states)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state)
        load_starting_weights(run, chunks)
        for c in chunks:
            c.requires_grad_(False)
            c.eval()
        check_placement(chunks, device)
        say(f"dpo reference: a frozen copy of the starting weights {source} (same layout, no gradients)")
        return cls(chunks)


#: content samples per file of the fingerprint, and their size: 17 x 64 KiB spread over each file
_SAMPLES, _SAMPLE_BYTES = 17, 1 << 16


def _spread_samples(fh, size: int):
    """17 x 64 KiB spread evenly over the file, its ends included (the whole file when smaller)."""
    if size <= _SAMPLES * _SAMPLE_BYTES:
        yield fh.read()
        return
    span = size - _SAMPLE_BYTES
    for i in range(_SAMPLES):
        fh.seek(i * span // (_SAMPLES - 1))
        yield fh.read(_SAMPLE_BYTES)


def _ends_only(fh, size: int):
    """The first and last 64 KiB: the key of versions before the spread samples."""
    yield fh.read(1 << 16)
    if size > 1 << 16:
        fh.seek(max(size - (1 << 16), 1 << 16))
        yield fh.read()


def checkpoint_fingerprint(path: str | Path, samples=_spread_samples) -> str:
    """Identity of a checkpoint folder's (or file's) content: every file's relative name, size and
    17 samples of 64 KiB spread evenly over the whole file. About 1 MiB read per file whatever its
    size; it changes when the weights differ anywhere a sample reads (a LoRA-merged export changes
    every layer, not only the embeddings at the ends). Not the path or file times: a checkpoint
    copied to node-local disk at each requeue, or a moved run, keeps its key (a resume must find
    its reference again). ``samples=_ends_only``: the earlier versions' key, only to find a
    reference they stored."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise UsageError(f"{path}: no checkpoint files to take the DPO reference from")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for block in samples(fh, size):
                h.update(block)
    return h.hexdigest()[:20]


def data_digest(manifest: dict) -> str:
    keep = {k: v for k, v in manifest.items() if k not in ("seconds",)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:20]


class PrecomputedReference:
    """Full fine-tuning: reference log-probs by sample uid, from the stored pre-pass."""

    per_step_forward = False

    def __init__(self, logps: np.ndarray, data):
        self.logps = logps
        self.data = data

    def attach(self, chunks: list, micro_batches: list[dict], ctx: StepContext) -> None:
        rows = self.data.train_micro_batch_rows(ctx.consumed_rows)
        if len(rows) != len(micro_batches):
            raise RuntimeError("precomputed reference: micro batches and their row ids disagree")
        for mb, ids in zip(micro_batches, rows):
            uids = [u for r in ids.tolist() for u in self.data.row_sample_uids(int(r))]
            ref = np.zeros(mb["tokens"].numel() + 1, dtype=np.float64)
            ref[:len(uids)] = self.logps[np.asarray(uids, dtype=np.int64)]
            mb["ref_logps"] = host_tensor(ref)  # pinned like the loader's tensors: an asynchronous copy

    @staticmethod
    def file_for(run, manifest: dict) -> tuple[Path, str]:
        source = _starting_weights(run)
        key = f"{checkpoint_fingerprint(source)}-{data_digest(manifest)}"
        return Path(run.data.path) / REFERENCE_DIR / f"{key}.npz", source

    @classmethod
    def setup(cls, chunks: list, data, ctx: StepContext, run, fresh: bool, say=print) -> "PrecomputedReference":
        """Load the stored reference of (starting checkpoint, data), or compute it now on a fresh
        start (the weights are then the starting weights); a resume without it is refused."""
        path, source = cls.file_for(run, data.manifest)
        if not fresh and not path.is_file():  # a run started before the key read content samples
            older = path.with_name(f"{checkpoint_fingerprint(source, _ends_only)}-{data_digest(data.manifest)}.npz")
            path = older if older.is_file() else path
        n_uids = int(data.manifest["splits"]["train"]["samples"]) + int(data.manifest["splits"]["val"]["samples"])
        if path.is_file():
            try:
                with np.load(path) as z:
                    logps = z["logps"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # e.g. truncated
                raise UserError(f"{path}: unreadable reference log-probs ({type(e).__name__}: {e}); "
                                f"delete it to recompute") from None
            if logps.shape != (n_uids,):
                raise UserError(f"{path}: holds {logps.shape[0]} log-probs, the data has {n_uids} responses; "
                                f"delete it to recompute")
            say(f"dpo reference: {path} (starting weights {source})")
            return cls(logps, data)
        if not fresh:
            raise UsageError(f"train.stage dpo: no reference log-probs for the starting weights {source} and this data "
                             f"({path} missing; its key covers the starting weights' file names, sizes and "
                             f"contents: changed weights have another); a resumed run cannot "
                             f"recompute them (its weights have moved). "
                             f"Restore that file, or start a new run")
        logps = cls.compute(chunks, data, ctx, n_uids)
        failure = ""
        if torch.distributed.get_rank() == 0:
            try:
                replace_file_atomically(str(path), lambda tmp: np.savez(tmp, logps=logps,
                                                                        source=np.asarray(str(source))))
            except OSError as e:
                failure = str(e.strerror or e)
        # every rank learns the outcome: a failure on rank 0 alone would leave the others in the
        # first collective of training
        failed = torch.tensor([1.0 if failure else 0.0], device=ctx.device)
        torch.distributed.all_reduce(failed)
        if failed.item():
            raise UserError(f"{path}: cannot store the reference log-probs ({failure or 'failed on rank 0'}); "
                            f"data.path must be writable for train.stage=dpo with full fine-tuning")
        say(f"dpo reference: computed with the starting weights {source} over {data.rows_per_epoch} rows -> {path}")
        return cls(logps, data)

    @staticmethod
    def compute(chunks: list, data, ctx: StepContext, n_uids: int) -> np.ndarray:
        """No-grad forward over every training row (strided over DP), gathered to every rank."""
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        mbs = data.micro_batch_size
        mine = np.arange(dp_rank, data.rows_per_epoch, dp)
        n_mb = -(-(-(-data.rows_per_epoch // dp)) // mbs)  # the same on every rank
        groups = [mine[j * mbs:(j + 1) * mbs] for j in range(n_mb)]
        dense = torch.zeros(n_uids, dtype=torch.float64, device=ctx.device)
        for k in range(0, n_mb, _CHUNK):
            part = groups[k:k + _CHUNK]
            mbs_ = [data.train_rows_micro_batch(ids) for ids in part]
            for ids, lp in zip(part, _reference_forward(chunks, mbs_, ctx)):
                uids = [u for r in ids.tolist() for u in data.row_sample_uids(int(r))]
                dense[torch.as_tensor(uids, dtype=torch.int64, device=ctx.device)] = lp[:len(uids)].to(dense)
        return reduce_report_vector(dense).cpu().numpy()


def build_reference(recipe, fresh: bool):
    """The dpo reference source of a run (None for sft / orpo)."""
    run = recipe.run_cfg
    if run.train.stage != "dpo":
        return None
    say = (lambda m: print(m, flush=True)) if torch.distributed.get_rank() == 0 else (lambda m: None)
    if run.peft.method != "none":
        return AdapterReference()
    if run.loss.preference.reference == "frozen":
        return FrozenReference.build(run, recipe.env, recipe.device, say=say)
    return PrecomputedReference.setup(recipe.chunks, recipe.data, recipe.ctx, run, fresh, say=say)
