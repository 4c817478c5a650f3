"""Throughput arithmetic and the metrics log (``<output_dir>/metrics.jsonl``, appended; a resume
first sets aside the lines of the steps it repeats)."""

from __future__ import annotations

import itertools
import json
import os
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_mft.compat.fsops import fsync_path, replace_file_atomically
from megatron_mft.config import ArchSpec, PeftConfig
from megatron_mft.peft.memory import lora_params_per_layer, target_shapes

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


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs of one training pass (forward + backward) over a batch, by what they compute.
    Formulas and sources: docs/performance.md, "FLOPs and MFU"."""

    forward: float  #: every matmul of the forward pass
    activation_grads: float  #: backward: gradients with respect to matmul inputs
    weight_grads: float  #: backward: gradients of the trained weights only
    recompute: float  #: forward work that activation recompute repeats in the backward pass

    @property
    def model(self) -> float:
        """What the method needs, recompute excluded: the numerator of MFU (PaLM, appendix B)."""
        return self.forward + self.activation_grads + self.weight_grads

    @property
    def hardware(self) -> float:
        """What the GPU executes: model FLOPs plus recompute (Megatron-LM's 2021 count)."""
        return self.model + self.recompute


def flop_count(arch: ArchSpec, sample_lengths: Sequence[int], peft: Optional[PeftConfig] = None,
               recompute: str = "none", reference_forward: bool = False) -> FlopCount:
    """FLOPs of one training pass over causal samples of these lengths (packed or not: each
    sample attends only to itself, so attention counts per-sample lengths).

    2 FLOPs per multiply-add; per token and layer, forward: 2 x (every linear weight) + 2 r (in +
    out) per adapter; per sample of length s and layer, attention scores and values: 2 x 2 P d
    per head over the P query-key pairs computed: s^2/2 causal, minus (s - w)^2/2 beyond a
    sliding window w < s; LM head 2 h V per token; input embedding 0 (a lookup).
    Backward: every matmul's input gradient (attention: 2x its forward); weight gradients only
    of trained weights (full: all linears and the LM head; LoRA/QLoRA: the adapters only).
    Recompute: ``selective`` repeats core attention, ``full`` the whole transformer layer.
    ``peft``: a PeftConfig (method lora/qlora, rank, target_modules) or None = full fine-tuning;
    QLoRA counts as LoRA (dequantisation is elementwise work, not matmul FLOPs).
    Mixture of experts: per token the router (h x E), the ``moe_top_k`` routed experts and the
    shared expert with its gate replace the dense MLP (tokens dropped by a capacity factor are
    not subtracted). ``reference_forward``: the preference stage's per-step no-grad forward of the
    base with adapters disabled (a method cost: counted in the model FLOPs).
    """
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    L, h, V = arch.num_layers, arch.hidden_size, arch.vocab_size
    tokens = float(sum(sample_lengths))
    linears = 2.0 * _linear_macs_per_token(arch) * tokens  # one layer
    attention = 4.0 * arch.num_attention_heads * arch.head_dim * sum(_attended_pairs(s, arch.sliding_window)
                                                                    for s in sample_lengths)
    head = 2.0 * h * V * tokens
    lora = peft is not None and peft.method != "none"
    adapters = 2.0 * lora_params_per_layer(arch, peft.rank, peft.target_modules) * tokens if lora else 0.0

    forward = L * (linears + attention + adapters) + head
    if reference_forward:  # DPO/ORPO with adapters: a no-grad pass of the base (adapters disabled)
        forward += L * (linears + attention) + head
    activation_grads = L * (linears + 2 * attention + adapters) + head
    weight_grads = L * adapters if lora else L * linears + head
    layer_forward = {"none": 0.0, "selective": attention, "full": linears + attention + adapters}[recompute]
    return FlopCount(forward, activation_grads, weight_grads, L * layer_forward)


def _linear_macs_per_token(arch: ArchSpec) -> int:
    """Multiply-adds of one layer's linear weights per token (MoE: only what a token runs)."""
    shapes = target_shapes(arch)
    attn = sum(i * o for k, (i, o) in shapes.items() if k in ("linear_qkv", "linear_proj"))
    if not arch.num_experts:
        return attn + sum(i * o for k, (i, o) in shapes.items() if k in ("linear_fc1", "linear_fc2"))
    h, mats = arch.hidden_size, 3 if arch.gated else 2
    shared = mats * h * arch.moe_shared_expert_size + (h if arch.moe_shared_expert_gate else 0)
    return attn + h * arch.num_experts + arch.moe_top_k * mats * h * arch.expert_ffn + shared


def _attended_pairs(s: int, window: int) -> float:
    """Query-key pairs of a causal sample of length s (the s^2/2 convention of flash-attn's and
    Megatron's counts), less the triangle outside a sliding window of w < s tokens."""
    beyond = max(s - window, 0) if window else 0
    return (s * s - beyond * beyond) / 2.0


def model_flops(arch: ArchSpec, sample_lengths: Sequence[int], peft: Optional[PeftConfig] = None) -> float:
    """Model FLOPs (recompute excluded) of one training pass: for MFU and ``tflops_per_gpu``."""
    return flop_count(arch, sample_lengths, peft).model


def hardware_flops(arch: ArchSpec, sample_lengths: Sequence[int], peft: Optional[PeftConfig] = None,
                   recompute: str = "none") -> float:
    """Hardware FLOPs (recompute included) of one training pass: for ``hw_tflops_per_gpu``."""
    return flop_count(arch, sample_lengths, peft, recompute).hardware


class MetricsLog:
    """One JSON object per logged step; resumed runs append (after :meth:`set_aside_after`), never
    overwrite. Optionally the same scalars to TensorBoard (``<output_dir>/tensorboard``; a resumed
    run adds an events file whose purge marker hides the earlier files' events from its first step
    on, so TensorBoard too shows each step once)."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = False,
                 first_step: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=first_step)

    def set_aside_after(self, step: int) -> Optional[tuple[int, Path]]:
        """A run continuing from ``step`` logs the later steps again: lines of steps after it (an
        earlier start's, past its checkpoint) move to a new side file next to metrics.jsonl, which
        keeps every other line (unparseable ones and lines without a step too) and is replaced
        atomically; readers then see one series. A torn last line (a crash while it was written)
        moves too. (lines moved, side file), or None if none were. Call :meth:`own_file` first."""
        if not self.enabled or not self.path.is_file():
            return None
        keep, later = [], []
        with self.path.open("rb") as f:
            lines = f.readlines()  # split at b"\n" only: every other byte of a line stays as it was
        unterminated = bool(lines) and not lines[-1].endswith(b"\n")
        for raw in lines:
            if not raw.endswith(b"\n"):  # the last line, unterminated: never glued to the next record
                raw += b"\n"
                if not _parses(raw):  # torn by a crash mid-write: set aside with the later steps
                    later.append(raw)
                    continue
            (later if _step_of(raw) > step else keep).append(raw)
        if not later:
            if unterminated:  # a whole record that lost only its newline: end it where it is
                with self.path.open("ab") as f:
                    f.write(b"\n")
            return None
        side = _new_side_file(self.path, b"".join(later))
        replace_file_atomically(str(self.path), lambda tmp: Path(tmp).write_bytes(b"".join(keep)))
        return len(later), side

    def own_file(self) -> Optional[str]:
        """Make metrics.jsonl this run's own file if it is a symbolic link or has other hard links
        (a run folder copied with ``cp -as`` / ``cp -al``): appends would otherwise go into the other
        run's log. Its lines are copied (none if the link is dangling); what it linked to is left as
        it was. What it was ("a symbolic link to ..."), or None."""
        if not self.enabled:
            return None
        path = self.path
        if path.is_symlink():
            was = f"a symbolic link to {os.readlink(path)}"
        elif path.is_file() and path.stat().st_nlink > 1:
            was = "a file with other hard links"
        else:
            return None
        text = path.read_bytes() if path.is_file() else b""
        replace_file_atomically(str(path), lambda tmp: Path(tmp).write_bytes(text))
        return was

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


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def _step_of(raw: bytes) -> float:
    """The line's integer ``step``, or -inf (unparseable, no step): such a line is never moved."""
    try:
        step = json.loads(raw).get("step")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: absurdly nested JSON
        return -math.inf
    return step if isinstance(step, int) and not isinstance(step, bool) else -math.inf


def _new_side_file(path: Path, data: bytes) -> Path:
    """``data`` durably in a new ``<stem>.superseded.<time>[-N].jsonl`` beside ``path``: never over a file."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        side = path.with_name(f"{path.stem}.superseded.{stamp}{f'-{n}' if n else ''}{path.suffix}")
        try:
            f = side.open("xb")
        except FileExistsError:
            continue
        try:
            with f:
                f.write(data)
            fsync_path(side)
        except BaseException:  # e.g. a full disk: no partial copy; metrics.jsonl is still whole
            side.unlink(missing_ok=True)
            raise
        return side


def console_line(rec: dict, total_steps: int) -> str:
    parts = [f"step {rec['step']}/{total_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"grad_norm {rec['grad_norm']:.3f}" if rec.get("grad_norm") is not None else "grad_norm -",
             f"tok/s {rec['tokens_per_s']:.0f}", f"TFLOP/s/gpu {rec['tflops_per_gpu']:.3f}"
             + (f" (hw {rec['hw_tflops_per_gpu']:.3f})" if rec.get("hw_tflops_per_gpu") is not None else "")]
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
