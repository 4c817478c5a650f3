"""megatron DDP, (distributed) Adam and the cosine LR schedule with warm-up."""

from __future__ import annotations

import math

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mft.config import RunConfig


def wrap_ddp(chunks: list, run: RunConfig) -> list:
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]


def build_optimizer(ddp_chunks: list, run: RunConfig):
    t = run.train
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=ddp_chunks[0].config.bf16,
        params_dtype=ddp_chunks[0].config.params_dtype,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(cfg, ddp_chunks)


def build_scheduler(optimizer, run: RunConfig, total_steps: int) -> OptimizerParamScheduler:
    t = run.train
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    decay = t.decay_steps or max(total_steps, warmup + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )


def total_steps(run: RunConfig, rows_per_epoch: int) -> int:
    if run.train.steps > 0:
        return run.train.steps
    return max(1, math.ceil(run.train.epochs * rows_per_epoch / run.train.global_batch_size))
