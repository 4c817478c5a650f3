"""Model families across processes (torchrun, gloo): megatron's logits equal transformers' for
every family's tiny model at TP=2 with sequence parallelism and at PP=2 (weights through
``model.hf_init``, tied embeddings split across stages), unpacked rows and packed samples. One
torchrun per layout runs all families."""

from __future__ import annotations

import json
import subprocess

import pytest

from test_families_fixtures import FAMILIES, TOL, make_all
from train_helpers import ROOT, env, torchrun


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    make_all(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, sp", [(2, 1, "sp"), (1, 2, "nosp")])
def test_every_family_matches_transformers_in_layout(family_models, tp, pp, sp):
    cmd = torchrun(2) + [str(ROOT / "tests" / "scripts" / "families_parity.py"), str(family_models), str(tp), str(pp), sp]
    run = subprocess.run(cmd, cwd=ROOT, env=env(threads=1), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert sorted(results) == sorted(FAMILIES)
    for name, (rows, packed) in results.items():
        assert rows <= TOL and packed <= TOL, (name, tp, pp, rows, packed)
