"""Training and conversion guards (issue 13): a non-finite loss / grad norm skips the update and
stops the run without a checkpoint, export refuses non-finite weights, a failed conversion
leaves no partial output, one run per output_dir (lock with stale detection), SIGINT saves and
exits (a second exits at once), `checkpoint init` refuses a non-empty folder."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_hf_fixtures import make_hf_model
from train_helpers import CONFIG, ROOT, env, read_metrics, run_train


# ------------------------------------------------------------------ non-finite guard
def _engine(env_, data_path):
    from megatron_mft.config import load_config
    from megatron_mft.data import MFTData
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_mft.training.parallel import init_parallel
    from megatron_mft.training.step import StepContext, install_grad_finalizer

    cfg = load_config(CONFIG, [f"data.path={data_path}", "data.source=offline", "data.seq_length=512",
                               "model.num_layers=2"])
    init_parallel(cfg.parallel, env_, seed=11)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.parallel, env_), cfg)
    install_grad_finalizer(chunks)
    opt = build_optimizer(chunks, cfg)
    data = MFTData(cfg.data, seed=0, micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1)
    ctx = StepContext(loss_cfg=cfg.loss, task_names=data.task_names, device=torch.device("cpu"), packed=True)
    return chunks, opt, build_scheduler(opt, cfg, 10), data, ctx


def _params(chunks) -> dict:
    return {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}


def test_nonfinite_step_skips_the_update_and_a_finite_one_equals_megatrons_step(single_process_group, demo_data,
                                                                                monkeypatch):
    from megatron_mft.training import step as step_mod

    chunks, opt, sched, data, ctx = _engine(single_process_group, demo_data)
    with torch.no_grad():
        chunks[0].module.decoder.final_layernorm.weight[0] = float("nan")  # a diverged weight
    before, lr_steps = _params(chunks), sched.num_steps
    out = step_mod.train_step(chunks, opt, sched, data.train_micro_batches(0), ctx)
    after = _params(chunks)
    for n in before:  # nothing was updated: without the guard every weight becomes NaN
        assert torch.equal(before[n].nan_to_num(), after[n].nan_to_num()), n
    assert out["nonfinite"] and not out["update_ok"] and out["loss"] != out["loss"]
    assert sched.num_steps == lr_steps  # as Megatron-LM: a skipped step does not advance the schedule

    # a finite step through the guard is megatron's own optimizer.step(), bit for bit
    got_chunks, got_opt, got_sched, _, _ = _engine(single_process_group, demo_data)
    got = step_mod.train_step(got_chunks, got_opt, got_sched, data.train_micro_batches(0), ctx)
    monkeypatch.setattr(step_mod, "step_if_finite", lambda o, loss_finite: (*o.step()[:2], False))
    ref_chunks, ref_opt, ref_sched, _, _ = _engine(single_process_group, demo_data)
    ref = step_mod.train_step(ref_chunks, ref_opt, ref_sched, data.train_micro_batches(0), ctx)
    assert got["update_ok"] and not got["nonfinite"] and got["grad_norm"] == ref["grad_norm"]
    a, b = _params(got_chunks), _params(ref_chunks)
    assert all(torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], before[n]) for n in a)


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    from megatron_mft.config import load_config
    from megatron_mft.errors import UserError
    from megatron_mft.training.recipe import Recipe

    r = Recipe(load_config(None, ["data.path=/x", "train.max_nonfinite_steps=2"]))
    r.ckpt_root = tmp_path
    bad, good = {"nonfinite": True, "loss": float("nan"), "grad_norm": float("nan")}, {"nonfinite": False}
    for out in (bad, bad, good, bad, bad):  # a finite step resets the count
        r._check_finite(out)
    with pytest.raises(UserError, match=r"3 such step\(s\) in a row, train.max_nonfinite_steps=2"):
        r._check_finite(bad)


def test_nonfinite_weights_are_never_saved(tiny_model, tmp_path):
    from megatron_mft.config import load_config
    from megatron_mft.errors import UserError
    from megatron_mft.training.recipe import Recipe

    model, _ = tiny_model
    with torch.no_grad():
        model.decoder.final_layernorm.weight[1] = float("inf")
    r = Recipe(load_config(None, ["data.path=/x"]))
    r.chunks, r.device, r.step, r.ckpt_root = [model], torch.device("cpu"), 7, tmp_path / "checkpoints"
    with pytest.raises(UserError, match="step 7: the weights hold NaN/inf; not saving"):
        r.save()
    assert not r.ckpt_root.exists()


@pytest.fixture(scope="module")
def nan_init(tp1_env, tiny_init, tmp_path_factory):
    """The tiny CLI model's initial weights with one NaN: a run that diverged."""
    from megatron.core import dist_checkpointing

    from megatron_mft.checkpoint.dist import load_model_weights, model_sharded_state_dict
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel

    cfg = load_config(CONFIG, [])
    init_parallel(cfg.parallel, tp1_env, cfg.seed)
    chunks = build_model_chunks(cfg.model, cfg.parallel, tp1_env)
    load_model_weights(tiny_init, chunks)
    with torch.no_grad():
        chunks[0].decoder.layers[1].mlp.linear_fc2.weight[0, 0] = float("nan")
    out = tmp_path_factory.mktemp("nan_init") / "ckpt"
    out.mkdir()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(out))
    return out


