"""run_scripts/: syntax, DRY_RUN launch commands, layouts that fit, and the requeue path."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mft.config import load_config
from megatron_mft.launch.env import default_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "run_scripts").glob("*.sh") if p.name != "common.sh")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT", "HF_DIR", "CKPT", "DATA_DIR",
                                                       "OUTPUT_DIR", "EXTRA_ARGS", "SRUN_ARGS", "REPO_ROOT")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def sbatch_opts(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), re.M))


def dry_run(script: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env=clean_env(DRY_RUN="1", **extra))


def launched(stdout: str) -> list[str]:
    line = next(l for l in stdout.splitlines() if l.startswith("+ "))
    return shlex.split(line[2:])


def test_there_are_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"codellama34b_full.sh", "codellama34b_lora.sh", "codellama34b_qlora.sh", "codellama34b_qlora_1gpu.sh",
            "llama2_70b_qlora.sh", "llama2_70b_qlora_1gpu.sh", "codellama34b_pretrain.sh", "tiny_cpu.sh"} <= names


@pytest.mark.parametrize("script", sorted((ROOT / "run_scripts").glob("*.sh")), ids=lambda p: p.name)
def test_bash_syntax(script):
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def existing_paths(tmp_path: Path) -> dict[str, str]:
    """DATA_DIR and CKPT that exist: a dry run checks them (the scripts' defaults are cluster paths)."""
    for name in ("data", "ckpt"):
        (tmp_path / name).mkdir(exist_ok=True)
    return {"DATA_DIR": str(tmp_path / "data"), "CKPT": str(tmp_path / "ckpt")}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_dry_run_prints_a_launch_that_fits(script, tmp_path):
    opts = sbatch_opts(script)
    assert opts.get("signal", "").startswith("USR1@") and "requeue" in opts
    nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
    if script.name == "tiny_cpu.sh":  # the CPU script: one core per task
        assert "gpus-per-node" not in opts and opts["cpus-per-task"] == "1"
    else:
        assert int(opts["gpus-per-node"]) == per_node  # one task per GPU

    run = dry_run(script, **existing_paths(tmp_path))
    assert run.returncode == 0, run.stderr
    cmd = launched(run.stdout)
    assert cmd[0] == "srun" and "megatron_mft.train" in cmd
    assert f"--nodes={nodes}" in cmd and f"--ntasks-per-node={per_node}" in cmd
    recipe = Path(cmd[cmd.index("--config") + 1])
    assert recipe.is_file() and recipe.parent == ROOT / "examples"
    assert re.search(rf"^mft_launch examples/{recipe.name}\b", script.read_text(), re.M)
    hosts = "node01" if nodes == 1 else f"node[01-{nodes:02d}]"
    # the shell's port formula agrees with the Python one (megatron_mft.launch.env.default_port)
    assert f"on {hosts}; rendezvous node01:{default_port('12345')}" in run.stdout

    overrides = cmd[cmd.index("--config") + 2:]
    assert any(o.startswith("output_dir=") for o in overrides) and any(o.startswith("data.path=") for o in overrides)
    cfg = load_config(recipe, overrides)  # the resolved run validates
    world = nodes * per_node
    model_parallel = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    assert world % model_parallel == 0, f"{world} GPUs do not divide into tp x pp x cp = {model_parallel}"
    dp = world // model_parallel
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0
    assert cfg.parallel.tp <= per_node  # tensor parallelism stays inside a node


def test_dry_run_paths_node_list_and_overrides(tmp_path):
    script = ROOT / "run_scripts" / "codellama34b_full.sh"
    d, hf = tmp_path / "d", tmp_path / "hf"
    d.mkdir()
    hf.mkdir()
    run = dry_run(script, SLURM_JOB_NODELIST="gpu[007-008,010],gpu012", SLURM_JOB_ID="123456", DATA_DIR=str(d),
                  OUTPUT_DIR="/o", HF_DIR=str(hf), EXTRA_ARGS="train.steps=3 seed=9")
    assert run.returncode == 0, run.stderr
    cmd = launched(run.stdout)
    assert "rendezvous gpu007:13456" in run.stdout
    assert ["output_dir=/o", f"data.path={d}", f"model.hf_init={hf}"] == cmd[cmd.index("--config") + 2:][:3]
    assert cmd[-2:] == ["train.steps=3", "seed=9"]
    assert not any(a.startswith("train.init_checkpoint=") for a in cmd)


@pytest.mark.parametrize("missing", [["DATA_DIR"], ["CKPT"], ["DATA_DIR", "HF_DIR"]])
def test_dry_run_checks_the_paths_the_job_would_check(tmp_path, missing):
    """DRY_RUN is the check to run before submitting: a missing DATA_DIR / CKPT / HF_DIR fails it
    (exit 1, each missing path named as the job names it), after the command is printed."""
    paths = {**existing_paths(tmp_path), "HF_DIR": ""}
    for name in missing:
        paths[name] = str(tmp_path / f"no_{name.lower()}")
    run = dry_run(ROOT / "run_scripts" / "codellama34b_lora.sh", **paths)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert [line for line in run.stderr.splitlines() if line.startswith("not found: ")] == [
        f"not found: {paths[name]} (DATA_DIR / CKPT / HF_DIR)" for name in missing]
    assert launched(run.stdout)[0] == "srun"  # the command is still shown


def test_dry_run_with_an_unconfigured_scontrol(tmp_path):
    """SLURM's client installed without a configuration (a laptop, a container, CI before the
    cluster fixture starts): `scontrol show hostnames` fails, the Python expander answers."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/bash\necho 'scontrol: fatal: Could not establish a configuration source' >&2\nexit 1\n")
    fake.chmod(0o755)
    run = dry_run(ROOT / "run_scripts" / "tiny_cpu.sh", PATH=f"{tmp_path}:{os.environ['PATH']}",
                  SLURM_JOB_NODELIST="cpu[3-4]")
    assert run.returncode == 0, run.stderr
    assert f"on cpu[3-4]; rendezvous cpu3:{default_port('12345')}" in run.stdout


def test_refuses_to_launch_outside_slurm():
    run = subprocess.run(["bash", str(SCRIPTS[0])], capture_output=True, text=True, timeout=60, env=clean_env())
    assert run.returncode != 0 and "not inside a SLURM job" in run.stderr


FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
echo "MASTER=$MASTER_ADDR:$MASTER_PORT STOP=$MFT_STOP_FILE" >> "$FAKE_LOG"
[[ -n $FAKE_REASON ]] && echo "$FAKE_REASON" > "$MFT_STOP_FILE"
exit ${FAKE_RC:-0}
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show ]]; then echo first-host; echo second-host; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""


@pytest.mark.parametrize("reason, rc, requeued", [
    ("SIGUSR1", 0, True), ("exit_duration", 0, True), ("SIGTERM", 0, False), ("", 0, False), ("SIGUSR1", 3, False),
])
def test_batch_step_requeues_after_an_early_stop(tmp_path, reason, rc, requeued):
    """Inside a (simulated) allocation: srun runs, and the stop reason decides the requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "data").mkdir()
    (tmp_path / "ckpt").mkdir()
    log = tmp_path / "log"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_REASON=reason, FAKE_RC=str(rc),
                    SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8",
                    SLURM_JOB_NODELIST="n[1-2]", DATA_DIR=str(tmp_path / "data"), CKPT=str(tmp_path / "ckpt"),
                    OUTPUT_DIR=str(tmp_path / "out"))
    run = subprocess.run(["bash", str(ROOT / "run_scripts" / "codellama34b_full.sh")], capture_output=True,
                         text=True, timeout=60, env=env)
    assert run.returncode == rc, run.stderr
    lines = log.read_text().splitlines()
    assert lines[0].startswith("srun --nodes=2 --ntasks-per-node=8")
    assert lines[1] == f"MASTER=first-host:{10000 + 4242} STOP={tmp_path / 'out' / '.stop_reason.4242'}"
    assert (["scontrol requeue 4242"] if requeued else []) == lines[2:]
    assert not (tmp_path / "out" / ".stop_reason.4242").exists()


