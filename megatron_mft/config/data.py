"""Training data: where it is and how micro batches are formed. Owned by megatron_mft.data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class DataConfig:
    #: Output folder of tools/preprocess/preprocess_mft.py (offline mode), or a raw data
    #: directory with one sub-folder of .jsonl files per task (online mode).
    path: str = ""
    #: offline = preprocessed .bin/.idx; online = tokenize raw jsonl at start-up.
    source: Literal["offline", "online"] = "offline"
    #: packed = fixed seq_length windows holding several samples; dynamic = one sample per row,
    #: each micro batch padded to its longest row.
    batching: Literal["packed", "dynamic"] = "packed"
    seq_length: int = 512
    #: Tokenizer for online mode (SentencePiece .model file or HF tokenizer folder).
    tokenizer: str = ""
    #: Online mode packing algorithm.
    packing: Literal["none", "next-fit", "best-fit"] = "best-fit"
    #: Fraction of each task's samples held out for validation (when no val files exist).
    val_ratio: float = 0.05
    #: Dynamic padding: sort rows of similar length into the same micro batch.
    group_by_length: bool = True
    num_workers: int = 0

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
        return p
