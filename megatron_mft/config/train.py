"""Optimisation and run control: steps or epochs, batch sizes, LR schedule, logging, saving."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_mft.config.base import PATH


@dataclass
class TrainConfig:
    #: sft (multi-task SFT) | dpo | orpo (preference stages on {chosen, rejected} pairs, loss.preference;
    #: docs/preference.md).
    stage: Literal["sft", "dpo", "orpo"] = "sft"
    #: Optimizer steps to run; 0 means "derive from epochs".
    steps: int = 20
    #: Epochs over the training set (used when steps == 0).
    epochs: Optional[float] = None
    micro_batch_size: int = 2
    global_batch_size: int = 8
    lr: float = 2e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2
    #: Steps the cosine decay spans (null, the default: all steps); more than warmup_steps.
    decay_steps: Optional[int] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    #: Clip the gradient norm to this (0 = no clipping).
    clip_grad: float = 1.0
    log_interval: int = 1
    #: Save a checkpoint every N steps (0 = only at the end).
    save_interval: int = 0
    #: Run validation every N steps (0 = never).
    eval_interval: int = 0
    #: Validation micro batches per task per evaluation (0 = whole validation split).
    eval_iters: int = 0
    #: Stop when validation has not improved for this many evaluations (0 = off).
    early_stopping_patience: int = 0
    #: Save and exit cleanly once this many minutes have passed (0 = off); for SLURM time limits.
    exit_duration_minutes: float = 0.0
    #: Start from these weights (a megatron dist checkpoint, e.g. from `convert hf-to-mcore`).
    #: On resume a full fine-tune does not read it; a LoRA/QLoRA run reads its base from it again.
    init_checkpoint: Optional[str] = field(default=None, metadata=PATH)
    #: Which checkpoint to continue from. None (default): the step `<output_dir>/checkpoints/latest`
    #: names (none there: a fresh start). A step number N: `<output_dir>/checkpoints/step_N`. A path
    #: of a step folder (e.g. another run's, continued in a new output_dir). A run never starts
    #: afresh over existing checkpoints: use a new output_dir for that.
    resume_from: Optional[str] = field(default=None, metadata=PATH)
    #: Steps whose loss or grad norm is not finite (NaN/inf) are skipped without updating the
    #: weights; the run stops with an error once more than this many come in a row (0 = stop at
    #: the first). A non-finite checkpoint is never saved.
    max_nonfinite_steps: int = 0
    #: Also write every metrics.jsonl scalar to TensorBoard under <output_dir>/tensorboard.
    tensorboard: bool = False
    #: Peak FLOP/s of one device, for MFU; None = looked up from the device name.
    peak_flops: Optional[float] = None

    def validate(self) -> list[str]:
        p = []
        if self.steps < 0:
            p.append("train.steps: must be >= 0")
        if self.epochs is not None and self.epochs < 0:
            p.append(f"train.epochs: must be >= 0 (or null), got {self.epochs}")
        elif self.steps == 0 and not self.epochs:
            p.append("train.steps: 0 needs train.epochs > 0")
        if self.micro_batch_size < 1:
            p.append("train.micro_batch_size: must be >= 1")
        if self.global_batch_size < 1:
            p.append("train.global_batch_size: must be >= 1")
        elif self.micro_batch_size >= 1 and self.global_batch_size % self.micro_batch_size:
            p.append(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size {self.micro_batch_size}"
            )
        if self.lr <= 0:
            p.append("train.lr: must be > 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            p.append(f"train.min_lr: must be in [0, train.lr={self.lr}]")
        if self.log_interval < 1:
            p.append("train.log_interval: must be >= 1")
        # optimiser and schedule: megatron asserts some of these only after the model is built
        if self.adam_eps <= 0:
            p.append(f"train.adam_eps: must be > 0, got {self.adam_eps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                p.append(f"train.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.decay_steps is not None and self.decay_steps < 1:
            p.append(f"train.decay_steps: must be >= 1, or null (decay over all steps), got {self.decay_steps}")
        elif self.decay_steps is not None and 0 <= self.warmup_steps and self.warmup_steps >= self.decay_steps:
            p.append(f"train.warmup_steps: {self.warmup_steps} must be < train.decay_steps {self.decay_steps} "
                     f"(the LR warms up, then decays); lower warmup_steps or raise decay_steps (null = all steps)")
        if self.peak_flops is not None and self.peak_flops <= 0:
            p.append(f"train.peak_flops: must be > 0, or null (looked up from the device name), got {self.peak_flops}")
        if self.resume_from is not None and str(self.resume_from).strip().lower() in ("none", "null", "false", "0"):
            p.append(f"train.resume_from: {self.resume_from!r} would start afresh over existing checkpoints, which "
                     f"is not allowed; leave it unset (resume from `latest`, or start fresh where there are no "
                     f"checkpoints) and use a new output_dir to start afresh")
        for name, off in (("save_interval", ""), ("eval_interval", ""), ("eval_iters", ""), ("warmup_steps", ""),
                          ("early_stopping_patience", ""), ("max_nonfinite_steps", ""), ("weight_decay", ""),
                          ("clip_grad", " (0 = no clipping)"), ("exit_duration_minutes", " (0 = off)")):
            if getattr(self, name) < 0:
                p.append(f"train.{name}: must be >= 0{off}, got {getattr(self, name)}")
        return p