def test_missing_data_fails_before_srun(tmp_path):
    env = clean_env(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="8",
                    DATA_DIR=str(tmp_path / "missing"), OUTPUT_DIR=str(tmp_path / "out"), CKPT="",
                    PATH=f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "srun").write_text("#!/bin/bash\nexit 99\n")
    (tmp_path / "srun").chmod(0o755)
    run = subprocess.run(["bash", str(ROOT / "run_scripts" / "codellama34b_lora.sh")], capture_output=True,
                         text=True, timeout=60, env=env)
    assert run.returncode == 1 and "not found:" in run.stderr


def test_in_a_job_without_srun_or_a_node_list_says_which(tmp_path):
    """Inside a job (SLURM_JOB_ID set) on a machine without srun: one message naming srun, before
    OUTPUT_DIR is created (was bash's 'srun: command not found', exit 127, after it); without a node
    list or MASTER_ADDR: the message naming both (was 'node list is empty')."""
    bin_dir = tmp_path / "bin"  # the usual tools, but no srun / scontrol
    bin_dir.mkdir()
    for tool in ("sed", "cat", "rm", "mkdir", "dirname", "tail", "head", "hostname", "grep", "date", "cut", "tr"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    (tmp_path / "data").mkdir()
    (tmp_path / "ckpt").mkdir()
    base = dict(SLURM_JOB_ID="77", DATA_DIR=str(tmp_path / "data"), CKPT=str(tmp_path / "ckpt"),
                OUTPUT_DIR=str(tmp_path / "out"))
    script = str(ROOT / "run_scripts" / "codellama34b_lora.sh")
    no_srun = subprocess.run([shutil.which("bash"), script], capture_output=True, text=True, timeout=60,
                             env=clean_env(PATH=str(bin_dir), SLURM_JOB_NODELIST="n1", **base))
    assert no_srun.returncode == 1 and "srun: command not found on" in no_srun.stderr, no_srun.stderr
    assert not (tmp_path / "out").exists()
    no_nodes = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60, env=clean_env(**base))
    assert no_nodes.returncode == 1, no_nodes.stderr
    assert "no master address: SLURM_JOB_NODELIST is empty and MASTER_ADDR is not set" in no_nodes.stderr
