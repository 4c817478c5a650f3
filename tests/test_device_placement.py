"""Device placement as on a GPU, checked on the CPU.

The CPU shim normally turns every CUDA allocation into a CPU one, so a tensor created without a
device looks right here and sits on the host of a GPU machine. In the placement test mode
(``compat.cpu.cuda_redirected_to("meta")``) "the CUDA device" is ``meta`` instead: each model
variant the recipe builds is built and prepared exactly as on CUDA (``use_cpu_initialization=
False``, bf16, DDP, optimizer) and every parameter, buffer, plain tensor attribute (RoPE's
``inv_freq``) and NF4 code must be on ``meta``. A forward and backward on ``meta`` then proves that
nothing in a micro batch's step reads device data back to the host (meta tensors have no data:
``.tolist()``/``.item()`` raise) or mixes host tensors into device kernels.

Pipeline stages are built in one process by answering megatron's first/last-stage questions
(first: embedding, middle: layers only, last: final norm and output layer).

Not covered on the CPU: the Transformer Engine spec (TE allocates on a real GPU: checked where TE
and CUDA exist, and by ``tests/gpu/run_gpu_checks.sh``); vocabulary padding (it pads only at
TP > 1, a multi-process layout; the padded embedding is built by the same megatron code path
checked here); exact focal-task's pre-pass statistics, which are summed over DP and read on the
host once per step.
"""

from __future__ import annotations

import dataclasses
import signal
from functools import partial

import pytest
import torch

VARIANTS = [("none", "sdpa"), ("none", "flash"), ("lora", "sdpa"), ("qlora", "sdpa"), ("qlora", "flash")]
STAGES = {"first": (True, False), "middle": (False, False), "last": (False, True)}


@pytest.fixture(scope="module")
def gpu_like(tp1_env):
    """The environment of a CUDA machine with flash-attn and without TE/apex (what the GPU checks
    run), so the builder takes every CUDA branch."""
    return dataclasses.replace(tp1_env, cuda=True, te=False, flash_attn=True, apex=False,
                               device_name="placement probe (CUDA mapped to meta)")


def _config(method: str, backend: str, extra=()):
    from megatron_mft.config import load_config

    return load_config(None, ["data.path=/unused", "model.num_layers=2", f"model.attention_backend={backend}",
                              f"peft.method={method}", *(["peft.rank=4"] if method != "none" else []), *extra])


def _build(cfg, env, monkeypatch, stage="whole"):
    """What Recipe.setup does to the model (base-weight loading aside): adapter spec, build,
    PEFT prepare (freeze, adapters, NF4), DDP, optimizer."""
    from megatron.core import parallel_state as ps

    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.optimizer import build_optimizer, wrap_ddp
    from megatron_mft.training.step import install_grad_finalizer

    if stage != "whole":
        first, last = STAGES[stage]
        monkeypatch.setattr(ps, "is_pipeline_first_stage", lambda *a, **k: first)
        monkeypatch.setattr(ps, "is_pipeline_last_stage", lambda *a, **k: last)
    layer, plan = None, None
    if cfg.peft.method != "none":
        from megatron_mft.peft import PeftPlan

        plan = PeftPlan(cfg.peft, env)
        layer = plan.layer_spec(cfg.model)
    chunks = build_model_chunks(cfg.model, cfg.parallel, env, layer=layer)
    assert chunks[0].config.use_cpu_initialization is False
    if plan is not None:
        plan.prepare(chunks)
    ddp = wrap_ddp(chunks, cfg)
    install_grad_finalizer(ddp)
    return ddp, build_optimizer(ddp, cfg)


@pytest.mark.parametrize("stage", ["first", "middle", "last"])
@pytest.mark.parametrize("method,backend", VARIANTS)
def test_every_tensor_is_on_the_device(gpu_like, monkeypatch, method, backend, stage):
    from megatron_mft.compat.cpu import cuda_redirected_to
    from megatron_mft.model import misplaced_tensors
    from megatron_mft.model.placement import model_tensors

    with cuda_redirected_to("meta") as device:
        chunks, _ = _build(_config(method, backend), gpu_like, monkeypatch, stage)
        names = [n for n, _ in model_tensors(chunks)]
        assert misplaced_tensors(chunks, device) == []
    # the walk sees what it must (so an empty list above means something)
    assert any(n.endswith("rotary_pos_emb.inv_freq") for n in names)
    assert any(n.endswith("input_layernorm.weight") for n in names)
    assert any(n.endswith("embedding.word_embeddings.weight") for n in names) == (stage == "first")
    assert any(n.endswith("output_layer.weight") for n in names) == (stage == "last")
    assert any(n.endswith("final_layernorm.weight") for n in names) == (stage == "last")
    assert any(n.endswith("linear_qkv.weight.packed") for n in names) == (method == "qlora")
    assert any(n.endswith("lora_A.weight") for n in names) == (method != "none")


