"""Shared fixtures: one process-wide gloo group (world size 1) with megatron's parallel state."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def single_process_group():
    from megatron_mft.compat import setup_runtime

    env = setup_runtime()
    if not torch.distributed.is_initialized():
        # a store on port 0 binds a free port itself: no port picked, released and raced for
        store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield env
    if torch.distributed.is_initialized():  # gloo aborts at interpreter exit if its group is left up
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tp1_env(single_process_group):
    """Megatron's parallel state at TP=PP=1 over the session group, torn down after the module."""
    from megatron.core import parallel_state as ps

    from megatron_mft.config import ParallelConfig
    from megatron_mft.training.parallel import init_parallel

    init_parallel(ParallelConfig(), single_process_group, 0)
    yield single_process_group
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


@pytest.fixture()
def tiny_model(single_process_group):
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2"])
    init_parallel(cfg.parallel, single_process_group, seed=7)
    model = build_model_chunks(cfg.model, cfg.parallel, single_process_group)[0]
    model.eval()
    return model, cfg.model.arch().vocab_size


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The bundled demo data preprocessed once (seq 512, best-fit packs) for training tests."""
    from train_helpers import preprocess_demo

    return preprocess_demo(tmp_path_factory.mktemp("demo_data") / "packed", seq_length=512)


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory):
    """Initial weights of examples/tiny_cpu.yaml as a dist checkpoint: every layout starts here."""
    from train_helpers import init_weights

    return init_weights(tmp_path_factory.mktemp("tiny_init") / "ckpt")


@pytest.fixture(scope="session")
def train_overrides(demo_data, tiny_init):
    """Overrides that make the tiny CLI run fast and start from identical weights."""
    return ["data.source=offline", f"data.path={demo_data}", "data.seq_length=512",
            f"train.init_checkpoint={tiny_init}", "train.eval_interval=0", "train.save_interval=0"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, train_overrides):
    """One uninterrupted single-process run (packed rows, 4 steps, warmup 1): the reference that
    every layout of test_engine_layouts and every resume of test_engine_resume must reproduce.
    Returns (overrides of that run, {step: metrics record})."""
    from train_helpers import REFERENCE_STEPS, run_train, train_losses

    out = tmp_path_factory.mktemp("reference") / "uninterrupted"
    common = train_overrides + [f"train.steps={REFERENCE_STEPS}", "train.warmup_steps=1", "data.batching=packed"]
    run_train(common + [f"output_dir={out}"])
    return common, train_losses(out)


@pytest.fixture(scope="session")
def tp2_sp_run(tmp_path_factory, reference_run):
    """The reference run at TP=2 + SP under torchrun, saving every step: one of the layouts of
    test_engine_layouts, and the TP=2 checkpoints that test_engine_resume resumes and reloads at
    TP=1 (one launch instead of two). Returns its output_dir."""
    from train_helpers import run_train

    common, _ = reference_run
    out = tmp_path_factory.mktemp("tp2_sp") / "run"
    run_train(common + ["parallel.tp=2", "parallel.sp=true", "train.save_interval=1", f"output_dir={out}"], nproc=2)
    return out


@pytest.fixture(autouse=True)
def _no_debug_switch_leaks(monkeypatch):
    """A command run in-process with ``--debug`` sets MFT_DEBUG=1 in os.environ (so the processes
    it starts inherit it); undo that after each test, or every later CLI test would see tracebacks."""
    monkeypatch.setenv("MFT_DEBUG", "")  # records the prior state (delenv of an absent key does not)
    monkeypatch.delenv("MFT_DEBUG")
