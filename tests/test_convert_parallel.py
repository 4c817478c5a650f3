"""``convert verify`` across processes (it spawns its ranks: gloo on 127.0.0.1): megatron's
logits equal transformers' at TP=2 (checkpoint path; vocabulary 251 padded to 252 for TP=2) and
at PP=2 (``model.hf_init`` path: load_hf_into_chunks slicing each stage's layers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_hf_fixtures import make_hf_model, run_cli

TOL = "1e-4"


@pytest.fixture(scope="module")
def odd_vocab(tp1_env, tmp_path_factory) -> tuple[Path, Path]:
    """HF model with vocabulary 251 (odd: megatron pads it for TP=2) and its converted checkpoint."""
    from megatron_mft.checkpoint.hf.hf_to_mcore import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("odd")
    hf = make_hf_model(root / "hf", seed=2, vocab_size=251)
    convert_hf_to_mcore(hf, root / "ckpt", log=lambda s: None)
    return hf, root / "ckpt"


def _diff(run) -> float:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    m = re.search(r"max abs logit difference: (\S+) \(tol", run.stdout)
    assert m, run.stdout
    return float(m.group(1))


def test_verify_tp2_from_checkpoint(odd_vocab):
    hf, ckpt = odd_vocab
    run = run_cli("verify", "--hf-dir", str(hf), "--ckpt", str(ckpt), "--tp", "2", "--tol", TOL, "--seq", "32")
    assert "tp=2 pp=1" in run.stdout and _diff(run) <= float(TOL)


def test_verify_pp2_from_hf_init(odd_vocab):
    hf, _ = odd_vocab
    run = run_cli("verify", "--hf-dir", str(hf), "--pp", "2", "--tol", TOL, "--seq", "32")
    assert "hf_init from" in run.stdout and "tp=1 pp=2" in run.stdout and _diff(run) <= float(TOL)