@pytest.mark.parametrize("method", ["none", "lora"])
def test_te_spec_placement(tp1_env, monkeypatch, method):
    """The TE spec (TE layers, or PEFT's local layers with TE's final norm) cannot be built on
    ``meta``: TE allocates on the real GPU. Where TE and a GPU exist, check it there."""
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed (it needs CUDA); "
                        "tests/gpu/run_gpu_checks.sh runs the placement check on a GPU")
    if not tp1_env.te:
        pytest.skip("Transformer Engine is installed but not usable here (no CUDA device)")
    from megatron_mft.model import misplaced_tensors

    chunks, _ = _build(_config(method, "te"), tp1_env, monkeypatch)
    assert misplaced_tensors(chunks, torch.device("cuda", torch.cuda.current_device())) == []


def test_flagship_shapes_qlora(gpu_like, monkeypatch):
    """CodeLlama-34B-shaped layers (hidden 8192, GQA 64/8, ffn 22016, vocab 32000), QLoRA: on
    ``meta`` this costs no memory."""
    from megatron_mft.compat.cpu import cuda_redirected_to
    from megatron_mft.model import misplaced_tensors

    cfg = _config("qlora", "sdpa", ["model.preset=codellama-34b"])
    with cuda_redirected_to("meta") as device:
        chunks, _ = _build(cfg, gpu_like, monkeypatch)
        assert chunks[0].module.config.hidden_size == 8192
        assert misplaced_tensors(chunks, device) == []


def test_check_placement_names_the_tensor(tp1_env):
    """The recipe's end-of-setup check fails with the tensor's name and device."""
    from megatron_mft.model import check_placement

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2, device="meta")
            self.norm = torch.nn.LayerNorm(2)

    block = Block()
    with pytest.raises(RuntimeError, match=r"training device meta: norm\.weight on cpu, norm\.bias on cpu$"):
        check_placement([block], torch.device("meta"))
    block.norm.to("meta")
    check_placement([block], torch.device("meta"))


