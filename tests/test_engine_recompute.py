"""Activation recompute (selective = core attention, full = whole layers) changes memory, not
numbers: loss and gradient norm equal the no-recompute step on the same weights."""

import pytest
import torch


def _step(env, data_path, recompute):
    from megatron_mft.config import load_config
    from megatron_mft.data import MFTData
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_mft.training.parallel import init_parallel
    from megatron_mft.training.step import StepContext, install_grad_finalizer, train_step

    cfg = load_config("examples/tiny_cpu.yaml", [f"data.path={data_path}", "data.source=offline",
                                                 "data.seq_length=512", "model.num_layers=2",
                                                 f"model.recompute={recompute}"])
    init_parallel(cfg.parallel, env, seed=11)  # same seed + CPU init order -> same weights
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.parallel, env), cfg)
    install_grad_finalizer(chunks)
    opt = build_optimizer(chunks, cfg)
    data = MFTData(cfg.data, seed=0, micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1)
    ctx = StepContext(loss_cfg=cfg.loss, task_names=data.task_names, device=torch.device("cpu"), packed=True)
    layer = chunks[0].module.decoder.layers[0]
    calls = {"layer": 0, "core_attention": 0}
    for name, mod in (("layer", layer), ("core_attention", layer.self_attention.core_attention)):
        mod.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    out = train_step(chunks, opt, build_scheduler(opt, cfg, 10), data.train_micro_batches(0), ctx)
    return out["loss"], out["grad_norm"], calls


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_is_exact(single_process_group, demo_data, recompute):
    ref = _step(single_process_group, demo_data, "none")
    got = _step(single_process_group, demo_data, recompute)
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    assert got[1] == pytest.approx(ref[1], rel=1e-5)
    # ... and recompute did happen: the recomputed part ran forward again in backward (2 micro batches)
    assert ref[2] == {"layer": 2, "core_attention": 2}
    assert got[2] == ({"layer": 4, "core_attention": 4} if recompute == "full" else {"layer": 2, "core_attention": 4})



def test_kernels_line_is_read_off_the_built_model(single_process_group):
    """The start-up kernels line names what the model runs per batching mode: here the local
    spec with torch SDPA attention, none of the CUDA fusions; a flash-enabled attention module
    runs flash-attn only for packed batches on CUDA (dynamic padding goes to causal SDPA)."""
    import dataclasses

    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks, kernels_line
    from megatron_mft.model.specs import attention_kernel
    from megatron_mft.training.parallel import init_parallel

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2"])
    init_parallel(cfg.parallel, single_process_group, seed=1)
    chunks = build_model_chunks(cfg.model, cfg.parallel, single_process_group)
    line = kernels_line(chunks, single_process_group, packed=True)
    assert line.endswith("kernels: torch SDPA (packed, causal per document) attention, torch RoPE tables, "
                         "torch SwiGLU in megatron's fused slot"), line
    line = kernels_line(chunks, single_process_group, packed=False)
    assert line.endswith("kernels: torch SDPA (dynamic padding, causal) attention, torch RoPE tables, "
                         "torch SwiGLU in megatron's fused slot"), line
    attn = chunks[0].decoder.layers[0].self_attention.core_attention
    attn.use_flash = True  # as built where flash-attn is importable
    gpu = dataclasses.replace(single_process_group, cuda=True)
    assert attention_kernel(attn, True, gpu) == "flash-attn varlen (packed)"
    assert attention_kernel(attn, False, gpu) == "torch SDPA (dynamic padding, causal)"
