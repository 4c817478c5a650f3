"""Training data: where it is and how micro batches are formed. Owned by megatron_mft.data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_mft.config.base import PATH


@dataclass
class DataConfig:
    #: Output folder of tools/preprocess/preprocess_mft.py (offline mode), or a raw data
    #: directory with one sub-folder of .jsonl files per task (online mode).
    path: str = field(default="", metadata=PATH)
    #: offline = preprocessed .bin/.idx; online = tokenize raw jsonl at start-up.
    source: Literal["offline", "online"] = "offline"
    #: packed = fixed seq_length windows holding several samples; dynamic = one sample per row,
    #: each micro batch padded to its longest row (preference pairs: batch sizes count pairs, each
    #: pair two adjacent rows, chosen then rejected).
    batching: Literal["packed", "dynamic"] = "packed"
    #: Row width in packed mode, and the longest allowed sample. Offline data must have been
    #: preprocessed with a --seq-length no larger than this.
    seq_length: int = 512
    #: Tokenizer for online mode (SentencePiece .model file or HF tokenizer folder).
    tokenizer: str = field(default="", metadata=PATH)
    #: Online mode packing algorithm.
    packing: Literal["none", "next-fit", "best-fit"] = "best-fit"
    #: Online mode: fraction of each task's samples held out for validation (tasks without
    #: validation files only; offline data carries the split chosen at preprocessing).
    val_ratio: float = 0.05
    #: Dynamic padding: sort rows of similar length into the same micro batch (within each
    #: global batch, so the epoch order and resume stay exact).
    group_by_length: bool = True
    #: Online mode: tokenizer processes (0 or 1 = in the training process).
    num_workers: int = 0
    #: Online mode: sft = loss on bot turns only; pretrain = loss on every real token;
    #: preference = {chosen, rejected} pairs (train.stage dpo / orpo; docs/preference.md).
    mode: Literal["sft", "pretrain", "preference"] = "sft"
    #: Online mode: chat template preset (megatron_mft.data.template.TEMPLATES) or a .json file.
    template: str = field(default="mftcoder", metadata=PATH)
    #: Online mode: samples longer than seq_length are an error, dropped, or truncated.
    overlong: Literal["error", "drop", "truncate"] = "error"
    #: Online mode: skip bad lines (counted per reason) instead of failing on them.
    skip_bad_samples: bool = False
    #: Online mode: a longer input line (bytes) is a bad line (line_too_long), rejected without
    #: being read or parsed; the offline flag is preprocess_mft.py --max-line-bytes. 64 MiB.
    max_line_bytes: int = 64 << 20

    def validate(self) -> list[str]:
        p = []
        if not self.path:
            p.append("data.path: required (preprocessed output dir, or raw task dir with data.source=online)")
        if self.seq_length < 8:
            p.append("data.seq_length: must be >= 8")
        if not 0.0 <= self.val_ratio < 1.0:
            p.append("data.val_ratio: must be in [0, 1)")
        if self.source == "online" and not self.tokenizer:
            p.append("data.tokenizer: required when data.source=online")
        if self.num_workers < 0:
            p.append("data.num_workers: must be >= 0")
        if self.max_line_bytes < 1:
            p.append("data.max_line_bytes: must be >= 1")
        if not self.template:
            p.append("data.template: required (a preset name such as mftcoder, or a .json file)")
        return p
