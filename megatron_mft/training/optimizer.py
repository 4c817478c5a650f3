"""megatron DDP, (distributed) Adam and the cosine LR schedule with warm-up."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mft.config import RunConfig


#: devices whose addmm takes 16-bit operands and accumulates into a float32 output (cuBLAS; meta
#: stands for CUDA in the placement tests). The CPU backend has no such kernel.
MIXED_DTYPE_ADDMM_DEVICES = ("cuda", "meta")
#: device type -> whether that mixed-dtype addmm ran there (a torch without it falls back once)
_mixed_addmm_works: dict[str, bool] = {}


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """Apex's ``wgrad_gemm_accum_fp32/fp16`` in torch: main_grad += grad_output^T @ total_input.

    With 16-bit activations and a float32 main_grad, CUDA does it as apex does: one GEMM with
    beta=1 that reads and writes main_grad in float32 (no 16-bit weight gradient rounded, written,
    read back and added: on CodeLlama-34B-shaped layers that add was 9% of a full fine-tuning step
    on an H200, and the fused form is +5% tokens/s). A torch whose addmm lacks ``out_dtype`` there
    (older releases) gets the product and the add, with one warning.
    """
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
        return
    device = main_grad.device.type
    if (device in MIXED_DTYPE_ADDMM_DEVICES and main_grad.dtype == torch.float32
            and _mixed_addmm_works.get(device, True)):
        try:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
            _mixed_addmm_works[device] = True
            return
        except (RuntimeError, TypeError) as e:
            if _mixed_addmm_works.get(device) or isinstance(e, torch.OutOfMemoryError):  # a real error
                raise
            _mixed_addmm_works[device] = False
            warnings.warn(f"this torch ({torch.__version__}) has no mixed-dtype addmm on {device} ({e}); "
                          "weight gradients are formed in the activations' dtype, then added to main_grad")
    main_grad.add_(grad_output.t().mm(total_input))


def accumulate_wgrad_into_main_grad(ddp_chunks: list) -> None:
    """Weight gradients of megatron's parallel linears go straight into DDP's main_grad buffer.

    Without this (no Apex), each linear's backward allocates a weight gradient and DDP's hook
    adds it into main_grad: one extra [out, in] tensor and one extra pass per weight and micro
    batch. megatron's ``gradient_accumulation_fusion`` accumulates in the GEMM instead; without
    Apex's CUDA extension we give it a torch GEMM with beta=1 (``addmm_``). Turned on per module
    here, after DDP has given every trainable weight its ``main_grad`` (a raw model, e.g. in
    conversion or tests, keeps plain ``.grad``). On the CPU only the linear calls that
    communicate (or have a trainable bias) go through megatron's Function and this path; the
    others are plain autograd with DDP's hook doing the add (model/linear.py).
    """
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = SimpleNamespace(wgrad_gemm_accum_fp32=_wgrad_gemm_accum,
                                                                wgrad_gemm_accum_fp16=_wgrad_gemm_accum)
        layers._grad_accum_fusion_available = True
    for chunk in ddp_chunks:
        for m in chunk.modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, (layers.ColumnParallelLinear, layers.RowParallelLinear)) and isinstance(w, torch.Tensor)
                    and w.requires_grad and hasattr(w, "main_grad")):
                m.gradient_accumulation_fusion = True


def wrap_ddp(chunks: list, run: RunConfig) -> list:
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
    )
    ddp = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    accumulate_wgrad_into_main_grad(ddp)
    return ddp


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
    optimizer = get_megatron_optimizer(cfg, ddp_chunks)
    use_fused_torch_adam(optimizer)
    return optimizer


def use_fused_torch_adam(optimizer) -> None:
    """Without TE/Apex megatron falls back to ``torch.optim.AdamW`` with torch's default
    implementation: on CPU the per-parameter loop (a pass per element-wise op). torch's fused
    kernel (CPU and CUDA) does one pass per tensor: 9.8 -> 2.7 ms per step for the tiny preset's
    parameters on one core (docs/performance.md); values agree to float rounding (~1e-7)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) not in (torch.optim.AdamW, torch.optim.Adam):
            continue  # TE's / Apex's FusedAdam, or no optimizer on this rank
        params = [p for g in inner.param_groups for p in g["params"]]
        if any(g.get("differentiable") or g.get("capturable") for g in inner.param_groups) or \
                any(p.device.type not in ("cpu", "cuda") or not p.is_floating_point() for p in params):
            continue
        for group in [*inner.param_groups, inner.defaults]:
            group["foreach"], group["fused"] = False, True


def build_scheduler(optimizer, run: RunConfig, total_steps: int) -> OptimizerParamScheduler:
    """Cosine LR with linear warmup. At a resume the run's own schedule applies from the
    checkpoint's step (``override_opt_param_scheduler``): megatron's default keeps the
    checkpoint's LR, warmup and decay lengths, which would make a changed ``train.steps`` /
    ``decay_steps`` / ``warmup_steps`` / ``lr`` / ``min_lr`` / ``weight_decay`` that the resume
    reports as applied a silent no-op."""
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
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def total_steps(run: RunConfig, rows_per_epoch: int) -> int:
    if run.train.steps > 0:
        return run.train.steps
    return max(1, math.ceil(run.train.epochs * rows_per_epoch / run.train.global_batch_size))
