"""Helpers for the data tests (tests/test_data_*.py): small task folders, tokenizers, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_data"
DEMO_RAW = DEMO / "raw"
DEMO_TOKENIZER = str(DEMO / "tokenizer" / "demo_sp2048.model")
CLI = REPO / "tools" / "preprocess" / "preprocess_mft.py"
MARKERS = ("<|role_start|>", "<|role_end|>")


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item: a dict (dumped as JSON), a str (written as is) or bytes (written raw)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for item in lines:
            if isinstance(item, dict):
                item = json.dumps(item, ensure_ascii=False)
            if isinstance(item, str):
                item = item.encode("utf-8")
            f.write(item + b"\n")
    return path


def demo_subset(root: Path, train: int = 40, val: int = 6) -> Path:
    """The first lines of every demo task: real data, small enough for fast tests."""
    for task_dir in sorted(DEMO_RAW.iterdir()):
        for name, n in (("train.jsonl", train), ("val.jsonl", val)):
            lines = (task_dir / name).read_bytes().split(b"\n")[:n]
            out = root / task_dir.name / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"\n".join(lines) + b"\n")
    return root


def chat(*turns: tuple[str, str]) -> dict:
    return {"chat_rounds": [{"role": r, "content": c} for r, c in turns]}


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(CLI), "--no-progress", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


def cli_args(data_dir, out_dir, seq_length=512, packing="best-fit", *extra) -> list[str]:
    return ["--data-dir", str(data_dir), "--tokenizer-model", DEMO_TOKENIZER, "--seq-length", str(seq_length),
            "--packing", packing, "--output-dir", str(out_dir), "--no-progress", *extra]


def hf_tokenizer_dir(root: Path) -> Path:
    """A tiny Llama-style (Metaspace, prepend first) HF tokenizer with the markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *MARKERS])
    text = [ln for f in sorted(DEMO_RAW.glob("*/val.jsonl")) for ln in f.read_text().splitlines()[:20]]
    tok.train_from_iterator(text, trainer)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return root
