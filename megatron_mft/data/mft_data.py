"""The trainer-facing data object: global batches of micro-batch dicts for one DP rank.

Rows are what a global batch counts: packs in ``packed`` mode, samples in ``dynamic`` mode.
Every row is a contiguous range of samples in a split (see ``store``), so both modes and
both sources (offline indexed files, online in-memory) share the sampler and the collator.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_mft.config.data import DataConfig
from megatron_mft.data.collate import EMPTY_ROW, Row, collate, round_up, row_width
from megatron_mft.data.cp_shard import pad_row_for_cp
from megatron_mft.data.outdir import MANIFEST, OUTPUT_FORMAT
from megatron_mft.data.records import DataError
from megatron_mft.data.taskdir import DataDirError
from megatron_mft.data.sampler import EpochSampler, rank_micro_batches
from megatron_mft.data.store import MemorySplit, SampleStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Rows:
    """Row ``i`` = samples ``starts[i]:stops[i]`` of ``store``."""

    store: SampleStore
    starts: np.ndarray
    stops: np.ndarray

    @classmethod
    def of(cls, store: SampleStore, per_sample: bool, packs: tuple[int, int] | None = None,
           group: int = 1) -> "_Rows":
        """Rows of the packs, or (``per_sample``) of ``group`` consecutive samples (2: a pair)."""
        bounds = store.pack_bounds
        p0, p1 = packs if packs is not None else (0, len(bounds) - 1)
        if per_sample:
            starts = np.arange(bounds[p0], bounds[p1], group, dtype=np.int64)
            return cls(store, starts, starts + group)
        return cls(store, bounds[p0:p1].copy(), bounds[p0 + 1:p1 + 1].copy())

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        cum = np.concatenate([[0], np.cumsum(self.store.sample_lengths)])
        return cum[self.stops] - cum[self.starts]

    def read(self, row: int) -> Row:
        a, b = int(self.starts[row]), int(self.stops[row])
        tokens, mask = self.store.read(a, b)
        return Row(tokens, mask, self.store.sample_lengths[a:b], self.store.sample_tasks[a:b])


@dataclass
class _Source:
    manifest: dict
    train: SampleStore
    val: SampleStore


def _manifest_problems(m) -> list[str]:
    """What a readable manifest.json lacks for training (FORMAT.md section 3)."""
    if not isinstance(m, dict):
        return [f"must hold a JSON object, got {type(m).__name__}"]
    p = []
    if m.get("format") != OUTPUT_FORMAT:
        p.append(f"format {m.get('format')!r}, expected {OUTPUT_FORMAT!r}")
    if not isinstance(m.get("seq_length"), int):
        p.append("'seq_length' missing or not an integer")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not all(isinstance(tok.get(k), int) for k in ("vocab_size", "eos_id", "pad_id")):
        p.append("'tokenizer' missing or without integer vocab_size, eos_id, pad_id")
    tasks = m.get("tasks")
    names = []
    if isinstance(tasks, list) and tasks and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks):
        names = [t["name"] for t in tasks]
    else:
        p.append("'tasks' missing or not a list of {name, ...} objects")
    splits = m.get("splits")
    val = splits.get("val") if isinstance(splits, dict) else None
    packs = val.get("task_packs") if isinstance(val, dict) else None
    if not isinstance(packs, dict) or any(not (isinstance(packs.get(n), list) and len(packs[n]) == 2) for n in names):
        p.append("'splits.val.task_packs' missing or without a [first, end) pair per task")
    return p


def _open_offline(cfg: DataConfig) -> _Source:
    root = Path(cfg.path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise DataDirError(f"data.path {cfg.path}: no {MANIFEST} (run tools/preprocess/preprocess_mft.py, "
                           f"or set data.source=online for a raw task folder)")
    redo = "the preprocessed folder is damaged; run tools/preprocess/preprocess_mft.py again (--overwrite)"
    try:
        manifest = json.loads(mf.read_bytes())
    except (OSError, ValueError) as e:
        raise DataError([f"{mf}: not valid JSON ({e}); {redo}"]) from None
    problems = _manifest_problems(manifest)
    if problems:
        raise DataError([f"{mf}: " + "; ".join(problems) + f"; {redo}"])
    if manifest["seq_length"] > cfg.seq_length:
        raise DataDirError(
            f"data.seq_length {cfg.seq_length} < the preprocessed seq_length {manifest['seq_length']} of {cfg.path}"
        )
    from megatron_mft.data.indexed import IndexedSplit

    vocab, n_tasks = manifest["tokenizer"]["vocab_size"], len(manifest["tasks"])
    return _Source(manifest, IndexedSplit(root, "train", vocab, n_tasks), IndexedSplit(root, "val", vocab, n_tasks))


def _build_online(cfg: DataConfig, seed: int) -> _Source:
    from megatron_mft.data.encode import EncodeSpec, encode_tasks, task_warnings
    from megatron_mft.data.plan import plan_splits
    from megatron_mft.data.taskdir import discover_tasks
    from megatron_mft.data.template import load_template
    from megatron_mft.data.tokenizer import load_tokenizer

    tasks = discover_tasks(cfg.path, warn=lambda w: log.warning("data.path %s: %s", cfg.path, w))
    tok = load_tokenizer(cfg.tokenizer)
    template = load_template(cfg.template)
    pairs = cfg.mode == "preference"  # megatron_mft.data.preference: pairs kept together in one row
    spec = EncodeSpec(cfg.tokenizer, template, cfg.seq_length, "sft" if pairs else cfg.mode, cfg.overlong,
                      cfg.max_line_bytes)
    if pairs:
        from megatron_mft.data.preference import encode_pairs, plan_pair_splits as plan

        encoded = encode_pairs(tasks, spec, workers=max(cfg.num_workers, 1), skip_bad_samples=cfg.skip_bad_samples)
    else:
        plan = plan_splits
        # workers fork like torch DataLoader workers do; they only run the tokenizer (no torch, no CUDA)
        encoded = encode_tasks(tasks, spec, workers=max(cfg.num_workers, 1), skip_bad_samples=cfg.skip_bad_samples)
    for w in task_warnings(encoded):  # type: ignore[arg-type]
        log.warning("data.path %s: %s", cfg.path, w)
    packing = "none" if cfg.batching == "dynamic" else cfg.packing
    train, val = plan(encoded, seq_length=cfg.seq_length, packing=packing, val_ratio=cfg.val_ratio, seed=seed)  # type: ignore[arg-type]
    if not train.samples:
        raise DataError([f"data.path {cfg.path}: no usable training samples"])
    manifest = {
        "format": "megatron-mft/online",
        "mode": cfg.mode,
        "seq_length": cfg.seq_length,
        "packing": packing,
        "seed": seed,
        "val_ratio": cfg.val_ratio,
        "tokenizer": tok.identity() | {"marker_ids": encoded.marker_ids},
        "template": template.to_dict(),
        "tasks": [{"id": i, "name": t.files.name, "train_files": list(t.files.train),
                   "val_files": list(t.files.val), "val_source": t.files.val_source}
                  for i, t in enumerate(encoded.tasks)],
        "splits": {
            "train": {"sequences": len(train.packs), "samples": len(train.samples)},
            "val": {"sequences": len(val.packs), "samples": len(val.samples), "task_packs": val.task_packs},
        },
    }
    return _Source(
        manifest,
        MemorySplit(train.samples, train.tasks, train.uids, train.packs),
        MemorySplit(val.samples, val.tasks, val.uids, val.packs),
    )


class MFTData:
    """Micro batches for one data-parallel rank. Pure function of (data, seed, consumed rows)."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        pad_to_multiple_of: int = 1,
        fixed_seq_length: bool = False,
        cp: int = 1,
    ):
        problems = list(cfg.validate())
        if micro_batch_size < 1 or dp_size < 1:
            problems.append(f"micro_batch_size {micro_batch_size} and dp_size {dp_size} must be >= 1")
        elif global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            problems.append(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"micro_batch_size*dp_size = {micro_batch_size * dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            problems.append(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if pad_to_multiple_of < 1:
            problems.append(f"pad_to_multiple_of {pad_to_multiple_of} must be >= 1")
        if problems:
            raise ValueError("MFTData: " + "; ".join(problems))
        self.cfg = cfg
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.fixed_seq_length = fixed_seq_length
        #: context parallelism: packed samples padded to multiples of 2 x cp (data/cp_shard.py);
        #: the padding tokens added so far are counted here
        self.cp = cp
        self.cp_padding_tokens = 0

        src = _open_offline(cfg) if cfg.source == "offline" else _build_online(cfg, seed)
        self.manifest: dict = src.manifest
        self.task_names: list[str] = [t["name"] for t in self.manifest["tasks"]]
        tok = self.manifest["tokenizer"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eos_id: int = int(tok["eos_id"])
        self.pad_id: int = int(tok["pad_id"])
        self._dynamic = cfg.batching == "dynamic"
        #: dynamic batching of preference pairs: a row is a pair (batch sizes count pairs), collated
        #: as two rows, chosen then rejected (data.preference.pair_rows)
        self._pairs = self._dynamic and self.manifest.get("mode") == "preference"
        group = 2 if self._pairs else 1
        self._train = _Rows.of(src.train, self._dynamic, group=group)
        self._train_lengths = self._train.lengths if (self._dynamic and cfg.group_by_length) else None
        task_packs = self.manifest["splits"]["val"]["task_packs"]
        self._val = {name: _Rows.of(src.val, self._dynamic, tuple(task_packs[name]), group)
                     for name in self.task_names}
        self._sampler = EpochSampler(len(self._train), seed)

    # --- API ------------------------------------------------------------------------------
    @property
    def rows_per_epoch(self) -> int:
        return len(self._train)

    def train_micro_batch_rows(self, consumed_rows: int) -> list[np.ndarray]:
        """Row ids (into the train split) of this rank's micro batches of that global batch."""
        rows = self._sampler.rows(consumed_rows, self.global_batch_size)
        return rank_micro_batches(rows, micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank,
                                  dp_size=self.dp_size, lengths=self._train_lengths)

    def train_micro_batches(self, consumed_rows: int) -> list[dict]:
        return [self._collate(self._train, ids) for ids in self.train_micro_batch_rows(consumed_rows)]

    def train_rows_micro_batch(self, ids) -> dict:
        """One micro batch of the given training rows, padded with empty rows to micro_batch_size
        (the DPO reference pre-pass walks every row once)."""
        return self._collate(self._train, np.asarray(ids, dtype=np.int64), fill_to=self.micro_batch_size)

    def val_rows(self, task: str) -> int:
        """Validation rows (packs or samples; pairs count once) of ``task``."""
        return len(self._val[task])

    def val_micro_batches(self, task: str, max_batches: int = 0) -> list[dict]:
        """This rank's strided share of the task's validation rows, in order. Every rank gets the
        same number of micro batches of exactly ``micro_batch_size`` rows; missing rows are
        all-padding rows (loss_mask 0, task_ids -1)."""
        if task not in self._val:
            raise KeyError(f"unknown task {task!r}; tasks: {', '.join(self.task_names)}")
        rows = self._val[task]
        mbs, dp = self.micro_batch_size, self.dp_size
        n = -(-len(rows) // (mbs * dp))
        if max_batches > 0:
            n = min(n, max_batches)
        mine = np.arange(self.dp_rank, len(rows), dp)
        return [self._collate(rows, mine[j * mbs:(j + 1) * mbs], fill_to=mbs) for j in range(n)]

    def row_sample_uids(self, row: int, split: str = "train", task: str | None = None) -> list[int]:
        """Sample uids (input enumeration, see FORMAT.md) in one row; for checks and debugging."""
        rows = self._train if split == "train" else self._val[task or ""]
        a, b = int(rows.starts[row]), int(rows.stops[row])
        return rows.store.sample_uids[a:b].tolist()

    # --- internals ------------------------------------------------------------------------
    def _collate(self, rows: _Rows, ids: np.ndarray, fill_to: int = 0) -> dict:
        batch = [rows.read(int(i)) for i in ids]
        batch += [EMPTY_ROW] * max(0, fill_to - len(batch))
        if self._pairs:
            from megatron_mft.data.preference import pair_rows

            batch = pair_rows(batch)
        if self._dynamic:
            width = row_width(batch, multiple=self.pad_to_multiple_of,
                              pad_to=self.cfg.seq_length if self.fixed_seq_length else None)
        else:
            width = round_up(self.cfg.seq_length, self.pad_to_multiple_of)
            if self.cp > 1:  # each sample to a multiple of 2 x cp; a row may outgrow seq_length
                padded = [pad_row_for_cp(r, self.cp, self.pad_id) for r in batch]
                batch = [r for r, _ in padded]
                self.cp_padding_tokens += sum(n for _, n in padded)
                width = max(width, row_width(batch, multiple=self.pad_to_multiple_of))
        return collate(batch, width, self.pad_id)
