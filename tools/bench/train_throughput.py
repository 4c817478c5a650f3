"""Training throughput of a preset (optionally with fewer layers): tokens/s, TFLOP/s per GPU, MFU.

    python tools/bench/train_throughput.py --preset codellama-34b --layers 4 --seq 4096   # one GPU
    python tools/bench/train_throughput.py                                                # CPU default

Runs real optimizer steps of the training engine (megatron schedules, DDP, Adam) on synthetic
packed rows (one document per row) and prints measured figures with the device name.
Multi-GPU: launch under torchrun with --tp/--pp.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (e.g. 4 of 34B's 48)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=2, help="micro batches per step")
    ap.add_argument("--steps", type=int, default=4, help="measured steps (after 1 warm-up step)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--attention", default="auto", choices=["auto", "te", "flash", "sdpa"])
    ap.add_argument("--peft", default="none", choices=["none", "lora", "qlora"])
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_mft.compat import setup_runtime
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks, kernels_line
    from megatron_mft.training.metrics import flop_count, peak_flops
    from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_mft.training.parallel import init_parallel
    from megatron_mft.training.step import StepContext, install_grad_finalizer, train_step

    env = setup_runtime()
    over = [f"model.preset={args.preset}", f"model.precision={args.precision}", f"model.recompute={args.recompute}",
            f"model.attention_backend={args.attention}", f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
            f"parallel.sp={str(args.sp).lower()}", "data.path=/synthetic", f"data.seq_length={args.seq}",
            "loss.mode=token", f"train.micro_batch_size={args.micro_batch}", "train.warmup_steps=0",
            f"peft.method={args.peft}", f"peft.rank={args.lora_rank}"]
    if args.layers:
        over.append(f"model.num_layers={args.layers}")
    cfg = load_config(None, over)
    init_parallel(cfg.parallel, env, cfg.seed)
    dp = ps.get_data_parallel_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if env.cuda else torch.device("cpu")
    layer, plan = None, None
    if args.peft != "none":  # same order as the recipe: adapter spec, build, freeze/quantise
        from megatron_mft.peft import PeftPlan

        plan = PeftPlan(cfg.peft, env)
        layer = plan.layer_spec(cfg.model)
    raw = build_model_chunks(cfg.model, cfg.parallel, env, layer=layer)
    if plan is not None:
        plan.prepare(raw)
    chunks = wrap_ddp(raw, cfg)
    install_grad_finalizer(chunks)
    opt = build_optimizer(chunks, cfg)
    sched = build_scheduler(opt, cfg, args.steps + 1)
    arch = cfg.model.arch()
    b, s = args.micro_batch, args.seq
    g = torch.Generator().manual_seed(0)

    def micro_batch():
        tok = torch.randint(0, arch.vocab_size, (b, s), generator=g)
        rows = torch.arange(b)[:, None].expand(b, s)
        return dict(tokens=tok, labels=tok.roll(-1, 1), loss_mask=torch.ones(b, s), task_ids=torch.zeros(b, s, dtype=torch.long),
                    sample_ids=rows.clone(), position_ids=torch.arange(s).expand(b, s).clone(),
                    cu_seqlens=torch.arange(0, b * s + 1, s, dtype=torch.int32), max_seqlen=s)

    ctx = StepContext(loss_cfg=cfg.loss, task_names=["bench"], device=device, packed=True)
    batches = [micro_batch() for _ in range(args.micro_batches)]
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    train_step(chunks, opt, sched, batches, ctx)  # warm-up
    if env.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = train_step(chunks, opt, sched, batches, ctx)
    if env.cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    world = torch.distributed.get_world_size()
    tokens = b * s * args.micro_batches * dp
    count = flop_count(arch, [s] * (b * args.micro_batches * dp), cfg.peft, cfg.model.recompute)
    tflops = count.model / dt / world / 1e12
    peak = peak_flops(env.device_name)
    result = {
        "device": env.device_name, "kernels": kernels_line(raw, env, packed=True), "preset": args.preset,
        "layers": arch.num_layers, "seq": s, "micro_batch": b, "micro_batches": args.micro_batches,
        "tp": args.tp, "pp": args.pp, "dp": dp, "precision": str(chunks[0].config.params_dtype), "peft": args.peft,
        "step_s": dt, "tokens_per_s": tokens / dt, "tflops_per_gpu": tflops,
        "hw_tflops_per_gpu": count.hardware / dt / world / 1e12,
        "mfu": tflops * 1e12 / peak if peak else None, "loss": out["loss"],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if env.cuda else None,
    }
    if torch.distributed.get_rank() == 0:
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
