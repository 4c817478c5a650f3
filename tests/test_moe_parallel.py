"""MoE families across processes (torchrun, gloo): megatron's logits equal transformers' for the
tiny Mixtral, Qwen2-MoE and Qwen3-MoE models with the experts split over two expert-parallel
ranks, through megatron's alltoall token dispatcher; with TP=2 + sequence parallelism combined
with EP=2 through the allgather dispatcher, and with expert tensor parallelism (TP=2 + SP, each
expert's MLP split over the two ranks: ETP=2); and at PP=2 (with dense Qwen3). Weights through
``model.hf_init``, unpacked rows and packed samples; every torchrun runs all families."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_families_fixtures import TOL
from test_moe_fixtures import make_all_moe
from train_helpers import ROOT, env, torchrun

EXPERT_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    make_all_moe(root)
    return root


#: one torchrun per group (TP:PP:SP:EP:DISPATCHER:ETP); TP=2 with the experts whole (ETP=1) and EP=2,
#: and with each expert's MLP split over the TP ranks too (ETP=2), share a process start
LAYOUT_GROUPS = [["1:1:nosp:2:alltoall:1"], ["2:1:sp:2:allgather:1", "2:1:sp:1:alltoall:2"], ["1:2:nosp:1:alltoall:1"]]


@pytest.mark.slow
@pytest.mark.parametrize("layouts", LAYOUT_GROUPS, ids=["ep2", "tp2_ep2_and_tp2_etp2", "pp2"])
def test_every_moe_family_matches_transformers_in_layout(moe_models, layouts):
    cmd = torchrun(2) + [str(ROOT / "tests" / "scripts" / "moe_parity.py"), str(moe_models), *layouts]
    run = subprocess.run(cmd, cwd=ROOT, env=env(threads=1), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert sorted(results) == sorted(layouts)
    for layout, by_family in results.items():
        ep, etp = int(layout.split(":")[3]), int(layout.split(":")[5])
        assert sorted(by_family) == sorted(EXPERT_FAMILIES + ([] if ep > 1 or etp > 1 else ["qwen3"])), layout
        for name, (rows, packed) in by_family.items():
            assert rows <= TOL and packed <= TOL, (name, layout, rows, packed)


@pytest.mark.slow
def test_convert_checks_and_verifies_expert_parallel_layouts(moe_models, tmp_path):
    """``convert hf-to-mcore --ep`` refuses a size that does not divide the experts, by name; the
    converted checkpoint (one global layout) loads at EP=2 in ``convert verify --ep 2``."""
    base = [sys.executable, "-m", "megatron_mft.convert"]
    bad = subprocess.run(base + ["hf-to-mcore", "--hf-dir", str(moe_models / "mixtral"), "--ep", "3", "--out",
                                 str(tmp_path / "bad")], cwd=ROOT, env=env(threads=1), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--ep: 3 does not divide num_experts 4" in bad.stderr, bad.stderr[-2000:]
    conv = subprocess.run(base + ["hf-to-mcore", "--hf-dir", str(moe_models / "qwen2_moe"), "--ep", "2", "--out",
                                  str(tmp_path / "ckpt")], cwd=ROOT, env=env(threads=1), capture_output=True,
                          text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-3000:]
    ver = subprocess.run(base + ["verify", "--hf-dir", str(moe_models / "qwen2_moe"), "--ckpt", str(tmp_path / "ckpt"),
                                 "--ep", "2", "--tol", "1e-4"], cwd=ROOT, env=env(threads=1), capture_output=True,
                         text=True, timeout=600)
    assert ver.returncode == 0 and "-> OK" in ver.stdout, ver.stdout[-2000:] + ver.stderr[-3000:]
