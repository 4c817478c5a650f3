"""Throughput arithmetic and the metrics log (``<output_dir>/metrics.jsonl``, appended)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_mft.config import ArchSpec

#: Dense bf16 peak FLOP/s by device-name substring (tensor cores, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def peak_flops(device_name: str, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def train_flops(arch: ArchSpec, segment_lengths: list[int], recompute_full: bool = False) -> float:
    """Model FLOPs of one training pass (forward + backward) over these causal segments.

    Matmul FLOPs: 2 per weight per token forward (embedding lookup excluded, LM head included);
    causal attention: 2 * 2 * s * h / 2 per token per layer forward. Backward = 2x forward.
    """
    h, L = arch.hidden_size, arch.num_layers
    dense_params = arch.num_params() - arch.vocab_size * arch.hidden_size  # minus input embedding
    tokens = sum(segment_lengths)
    fwd = 2 * dense_params * tokens + sum(2 * L * h * s * s for s in segment_lengths)
    return fwd * (4 if recompute_full else 3)


class MetricsLog:
    """One JSON object per logged step; resumed runs append, never overwrite. Optionally the same
    scalars to TensorBoard (``<output_dir>/tensorboard``; a resumed run adds an events file)."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, clean["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def console_line(rec: dict, total_steps: int) -> str:
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"grad_norm {rec['grad_norm']:.3f}" if rec.get("grad_norm") is not None else "grad_norm -",
             f"tok/s {rec['tokens_per_s']:.0f}", f"TFLOP/s/gpu {rec['tflops_per_gpu']:.3f}"]
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    tasks = [f"{k.split('/', 1)[1]}={v:.3f}" for k, v in rec.items() if k.startswith("task_loss/") and v is not None]
    if tasks:
        parts.append("tasks: " + " ".join(tasks))
    return " | ".join(parts)


def peak_memory_gib() -> float:
    """Peak device memory on CUDA (allocator), peak resident host memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
