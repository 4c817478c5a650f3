"""Run the real training CLI (single process or torchrun on gloo) and read its metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_cpu.yaml"
#: steps of the session's reference run (conftest ``reference_run``); 4, so that the resume tests
#: can stop or break a save in the middle of it
REFERENCE_STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = str(threads)
    e.pop("MFT_STOP_FILE", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_command(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        head = [sys.executable, "-m", "megatron_mft.train"]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "megatron_mft.train"]
    return head + ["--config", str(CONFIG)] + overrides


def run_train(overrides: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    e = env(threads=1 if nproc > 1 else 2)
    e.update(extra_env or {})
    proc = subprocess.run(train_command(overrides, nproc), cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(output_dir: str | Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(output_dir: str | Path) -> dict[int, dict]:
    """step -> the training record of that step (last one wins, as after a resume)."""
    return {r["step"]: r for r in read_metrics(output_dir) if "loss" in r}


def preprocess_demo(out: Path, seq_length: int = 1024) -> Path:
    """The whole bundled demo set through the preprocessing CLI (best-fit packs)."""
    from data_fixtures import DEMO_RAW, cli_args, run_cli

    proc = run_cli(*cli_args(DEMO_RAW, out, seq_length, "best-fit", "--overlong", "drop", "--workers", "2"),
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def init_weights(out: Path, overrides: list[str] | None = None) -> Path:
    subprocess.run([sys.executable, "-m", "megatron_mft.checkpoint", "init", "--config", str(CONFIG), "--out",
                    str(out)] + (overrides or []), check=True, cwd=ROOT, env=env(2), capture_output=True)
    return out
