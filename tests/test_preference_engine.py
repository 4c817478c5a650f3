"""The preference stages through the real training CLI on the demo pairs.

- DPO with LoRA (reference = adapters disabled): the first step's loss is exactly log 2 (policy
  = reference), the same run split into 1 or 2 rows per micro batch gives the same losses, and
  TP=2 / PP=2 give the single-process losses and rewards (torchrun, gloo).
- ORPO: DP=2 equals the single-process run.
- DPO full fine-tuning: the reference pre-pass is stored under data.path/_reference_logps keyed by
  the starting checkpoint; at step 1 the policy equals it (loss log 2, rewards 0), and a resumed
  run reads it back.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import ROOT, env, free_port, train_losses

#: end-to-end CLI runs (minutes on 2 shared cores): all slow, they still run in CI
pytestmark = pytest.mark.slow
CONFIG = ROOT / "examples" / "tiny_cpu_dpo.yaml"
STEPS = 3


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """The first 6 demo pairs of each task (online tokenisation at start-up is then instant)."""
    root = tmp_path_factory.mktemp("pairs")
    src = ROOT / "examples/demo_data/preference"
    for task in sorted(p.name for p in src.iterdir()):
        (root / task).mkdir()
        for split, n in (("train", 6), ("val", 1)):
            lines = (src / task / f"{split}.jsonl").read_text().splitlines()[:n]
            (root / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _run(overrides, nproc=1, check=True):
    head = [sys.executable, "-m", "megatron_mft.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "megatron_mft.train"]
    proc = subprocess.run(head + ["--config", str(CONFIG)] + overrides, cwd=ROOT, env=env(1 if nproc > 1 else 2),
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _overrides(pairs_dir, tiny_init, out, *extra):
    return [f"data.path={pairs_dir}", "data.seq_length=512", f"train.init_checkpoint={tiny_init}",
            f"train.steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=1", "train.warmup_steps=0",
            "train.save_interval=0", f"output_dir={out}", *extra]


KEYS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm")


def _close(a, b, rel=1e-5):
    """Rewards are beta x differences of ~1e3-sized fp32 log-prob sums: compared at 1e-7 of those."""
    for step in range(1, STEPS + 1):
        for k in KEYS:
            tol = 2e-5 if k.startswith("rewards/") else 1e-6
            assert a[step][k] == pytest.approx(b[step][k], rel=rel, abs=tol), (step, k, a[step][k], b[step][k])


@pytest.fixture(scope="module")
def dpo_single(pairs_dir, tiny_init, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo1")
    _run(_overrides(pairs_dir, tiny_init, out))
    return train_losses(out)


def test_dpo_lora_starts_at_log2(dpo_single):
    first = dpo_single[1]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-7) and first["rewards/chosen"] == 0.0
    assert dpo_single[STEPS]["rewards/margin"] != 0.0  # the adapters moved the policy off its reference
    assert all(f"task_rewards_accuracy/{t}" in r or f"task_pairs/{t}" not in r
               for r in dpo_single.values() for t in ("doctest", "docstring"))


def test_dpo_lora_micro_batch_split_invariant(dpo_single, pairs_dir, tiny_init, tmp_path):
    _run(_overrides(pairs_dir, tiny_init, tmp_path, "train.micro_batch_size=2"))
    _close(train_losses(tmp_path), dpo_single, rel=1e-6)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp2", "pp2"])
def test_dpo_lora_layouts_equal_single_process(layout, dpo_single, pairs_dir, tiny_init, tmp_path):
    _run(_overrides(pairs_dir, tiny_init, tmp_path, *layout), nproc=2)
    _close(train_losses(tmp_path), dpo_single)


def test_orpo_dp2_equals_single_process(pairs_dir, tiny_init, tmp_path):
    extra = ["train.stage=orpo", "loss.mode=task-token", "loss.preference.lambda=0.5"]
    _run(_overrides(pairs_dir, tiny_init, tmp_path / "one", *extra))
    _run(_overrides(pairs_dir, tiny_init, tmp_path / "dp2", *extra), nproc=2)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "dp2")
    _close(two, one)
    assert one[1]["nll_chosen"] > 0 and one[1]["loss"] > one[1]["nll_chosen"]  # NLL + lambda * odds-ratio term


def test_dpo_full_ft_precomputed_reference(pairs_dir, tiny_init, tmp_path):
    data = tmp_path / "pairs"  # offline: tools/preprocess --mode preference
    proc = subprocess.run([sys.executable, "tools/preprocess/preprocess_mft.py", "--data-dir", str(pairs_dir),
                           "--tokenizer-model", "examples/demo_data/tokenizer/demo_sp2048.model", "--seq-length", "512",
                           "--packing", "best-fit", "--overlong", "drop", "--mode", "preference", "--output-dir",
                           str(data), "--no-progress"], cwd=ROOT, env=env(2), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    ov = _overrides(data, tiny_init, out, "data.source=offline", "peft.method=none", "train.lr=1e-4",
                    "train.min_lr=1e-4")
    proc = _run(ov + ["train.steps=2", "train.save_interval=2"])
    files = list((data / "_reference_logps").glob("*.npz"))
    assert len(files) == 1 and "dpo reference: computed" in proc.stdout
    rec = train_losses(out)
    assert rec[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the pre-pass is the step-1 policy
    assert abs(rec[1]["rewards/chosen"]) < 1e-6 and abs(rec[2]["rewards/margin"]) > 1e-7
    proc = _run(ov + ["train.steps=3"])  # resumes step 2 -> 3 with the stored reference
    assert "dpo reference: " + str(files[0]) in proc.stdout.replace("\n", " ")
    # a different starting checkpoint has no stored reference, and a resume cannot make one
    other = tmp_path / "other_init"
    subprocess.run(["cp", "-r", str(tiny_init), str(other)], check=True)
    (next(p for p in sorted(other.rglob("*")) if p.is_file() and p.stat().st_size > 1000)).open("ab").write(b"\0")
    proc = _run([o if not o.startswith("train.init_checkpoint=") else f"train.init_checkpoint={other}" for o in ov]
                + ["train.steps=4"], check=False)
    assert proc.returncode == 2 and "a resumed run cannot recompute them" in proc.stderr, proc.stderr[-2000:]