def test_train_stops_at_a_nonfinite_loss_without_saving(nan_init, tmp_path, train_overrides):
    out = tmp_path / "run"
    p = run_train(train_overrides + [f"train.init_checkpoint={nan_init}", "train.steps=3", "train.save_interval=1",
                                     f"output_dir={out}"], check=False, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "step 1: non-finite loss nan" in p.stderr
    assert "train.max_nonfinite_steps=0" in p.stderr and "No checkpoint was saved" in p.stderr
    assert not list((out / "checkpoints").glob("step_*"))  # never a non-finite checkpoint


# ------------------------------------------------------------------ conversions
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "tiny")


def test_export_refuses_nonfinite_weights_and_leaves_nothing(tp1_env, tiny_hf, tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_mft.checkpoint.hf.families import ConversionError
    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore
    from megatron_mft.checkpoint.hf.mcore_to_hf import export_to_hf

    model = LlamaForCausalLM.from_pretrained(tiny_hf)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 2] = float("inf")
    model.save_pretrained(tmp_path / "hf_inf", max_shard_size="40KB")
    convert_hf_to_mcore(tmp_path / "hf_inf", tmp_path / "ckpt", log=lambda s: None)
    out = tmp_path / "exported"
    with pytest.raises(ConversionError) as err:
        export_to_hf(tmp_path / "ckpt", out, max_shard_size="30KB", log=lambda s: None)
    assert "non-finite" in str(err.value) and "decoder.layers.1.mlp.linear_fc2.weight: 0 NaN and 1 inf" in str(err.value)
    assert not out.exists() and not (tmp_path / ".exported.partial").exists()


