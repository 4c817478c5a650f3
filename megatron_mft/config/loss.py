"""Loss mode and convergence balancer. Owned by megatron_mft.loss (formulas: docs/losses.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LossMode = Literal["token", "sample", "task-token", "task-sample", "focal-sample", "focal-task"]
BalancerName = Literal["none", "famo", "coba"]
PreferenceLoss = Literal["sigmoid", "ipo", "hinge"]


@dataclass
class PreferenceConfig:
    """The preference stages (train.stage dpo | orpo); formulas in docs/preference.md."""

    #: DPO's beta: scale of the implicit reward beta * (log pi - log pi_ref).
    beta: float = 0.1
    #: dpo: sigmoid (DPO paper) | ipo (IPO, on per-token mean log-probs as TRL) | hinge (SLiC).
    loss_type: PreferenceLoss = "sigmoid"
    #: dpo sigmoid: conservative DPO's label smoothing epsilon in [0, 0.5).
    label_smoothing: float = 0.0
    #: dpo: weight of the NLL term on the chosen response (RPO); 0 = plain DPO.
    rpo_alpha: float = 0.0
    #: orpo: weight lambda of the odds-ratio term (YAML key ``lambda``; ORPO's NLL term has weight 1).
    lambda_: float = 0.1
    #: dpo with full fine-tuning: reference log-probs from a no-grad pre-pass over the training
    #: data with the starting weights, stored beside the data (``precomputed``), or from a frozen
    #: no-grad copy of the starting weights, same layout, forward per micro batch (``frozen``: one
    #: model's memory more, nothing stored). LoRA/QLoRA use the model with its adapters disabled.
    reference: Literal["precomputed", "frozen"] = "precomputed"

    #: the stages that read each setting (RunConfig.validate refuses one set for another stage)
    READ_BY = {"beta": ("dpo",), "loss_type": ("dpo",), "label_smoothing": ("dpo",), "rpo_alpha": ("dpo",),
               "lambda_": ("orpo",), "reference": ("dpo",)}

    def validate(self) -> list[str]:
        p = []
        if not self.beta > 0:
            p.append("loss.preference.beta: must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            p.append("loss.preference.label_smoothing: must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            p.append(f"loss.preference.label_smoothing: only used by loss_type sigmoid, not {self.loss_type!r}")
        if self.rpo_alpha < 0:
            p.append("loss.preference.rpo_alpha: must be >= 0")
        if self.lambda_ < 0:
            p.append("loss.preference.lambda: must be >= 0")
        return p


@dataclass
class LossConfig:
    #: token | sample | task-token (Eq. 1) | task-sample | focal-sample (Eq. 2) | focal-task (Eq. 3).
    #: Every mode is the formula over the whole global batch, whatever the micro-batch / DP split.
    mode: LossMode = "task-token"
    #: Focal exponent gamma (focal modes). gamma = 0 with alpha = 1 gives sample / task-sample.
    gamma: float = 0.0
    #: Per-task focal alpha, by task name (missing tasks: 1.0). Focal modes only.
    alpha: dict[str, float] = field(default_factory=dict)
    #: Static per-task weights on top of any mode, by task name (missing tasks: 1.0).
    #: token/sample modes weight each token/sample of the task; task modes weight the task's
    #: term; every mode divides by the matching weighted count, so weights are scale-free.
    task_weights: dict[str, float] = field(default_factory=dict)
    #: focal-task only. true (exact): a no-grad pre-pass over the global batch computes P_i, Q_i
    #: (one extra forward per step); value and gradient are exactly Eq. 3 over the global batch.
    #: false (one-pass): each micro batch plugs its own estimates P_i^mb, Q_i^mb into Eq. 3 and
    #: the task term is the sample-count-weighted mean of those micro-batch terms; exact when
    #: gamma = 0 or a task sits in one micro batch, otherwise the objective depends on how the
    #: batch is split (a Jensen gap of (1-P)^gamma * Q; see docs/losses.md for its size).
    focal_task_exact: bool = True
    #: Convergence balancer: none | famo | coba. Both famo and coba need per-task validation
    #: losses every balancer_interval steps (validation forward passes: the main cost).
    balancer: BalancerName = "none"
    #: Update the balancer every N steps (the trainer runs a validation pass at those steps).
    balancer_interval: int = 10
    #: Steps of uniform weights before the balancer starts.
    balancer_warmup: int = 0
    #: coba: validation points (most recent) used to fit each slope; also the length of the
    #: slope history the absolute convergence score and the divergence factor look at.
    coba_history: int = 20
    #: coba: temperature of the divergence factor's softmax.
    coba_tau: float = 5.0
    #: coba: minimum weight as a fraction of the uniform weight 1/N (in [0, 1)).
    coba_floor: float = 0.1
    #: famo: learning rate of the Adam step on the task-weight logits.
    famo_lr: float = 0.025
    #: famo: weight decay on the task-weight logits (pulls weights back to uniform).
    famo_weight_decay: float = 1e-3
    #: train.stage dpo / orpo only: the preference loss (docs/preference.md). loss.mode then
    #: averages over pairs: token/sample = mean over the global batch's pairs, task-token/task-sample
    #: = each task's pair mean, tasks weighted (static weights, balancers); token vs sample picks how
    #: the NLL term on chosen (rpo_alpha, ORPO) is normalised: chosen tokens, or per-pair means.
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def validate(self) -> list[str]:
        p = []  # mode and balancer names: checked against their Literal when the config loads
        if self.gamma < 0:
            p.append("loss.gamma: must be >= 0")
        if (self.gamma != 0 or self.alpha) and not self.mode.startswith("focal"):
            p.append(f"loss.gamma/loss.alpha: only used by the focal modes, not mode={self.mode!r}")
        for k, v in self.alpha.items():
            if v < 0:
                p.append(f"loss.alpha.{k}: must be >= 0")
        for k, v in self.task_weights.items():
            if v < 0:
                p.append(f"loss.task_weights.{k}: must be >= 0")
        if self.balancer_interval < 1:
            p.append("loss.balancer_interval: must be >= 1")
        if self.balancer_warmup < 0:
            p.append("loss.balancer_warmup: must be >= 0")
        if self.coba_history < 2:
            p.append("loss.coba_history: must be >= 2 (a slope needs two points)")
        if self.coba_tau <= 0:
            p.append("loss.coba_tau: must be > 0")
        if not 0.0 <= self.coba_floor < 1.0:
            p.append("loss.coba_floor: must be in [0, 1)")
        if self.famo_lr <= 0:
            p.append("loss.famo_lr: must be > 0")
        if self.famo_weight_decay < 0:
            p.append("loss.famo_weight_decay: must be >= 0")
        return p
