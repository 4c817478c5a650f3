"""Run the real training CLI (single process or torchrun on gloo) and read its metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_cpu.yaml"
#: steps of the session's reference run (conftest ``reference_run``); 4, so that the resume tests
#: can stop or break a save in the middle of it
REFERENCE_STEPS = 4


def torchrun(nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local processes. ``--standalone``: the
    agent binds its store on port 0 and hands that port to the workers as MASTER_PORT, so two
    launches can never pick the same port (a port chosen here and released before torchrun
    bound it could be taken in between by another launch: EADDRINUSE, a flaky test)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
            "--nproc_per_node", str(nproc)]


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = str(threads)
    e.pop("MFT_STOP_FILE", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_command(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        head = [sys.executable, "-m", "megatron_mft.train"]
    else:
        head = torchrun(nproc) + ["-m", "megatron_mft.train"]
    return head + ["--config", str(CONFIG)] + overrides


def run_train(overrides: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    e = env(threads=1 if nproc > 1 else 2)
    e.update(extra_env or {})
    proc = subprocess.run(train_command(overrides, nproc), cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_many(runs: dict, spec_dir: Path, nproc: int = 1) -> tuple[subprocess.Popen, dict]:
    """Start training runs ``runs`` (name -> CLI argv, or ``{"argv": [...], "rc": N}``) one after
    the other in one process (or one torchrun of ``nproc``) through tests/train_many.py, which
    checks each exit code: start-up is paid once. Output goes to files in ``spec_dir`` (pipes
    would stall a launch while another is waited for). :func:`wait_many` collects it."""
    spec_dir = Path(spec_dir)
    (spec_dir / "runs.json").write_text(json.dumps(
        [{**r, "argv": _with_config(r["argv"])} if isinstance(r, dict) else _with_config(r) for r in runs.values()]))
    head = [sys.executable] if nproc == 1 else torchrun(nproc)
    with open(spec_dir / "stdout.txt", "w") as out, open(spec_dir / "stderr.txt", "w") as err:
        proc = subprocess.Popen(head + [str(ROOT / "tests" / "train_many.py"), str(spec_dir / "runs.json")], cwd=ROOT,
                                env=env(1 if nproc > 1 else 2), stdout=out, stderr=err, text=True)
    return proc, {"runs": runs, "dir": spec_dir}


def wait_many(launch: tuple[subprocess.Popen, dict], timeout: int = 1200) -> dict[str, tuple[str, str]]:
    """name -> (stdout, stderr) of each run of a :func:`start_many` launch; raises with the log
    if one failed (or the launch ran past ``timeout`` seconds: then it is killed)."""
    proc, info = launch
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = ((info["dir"] / f).read_text(errors="replace") for f in ("stdout.txt", "stderr.txt"))
    if proc.returncode:
        raise AssertionError(f"train_many exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return {name: (_run_log(stdout, i), _run_log(stderr, i)) for i, name in enumerate(info["runs"])}


def _run_log(text: str, index: int) -> str:
    """Run ``index``'s part of a train_many log: every chunk under its ``=== run`` header (under
    torchrun each rank prints the headers, and the ranks' chunks interleave)."""
    parts = re.split(r"^=== run (\d+): .*$", text, flags=re.M)
    return "".join(chunk for i, chunk in zip(parts[1::2], parts[2::2]) if int(i) == index)


def run_many(runs: dict, spec_dir: Path, nproc: int = 1, timeout: int = 1200) -> dict[str, tuple[str, str]]:
    """:func:`start_many` and :func:`wait_many`: the runs' (stdout, stderr) by name."""
    return wait_many(start_many(runs, spec_dir, nproc), timeout)


def _with_config(argv: list[str]) -> list[str]:
    """The CLI's argv: ``--config`` examples/tiny_cpu.yaml (as :func:`train_command`) unless given."""
    return argv if "--config" in argv else ["--config", str(CONFIG), *argv]


def read_metrics(output_dir: str | Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(output_dir: str | Path) -> dict[int, dict]:
    """step -> the training record of that step (last one wins, as after a resume)."""
    return {r["step"]: r for r in read_metrics(output_dir) if "loss" in r}


def preprocess_demo(out: Path, seq_length: int = 1024) -> Path:
    """The whole bundled demo set through the preprocessing CLI (best-fit packs)."""
    from data_fixtures import DEMO_RAW, cli_args, run_cli

    proc = run_cli(*cli_args(DEMO_RAW, out, seq_length, "best-fit", "--overlong", "drop", "--workers", "2"),
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def init_weights(out: Path, overrides: list[str] | None = None) -> Path:
    subprocess.run([sys.executable, "-m", "megatron_mft.checkpoint", "init", "--config", str(CONFIG), "--out",
                    str(out)] + (overrides or []), check=True, cwd=ROOT, env=env(2), capture_output=True)
    return out