def _micro_batch(b: int, s: int, packed: bool) -> dict:
    """Two samples per row when packed (one per row otherwise), host tensors as the loader gives."""
    from megatron_mft.data.collate import Row, collate

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(b):
        lengths = [s // 2, s - s // 2] if packed else [s - 3]
        samples = [(torch.randint(3, 200, (n,), generator=g).numpy(), torch.ones(n, dtype=torch.uint8).numpy(), 0)
                   for n in lengths]
        rows.append(Row.of(samples))
    return collate(rows, s, pad_id=0)


@pytest.fixture(scope="module")
def meta_lora(gpu_like):
    """A LoRA model built as on CUDA with "CUDA" = meta, for the micro-batch step tests."""
    from megatron_mft.compat.cpu import cuda_redirected_to

    cfg = _config("lora", "sdpa")
    with cuda_redirected_to("meta"):
        chunks, _ = _build(cfg, gpu_like, None)
    # megatron's fused bias-dropout-add / bias-SwiGLU go through torch.compile, which cannot
    # trace meta tensors; their unfused forms run the same data movement
    chunks[0].config.bias_dropout_fusion = chunks[0].config.bias_activation_fusion = False
    chunks[0].config.finalize_model_grads_func = None  # collectives have no meta kernels
    return cfg, chunks


LOSS_MODES = ["token", "sample", "task-token", "task-sample", "focal-sample", "focal-task"]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dynamic"])
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_micro_batch_step_stays_on_the_device(meta_lora, packed, mode):
    """Forward, loss and backward of LoRA micro batches on ``meta``, every loss mode: no host
    read-back of device data (the packed-sequence plan comes from the host batch; RoPE tables,
    masks and loss statistics are built on the device), no host tensor in a device kernel."""
    import dataclasses

    from megatron_mft.compat.cpu import cuda_redirected_to
    from megatron_mft.loss import GlobalBatchStats
    from megatron_mft.training.step import StepContext, _loss_func, run_schedule

    cfg, chunks = meta_lora
    # exact focal-task adds a no-grad pre-pass whose statistics are summed over DP and read on the
    # host once per step (not per micro batch); the one-pass form runs the same per-micro-batch code
    loss_cfg = dataclasses.replace(cfg.loss, mode=mode, focal_task_exact=False)
    with cuda_redirected_to("meta") as device:
        for c in chunks:
            c.zero_grad_buffer()
        mbs = [_micro_batch(2, 64, packed) for _ in range(2)]
        ctx = StepContext(loss_cfg=loss_cfg, task_names=["t"], device=device, packed=packed,
                          task_weights=torch.ones(1, dtype=torch.float64, device=device))
        stats = GlobalBatchStats.gather(mbs, 1, group=None)
        reports = run_schedule(chunks, mbs, ctx, partial(_loss_func, ctx, stats, None), forward_only=False)
        assert len(reports) == 2 and reports[0]["objective"].device == device
        grads = [p.main_grad for c in chunks for p in c.parameters() if p.requires_grad]
        assert grads and all(g.device == device for g in grads)


def test_recipe_setup_names_a_misplaced_tensor(single_process_group, train_overrides, tmp_path, monkeypatch):
    """Recipe.setup ends with the placement check: a frozen norm weight left off the training
    device stops the run there, named, instead of failing in the first kernel."""
    from megatron_mft.config import load_config
    from megatron_mft.training import recipe as recipe_mod

    build = recipe_mod.build_model_chunks

    def build_with_a_stray_norm(*args, **kwargs):
        chunks = build(*args, **kwargs)
        norm = chunks[0].decoder.final_layernorm
        # a weight on another device than the run's stands for "left on the host of a GPU run"
        norm.weight = torch.nn.Parameter(torch.ones_like(norm.weight, device="meta"))
        return chunks

    monkeypatch.setattr(recipe_mod, "build_model_chunks", build_with_a_stray_norm)
    cfg = load_config("examples/tiny_cpu.yaml", [*train_overrides, f"output_dir={tmp_path}",
                                                 "peft.method=lora", "peft.rank=4"])
    # (setup re-initialises megatron's parallel state at this config's TP=PP=1, as tp1_env has it,
    # and leaves the session's process group alone; its preemption guard's handlers are undone)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        with pytest.raises(RuntimeError, match=r"not on the training device cpu: "
                                               r"module\.decoder\.final_layernorm\.weight on meta$"):
            recipe_mod.Recipe(cfg).setup()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("method", ["none", "qlora"])
def test_hf_init_keeps_weights_on_the_device(gpu_like, monkeypatch, tmp_path, method):
    """``model.hf_init`` (and ``convert verify``) fill a model built as on CUDA: the loaders copy
    into the device tensors (QLoRA: quantise each arriving shard on the device), never swap in a
    host tensor."""
    import dataclasses

    from test_hf_fixtures import make_hf_model

    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.compat.cpu import cuda_redirected_to
    from megatron_mft.model import build_model_chunks, misplaced_tensors

    hf_dir = make_hf_model(tmp_path / "hf")
    cfg = _config(method, "sdpa")
    model_cfg = dataclasses.replace(model_config_from_hf(read_hf_config(hf_dir)), attention_backend="sdpa")
    with cuda_redirected_to("meta") as device:
        layer, plan = None, None
        if method != "none":
            from megatron_mft.peft import PeftPlan

            plan = PeftPlan(cfg.peft, gpu_like)
            layer = plan.layer_spec(model_cfg)
        chunks = build_model_chunks(model_cfg, cfg.parallel, gpu_like, layer=layer)
        load_hf_into_chunks(hf_dir, chunks, model_cfg, cfg.parallel)
        if plan is not None:
            plan.prepare(chunks)
        assert misplaced_tensors(chunks, device) == []
    from megatron_mft.model.placement import model_tensors

    names = [n for n, _ in model_tensors(chunks)]
    assert any(n.endswith("linear_fc1.weight.packed") for n in names) == (method == "qlora")
