"""MoE families across processes (torchrun, gloo): megatron's logits equal transformers' for the
tiny Mixtral, Qwen2-MoE and Qwen3-MoE models with the experts split over two expert-parallel
ranks, through megatron's alltoall token dispatcher, and with TP=2 + sequence parallelism
combined with EP=2 through the allgather dispatcher (weights through ``model.hf_init``,
unpacked rows and packed samples). One torchrun per layout runs all families."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_families_fixtures import TOL
from test_moe_fixtures import make_all_moe
from train_helpers import ROOT, env, free_port

EXPERT_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    make_all_moe(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("tp, sp, ep, dispatcher", [(1, "nosp", 2, "alltoall"), (2, "sp", 2, "allgather")])
def test_every_moe_family_matches_transformers_with_expert_parallelism(moe_models, tp, sp, ep, dispatcher):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "scripts" / "moe_parity.py"), str(moe_models), str(tp), "1", sp, str(ep), dispatcher]
    run = subprocess.run(cmd, cwd=ROOT, env=env(threads=1), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert sorted(results) == sorted(EXPERT_FAMILIES)
    for name, (rows, packed) in results.items():
        assert rows <= TOL and packed <= TOL, (name, tp, ep, rows, packed)
