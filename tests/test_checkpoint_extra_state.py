"""Checkpoints move between models whose modules carry ``_extra_state`` and models whose modules
do not, both ways, with the same weights.

On a GPU the Transformer Engine spec's core attention (``TEDotProductAttention``) and final norm
(TE's ``RMSNorm``) define ``get_extra_state``, so the TE model's sharded state dict asks for
``..._extra_state`` entries that checkpoints written by the local spec (CPU runs, ``convert
hf-to-mcore``) do not hold, and megatron's dist-checkpoint load fails on them. TE cannot run
here, so the model with extra state is the local model with those two slots swapped for
subclasses that carry extra state the way TE's modules do.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mft.model.attention import PackedCoreAttention
from megatron_mft.model.norm import RMSNorm


class _ExtraState:
    """TE-style extra state: serialized bytes in a uint8 tensor, restored on load."""

    def get_extra_state(self):
        return torch.tensor(list(b"fp8-meta"), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded_extra_state = bytes(state.tolist()) if torch.is_tensor(state) else state


class ExtraStateAttention(_ExtraState, PackedCoreAttention):
    pass


class ExtraStateNorm(_ExtraState, RMSNorm):
    pass


def _build(tp1_env, monkeypatch, extra: bool, seed: int):
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks, layer_spec
    from megatron_mft.model import specs
    from megatron_mft.training.parallel import init_parallel

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2"])
    init_parallel(cfg.parallel, tp1_env, seed=seed)
    layer = layer_spec("sdpa")
    if extra:
        layer.submodules.self_attention.submodules.core_attention.module = ExtraStateAttention
        monkeypatch.setitem(specs.NORMS, "RMSNorm", ExtraStateNorm)  # the final norm
    chunks = build_model_chunks(cfg.model, cfg.parallel, tp1_env, layer=layer)
    monkeypatch.undo()
    keys = [k for k in chunks[0].sharded_state_dict() if k.endswith("_extra_state")]
    has = any("core_attention" in k for k in keys) and any("final_layernorm" in k for k in keys)
    assert has == extra, keys
    return chunks


def _weights(chunks) -> dict:
    return {k: v.detach().clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("direction", ["local->extra", "extra->local"])
@pytest.mark.parametrize("loader", ["init_checkpoint", "resume"])
def test_extra_state_checkpoint_interop(tp1_env, monkeypatch, tmp_path, direction, loader):
    from megatron_mft.checkpoint.dist import load_checkpoint, load_model_weights, save_checkpoint

    src_extra = direction == "extra->local"
    src = _build(tp1_env, monkeypatch, extra=src_extra, seed=1)
    path = save_checkpoint(tmp_path, 1, src, common={"step": 1}, run_info={})
    dst = _build(tp1_env, monkeypatch, extra=not src_extra, seed=2)
    want, before = _weights(src), _weights(dst)
    assert any(not torch.equal(want[k], before[k]) for k in want)  # different seeds: a load must change them
    if loader == "init_checkpoint":
        load_model_weights(path, dst)
    else:
        assert load_checkpoint(path, dst)["step"] == 1
    got = _weights(dst)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if src_extra is False:  # nothing to restore: the modules keep their own extra state
        assert not hasattr(dst[0].decoder.final_layernorm, "loaded_extra_state")


def test_missing_weight_still_fails(tp1_env, monkeypatch, tmp_path):
    """Tolerating absent extra state does not tolerate an absent weight."""
    from megatron_mft.checkpoint.dist import load_model_weights, model_sharded_state_dict
    from megatron.core import dist_checkpointing

    src = _build(tp1_env, monkeypatch, extra=False, seed=1)
    sd = model_sharded_state_dict(src)
    del sd["model"]["decoder.final_layernorm.weight"]
    dist_checkpointing.save(sd, str(tmp_path))
    dst = _build(tp1_env, monkeypatch, extra=False, seed=2)
    with pytest.raises(Exception, match="decoder.final_layernorm.weight"):
        load_model_weights(tmp_path, dst)