def test_failed_conversion_leaves_no_partial_output_and_the_retry_works(tp1_env, tiny_hf, tmp_path, monkeypatch):
    from megatron_mft.checkpoint.hf import source
    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore

    real_get, calls = source.HFSource.get, []

    def failing_get(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(f"simulated read failure at {name}")
        return real_get(self, name)

    out = tmp_path / "ckpt"
    monkeypatch.setattr(source.HFSource, "get", failing_get)
    with pytest.raises(BaseException, match="simulated"):  # dcp wraps it in its CheckpointException
        convert_hf_to_mcore(tiny_hf, out, log=lambda s: None)
    assert not out.exists() and not (tmp_path / ".ckpt.partial").exists()
    monkeypatch.setattr(source.HFSource, "get", real_get)
    convert_hf_to_mcore(tiny_hf, out, log=lambda s: None)  # the retry is not blocked
    assert (out / "conversion.json").is_file() and not (tmp_path / ".ckpt.partial").exists()


def test_checkpoint_init_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "trained_step"
    out.mkdir()
    (out / "weights.distcp").write_text("precious")
    p = subprocess.run([sys.executable, "-m", "megatron_mft.checkpoint", "init", "--config", str(CONFIG), "--out",
                        str(out)], cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "non-empty folder" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert [f.name for f in out.iterdir()] == ["weights.distcp"] and (out / "weights.distcp").read_text() == "precious"


@pytest.mark.parametrize("overrides", [[], ["model.activation=gelu_tanh", "model.normalization=LayerNorm",
                                            "model.linear_bias=true"], ["model.num_experts=4", "model.moe_top_k=2"]],
                         ids=["swiglu", "gelu", "moe"])
def test_checkpoint_init_memory_estimate_counts_the_built_model(tp1_env, overrides):
    """The estimate's parameter and SwiGLU fc1 counts (the save's extra copy) are the built model's."""
    from megatron_mft.checkpoint.__main__ import RUNTIME_BYTES, init_memory
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2"] + overrides)
    (chunk,) = build_model_chunks(cfg.model, cfg.parallel, tp1_env)
    need = init_memory(cfg.model.arch(), 4)
    assert need["params"] == sum(p.numel() for p in chunk.parameters())
    fc1 = sum(p.numel() for n, p in chunk.named_parameters() if "linear_fc1.weight" in n)
    assert need["fc1"] == (0 if overrides[:1] == ["model.activation=gelu_tanh"] else fc1)
    largest = max(p.numel() for p in chunk.parameters())
    assert need["largest"] == largest == 2048 * 128  # the embedding
    assert need["bytes"] == RUNTIME_BYTES + 4 * need["params"] + max(4 * need["fc1"], 8 * largest)


def test_checkpoint_init_memory_estimate_of_codellama_34b():
    from megatron_mft.checkpoint.__main__ import init_memory
    from megatron_mft.config.presets import PRESETS

    need = init_memory(PRESETS["codellama-34b"], 4)
    assert need["params"] == 33_743_970_304 and need["fc1"] == 48 * 2 * 22016 * 8192
    assert round(need["bytes"] / 2**30, 1) == 191.0  # 125.7 GiB of fp32 weights + 64.5 GiB fc1 copy + runtime


@pytest.mark.parametrize("margin, flag, refused", [(-1, [], True), (0, [], False), (-2**30, ["--skip-memory-check"], False)],
                         ids=["short-by-a-byte", "just-enough", "skip-check"])
def test_checkpoint_init_refuses_a_model_larger_than_available_memory(tp1_env, tmp_path, monkeypatch, capsys,
                                                                     margin, flag, refused):
    """The kernel's OOM killer gave no message (a 34B preset on a CPU machine): now the numbers and the
    way out, before anything is built or created; with enough memory (or the flag) the weights are written."""
    import megatron_mft.compat
    import megatron_mft.training.parallel
    from megatron_mft.checkpoint.__main__ import init_memory, main
    from megatron_mft.config import load_config

    need = init_memory(load_config(CONFIG).model.arch(), 4)["bytes"]
    monkeypatch.setattr(megatron_mft.compat, "available_memory", lambda: max(need + margin, 2**20))
    monkeypatch.setattr(megatron_mft.training.parallel, "teardown", lambda: None)  # keep the session's group
    out = tmp_path / "init"
    code = main(["init", "--config", str(CONFIG), "--out", str(out)] + flag)
    err = capsys.readouterr().err
    if not refused:
        assert code == 0 and (out / "init.json").is_file() and "Traceback" not in err, err
        return
    assert code == 1 and not out.exists(), err
    gib = f"{need / 2**30:.1f} GiB"
    for needle in (f"--config {CONFIG}", "model preset tiny", "4-byte weights", f"needs about {gib}",
                   f"but {(need - 1) / 2**30:.1f} GiB is available", "more free memory", "hf-to-mcore",
                   "--skip-memory-check"):
        assert needle in err, (needle, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err


def _fake_host(tmp_path: Path, cgroup_line: str, files: dict[str, str]) -> tuple[str, str]:
    """A /proc (MemAvailable 64 GiB) and a /sys/fs/cgroup tree with ``files`` (path -> text)."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {128 * 2**20} kB\nMemAvailable: {64 * 2**20} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(proc), str(root)


def test_available_memory_is_the_room_under_the_tightest_cgroup_limit(tmp_path):
    """MemAvailable is the whole host's: a SLURM job (--mem, ConstrainRAMSpace) or a container is
    killed at its cgroup's limit long before. The room is limit - usage + reclaimable page cache, the
    least over the process's cgroup and its ancestors; 'no limit' leaves MemAvailable."""
    from megatron_mft.compat.probe import available_memory

    GiB = 2**30
    v2 = {"job/memory.max": f"{100 * GiB}\n", "job/memory.current": f"{30 * GiB}\n",
          "job/memory.stat": f"anon 1\ninactive_file {2 * GiB}\n",
          "job/step/memory.max": "max\n", "job/step/memory.current": f"{29 * GiB}\n"}
    assert available_memory(*_fake_host(tmp_path / "a", "0::/job/step", v2)) == 64 * GiB  # 72 GiB of room
    v2["job/memory.max"] = f"{40 * GiB}\n"
    assert available_memory(*_fake_host(tmp_path / "b", "0::/job/step", v2)) == 12 * GiB  # 40 - 30 + 2
    v1 = {"memory/slurm/uid_0/job_7/memory.limit_in_bytes": f"{16 * GiB}\n",
          "memory/slurm/uid_0/job_7/memory.usage_in_bytes": f"{10 * GiB}\n",
          "memory/slurm/uid_0/job_7/memory.stat": f"cache 5\ntotal_inactive_file {GiB}\n",
          "memory/slurm/memory.limit_in_bytes": "9223372036854771712\n",
          "memory/slurm/memory.usage_in_bytes": f"{50 * GiB}\n"}
    host = _fake_host(tmp_path / "c", "4:memory:/slurm/uid_0/job_7\n3:cpu:/", v1)
    assert available_memory(*host) == 7 * GiB
    assert available_memory(*_fake_host(tmp_path / "d", "0::/", {})) == 64 * GiB  # no limit files
    assert available_memory(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_checkpoint_init_counts_every_process_of_the_node(monkeypatch):
    """Under torchrun every local rank builds the whole model (init is TP = PP = 1)."""
    import megatron_mft.compat
    from megatron_mft.checkpoint.__main__ import check_memory, init_memory
    from megatron_mft.config import load_config
    from megatron_mft.errors import UserError

    cfg = load_config(CONFIG)
    need = init_memory(cfg.model.arch(), 4)["bytes"]
    monkeypatch.setattr(megatron_mft.compat, "available_memory", lambda: 3 * need)
    check_memory(cfg, "c.yaml", 4, local_processes=3)
    with pytest.raises(UserError, match="4 processes on this node each build the whole model .* run it as one process"):
        check_memory(cfg, "c.yaml", 4, local_processes=4)


# ------------------------------------------------------------------ one run per output_dir
def _write_lock(out: Path, **holder) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None,
                                "started": "2026-01-01T00:00:00", **holder}))
    return lock


def test_run_lock_refuses_live_holders_and_takes_over_dead_ones(tmp_path, monkeypatch):
    from megatron_mft.launch.runlock import RunLock, RunLockError

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock = _write_lock(tmp_path / "a", pid=live.pid)  # a live process on this host holds it
        with pytest.raises(RunLockError, match=f"PID {live.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path / "a").acquire()
    finally:
        live.kill()
        live.wait()
    # a container's next run may get the PID of the crashed one: a lock with our own PID that this
    # process never took is left over
    _write_lock(tmp_path / "e")
    own = RunLock(tmp_path / "e").acquire()
    assert "earlier process with this PID" in own.note
    own.release()
    _write_lock(tmp_path / "b", host="other-node", pid=1)  # cannot be checked from here
    with pytest.raises(RunLockError, match=r"other-node.*delete .*\.run\.lock"):
        RunLock(tmp_path / "b").acquire()

    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path / "c", pid=dead.pid)
    taken = RunLock(tmp_path / "c").acquire()
    assert "no longer running" in taken.note and json.loads((tmp_path / "c" / ".run.lock").read_text())["pid"] == os.getpid()
    taken.release()
    assert not (tmp_path / "c" / ".run.lock").exists()

    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued job on another node: its earlier run is gone
    _write_lock(tmp_path / "d", host="other-node", pid=1, slurm_job_id="4242")
    assert "SLURM job 4242" in RunLock(tmp_path / "d").acquire().note
    assert lock.is_file()  # nobody removed a live holder's lock (nor a dead one's it did not take over)


def test_second_run_on_an_output_dir_is_refused(tmp_path, train_overrides):
    out = tmp_path / "busy"
    lock = _write_lock(out)  # held by this (live) test process
    p = run_train(train_overrides + [f"output_dir={out}", "train.steps=1"], check=False, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "in use by another run" in p.stderr and f"PID {os.getpid()}" in p.stderr and "Traceback" not in p.stderr
    assert sorted(f.name for f in out.iterdir()) == [".run.lock"] and lock.is_file()


# ------------------------------------------------------------------ SIGINT
SIGINT_SCRIPT = """
import os, signal, time
from megatron_mft.launch.signals import PreemptionGuard
guard = PreemptionGuard()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("reason", guard.should_stop(), flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""


def test_sigint_is_a_stop_request_and_a_second_one_exits_at_once():
    p = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT], cwd=ROOT, env=env(1), capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.splitlines() == ["reason SIGINT"], p.stdout + p.stderr
    assert p.returncode == 130 and "second SIGINT: exiting now" in p.stderr and "Traceback" not in p.stderr


def test_a_failed_final_rename_keeps_the_finished_conversion(tmp_path, monkeypatch):
    """Only the conversion's own failure removes its .partial; a failed move of a finished one names it."""
    import megatron_mft.checkpoint.hf.hf_to_mcore as h2m
    from megatron_mft.errors import UserError

    out = tmp_path / "ckpt"

    def refuse(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(h2m.os, "replace", refuse)
    with pytest.raises(UserError, match=r"complete in .*\.ckpt\.partial"):
        with h2m.staged_output(out) as tmp:
            (tmp / "weights").write_text("hours of work")
    assert (tmp_path / ".ckpt.partial" / "weights").read_text() == "hours of work" and not out.exists()


# ------------------------------------------------------------------ out of memory
#: torch's CUDA OOM text (torch 2.11, an 80 GB card), as the caching allocator words it
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the "
            "allocated memory 75.02 GiB is allocated by PyTorch, and 1.61 GiB is reserved by PyTorch but "
            "unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
            "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")

OOM_SCRIPT = """
import sys, torch
from torch.distributed.checkpoint.api import CheckpointException
import megatron_mft.training.recipe as recipe
where, text, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
real_step, real_save, calls = recipe.train_step, recipe.save_checkpoint, []
def train_step(*args, **kwargs):
    calls.append(1)
    if where == "step" and len(calls) == 2:
        raise torch.OutOfMemoryError(text)
    return real_step(*args, **kwargs)
def save_checkpoint(*args, **kwargs):  # as torch's distributed checkpoint reports a rank's failure
    raise CheckpointException("save failed", {0: (torch.OutOfMemoryError(text), None)})
recipe.train_step = train_step
if where == "save":
    recipe.save_checkpoint = save_checkpoint
from megatron_mft.train import main
sys.exit(main(argv))
"""


def test_out_of_memory_names_where_and_the_settings_that_lower_memory():
    """Both kinds of torch OOM, read from real errors: the message keeps torch's figures, drops its
    documentation pointer and C++ location, and lists this run's own settings with their values."""
    import torch

    from megatron_mft.config import load_config
    from megatron_mft.errors import is_out_of_memory
    from megatron_mft.training.oom import out_of_memory_error

    full = load_config(CONFIG, ["train.micro_batch_size=4", "train.global_batch_size=8"])
    msg = str(out_of_memory_error(torch.OutOfMemoryError(CUDA_OOM), full, "step 3"))
    lines = msg.splitlines()
    assert lines[0].startswith("out of GPU memory during step 3: CUDA out of memory. Tried to allocate 2.00 GiB. "
                               "GPU 0 has a total capacity of 79.19 GiB")
    assert "expandable_segments:True to avoid fragmentation." in lines[0] and "See documentation" not in msg
    hints = [h.removeprefix("  - ").split(" ")[0] for h in lines[2:]]
    assert hints == ["peft.method=lora", "model.recompute=selective", "train.micro_batch_size=2", "parallel.tp",
                     "data.seq_length"], msg
    assert "(now 4)" in lines[4] and "train.global_batch_size (8)" in lines[4]

    lora = load_config(CONFIG, ["peft.method=lora", "model.recompute=full", "parallel.distributed_optimizer=false"])
    hints = [h.split()[1] for h in str(out_of_memory_error(torch.OutOfMemoryError(CUDA_OOM), lora, "x")).splitlines()[2:]]
    assert hints == ["peft.method=qlora", "parallel.distributed_optimizer=true", "parallel.tp", "data.seq_length"]

    try:  # a real failed host allocation: a RuntimeError with the allocator's C++ location
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as e:
        host = e
    assert is_out_of_memory(host) and not is_out_of_memory(RuntimeError("shape mismatch"))
    first = str(out_of_memory_error(host, full, "start-up")).splitlines()[0]
    assert first == (f"out of host memory during start-up: DefaultCPUAllocator: can't allocate memory: you tried to "
                     f"allocate {2**50} bytes. Error code 12 (Cannot allocate memory).")


@pytest.mark.parametrize("where, said, steps", [("step", "step 2", [1]), ("save", "the checkpoint save of step 3",
                                                                            [1, 2, 3])])
def test_a_run_out_of_memory_ends_with_one_message_and_its_process_group(tmp_path, train_overrides, where, said,
                                                                         steps):
    """An OOM in the second step (as torch raises it on a GPU), or in the final save (wrapped, as
    torch's distributed checkpoint reports a rank's failure: a CheckpointException, which is a
    BaseException), was 'internal error: ... a bug'; now one message with where and the settings,
    exit 1, the lock released."""
    out = tmp_path / "oom"
    argv = ["--config", str(CONFIG), *train_overrides, f"output_dir={out}", "train.steps=3"]
    p = subprocess.run([sys.executable, "-c", OOM_SCRIPT, where, CUDA_OOM, *argv], cwd=ROOT, env=env(2),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.count(f"error: out of GPU memory during {said}: CUDA out of memory. Tried to allocate 2.00 GiB.") == 1
    assert "  - peft.method=lora or qlora (now none)" in p.stderr
    assert not (out / ".run.lock").exists() and [r["step"] for r in read_metrics(out)] == steps


def test_wrapped_and_runtime_out_of_memory_errors_are_recognised():
    """The forms an out-of-memory error reaches the trainer in: torch's class, a rank's failure inside
    a CheckpointException, megatron's checkpoint worker's 'Worker failure: ...' text, the CUDA
    runtime's and cuBLAS' allocation errors; not other errors."""
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_mft.errors import is_out_of_memory, out_of_memory_text

    wrapped = CheckpointException("save failed", {1: (torch.OutOfMemoryError(CUDA_OOM), None)})
    worker = RuntimeError(f"Worker failure: {CUDA_OOM}")
    try:
        try:
            raise torch.OutOfMemoryError(CUDA_OOM)
        except Exception as inner:
            raise ValueError("while loading") from inner
    except ValueError as e:
        chained = e
    for error in (wrapped, worker, chained, RuntimeError("CUDA error: out of memory"),
                  RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")):
        assert is_out_of_memory(error), error
    cycle_a, cycle_b = ValueError("a"), ValueError("b")  # __context__ cycles end; the OOM deep in a chain is found
    cycle_a.__context__, cycle_b.__context__ = cycle_b, cycle_a
    assert not is_out_of_memory(cycle_a)
    deep = torch.OutOfMemoryError(CUDA_OOM)
    for i in range(12):
        outer = ValueError(f"level {i}")
        outer.__cause__ = deep
        deep = outer
    assert is_out_of_memory(deep)
    second = CheckpointException("save failed", {0: (OSError(5, "I/O error"), None), 3: (torch.OutOfMemoryError(CUDA_OOM), None)})
    assert is_out_of_memory(second)  # the failure of any rank, not only the first listed
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(CheckpointException("save failed", {0: (OSError(28, "No space left"), None)}))
    for error in (wrapped, worker):
        first = out_of_memory_text(error, "x", [], "doc").splitlines()[0]
        assert first.startswith("out of GPU memory during x: CUDA out of memory. Tried to allocate 2.00 GiB."), first


def test_teardown_after_an_error_aborts_an_nccl_group_instead_of_waiting(monkeypatch):
    """Other ranks may sit in a collective this rank never joins: destroy_process_group could then
    wait forever, with no message and no exit; after an error an NCCL group is aborted. gloo, and
    any group after a normal end, is destroyed (gloo left up aborts the interpreter at exit)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from megatron_mft.training import parallel

    calls = []
    monkeypatch.setattr(parallel.ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    monkeypatch.setattr(c10d, "_abort_process_group", lambda *a: calls.append("abort"))
    for backend, after_error, want in (("nccl", True, "abort"), ("nccl", False, "destroy"), ("gloo", True, "destroy")):
        monkeypatch.setattr(dist, "get_backend", lambda *a, b=backend: b)
        calls.clear()
        parallel.teardown(after_error=after_error)
        assert calls == [want], (backend, after_error, calls)


def test_humaneval_out_of_memory_names_its_own_options(monkeypatch, capsys, tmp_path):
    """Generation that runs out of memory: one message with evaluate's options for the backend and
    dtype it resolved to (was an internal error), exit 1."""
    import torch

    import megatron_mft.evaluate.__main__ as evaluate

    for error, argv, want, unwanted in (
            (torch.OutOfMemoryError(CUDA_OOM), ["--batch-size", "8", "--dtype", "float32"],
             ["error: out of GPU memory during HumanEval generation: CUDA out of memory. Tried to allocate 2.00 GiB.",
              "--batch-size 4 (now 8)", "--max-new-tokens (now 512)", "--dtype bfloat16 (now float32)",
              "--device cuda:N), or --backend vllm"], ["a machine with more free memory"]),
            (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes."),
             ["--batch-size", "8", "--device", "cpu"],
             ["error: out of host memory during HumanEval generation", "--batch-size 4 (now 8)",
              "--dtype bfloat16 (now auto: float32 on cpu)", "a machine with more free memory, or a GPU"],
             ["cuda:N", "--backend vllm"]),
            (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes."),
             ["--device", "cuda", "--dtype", "bfloat16"],  # a GPU run whose weights did not fit in host memory
             ["error: out of host memory", "a machine with more free host memory (the weights are read into it"],
             ["--dtype bfloat16 (now", "or a GPU (--device cuda)"])):
        def run_humaneval(cfg, error=error):
            raise error

        monkeypatch.setattr(evaluate, "run_humaneval", run_humaneval)
        monkeypatch.setattr("megatron_mft.evaluate.generate.have_vllm", lambda: False)
        code = evaluate.main(["humaneval", "--check-harness", "--max-new-tokens", "512",
                              "--out", str(tmp_path / "r.json"), *argv])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err and "internal error" not in err, err
        for text in want:
            assert text in err, (text, err)
        for text in unwanted:
            assert text not in err, (text, err)
