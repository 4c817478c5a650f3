"""``convert hf-to-mcore`` streams: converting a ~130 MB checkpoint in ~30 shards raises the
converter's peak RSS above that of a ``--dry-run`` (same imports, config, headers and model
template, no tensor data) by about the largest tensor, not by the model size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_hf_fixtures import ROOT

# Peak RSS of one child, measured in a wrapper process so other children of pytest don't count.
_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
            "sys.stderr.write(r.stderr[-4000:] if r.returncode else '')")


def _peak_rss_bytes(*args: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "megatron_mft.convert", *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    kb, rc = run.stdout.split()
    assert rc == "0", run.stderr
    return int(kb) * 1024


def _write_model(out: Path) -> tuple[int, int]:
    """Random fp32 Llama weights written shard by shard (never the whole model in this process);
    returns (total bytes, largest tensor bytes)."""
    from megatron_mft.checkpoint.hf.families import LLAMA
    from megatron_mft.checkpoint.hf.hf_io import SafetensorsShardWriter
    from megatron_mft.config import ArchSpec

    arch = ArchSpec(num_layers=8, hidden_size=512, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=1536,
                    vocab_size=8000, max_position_embeddings=256, rotary_base=1e6, norm_epsilon=1e-5)
    items = [(n, s, torch.float32) for w, layer in LLAMA.entries(arch) for n, s in zip(w.hf_names(layer), w.hf_shapes(arch))]
    out.mkdir()
    writer = SafetensorsShardWriter(out, items, max_shard_bytes=5_000_000)
    g = torch.Generator().manual_seed(0)
    for name, shape, _ in items:
        writer.write(name, 0.02 * torch.randn(shape, generator=g))
    assert len(writer.close()) >= 25
    (out / "config.json").write_text(json.dumps(LLAMA.hf_config(arch, "float32")))
    sizes = [torch.Size(s).numel() * 4 for _, s, _ in items]
    return sum(sizes), max(sizes)


def test_peak_memory_stays_near_the_largest_tensor(tmp_path):
    total, largest = _write_model(tmp_path / "hf")
    base = _peak_rss_bytes("hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), "--dry-run")
    peak = _peak_rss_bytes("hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    extra = peak - base
    print(f"model {total / 1e6:.0f} MB in shards, largest tensor {largest / 1e6:.1f} MB; converter peak RSS "
          f"{peak / 1e6:.0f} MB vs dry run {base / 1e6:.0f} MB: +{extra / 1e6:.1f} MB")
    assert (tmp_path / "ckpt" / "__0_0.distcp").stat().st_size > total  # everything was written
    assert extra < 2.5 * largest, f"+{extra / 1e6:.1f} MB is not near the largest tensor ({largest / 1e6:.1f} MB)"
    assert extra < 0.25 * total
