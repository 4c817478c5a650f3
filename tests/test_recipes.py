"""Every shipped recipe loads and validates; the cluster recipes state their GPUs and memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_mft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples").glob("*.yaml"))
CLUSTER = ["codellama34b_full.yaml", "codellama34b_lora.yaml", "codellama34b_qlora.yaml",
           "llama2_70b_qlora.yaml", "codellama34b_pretrain.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    load_config(path)  # raises ConfigError listing every problem


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_recipe_states_resources(name):
    path = ROOT / "examples" / name
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "GPUs:" in header and "GB per GPU" in header and "estimate" in header
    cfg = load_config(path)
    assert cfg.data.seq_length == 4096 and cfg.data.batching == "packed"


def test_paper_study_recipe():
    cfg = load_config(ROOT / "examples" / "codellama34b_qlora.yaml")
    assert cfg.model.preset == "codellama-34b"
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (8, 128)
    assert (cfg.train.lr, cfg.train.min_lr) == (2e-4, 1e-5)
    assert cfg.loss.mode == "task-token" and cfg.peft.method == "qlora"
    assert load_config(ROOT / "examples" / "codellama34b_pretrain.yaml").loss.mode == "token"
