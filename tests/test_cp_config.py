"""parallel.cp / parallel.cp_comm_type: layout rules at load time, all errors at once."""

import pytest

from megatron_mft.config import ConfigError, load_config


def test_cp_layout_rules_name_the_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=/x", "parallel.cp=0"])
    assert "parallel.cp: must be >= 1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=/x", "model.preset=tiny", "data.seq_length=102", "parallel.cp=2"])
    assert "parallel.cp: data.seq_length 102 not divisible by 2 x cp = 4" in str(e.value)
    with pytest.raises(ConfigError) as e:  # with SP the CP shard is split again over TP
        load_config(None, ["data.path=/x", "model.preset=tiny", "data.seq_length=516", "parallel.cp=2", "parallel.tp=2", "parallel.sp=true"])
    assert "2 x cp x tp = 8" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=/x", "parallel.cp_comm_type=ring"])
    assert "parallel.cp_comm_type" in str(e.value)
    cfg = load_config(None, ["data.path=/x", "model.preset=tiny", "data.seq_length=512", "parallel.cp=4", "parallel.cp_comm_type=a2a"])
    assert (cfg.parallel.cp, cfg.parallel.cp_comm_type) == (4, "a2a")
    assert load_config(None, ["data.path=/x"]).parallel.cp == 1


def test_world_layout_rules_count_cp_and_ep():
    """One rule for preflight and init_parallel: DP = world / (tp pp cp); EP needs world % (etp ep pp)."""
    from megatron_mft.config import ParallelConfig, load_config
    from megatron_mft.training.preflight import _layout_problems

    par = ParallelConfig(cp=2)
    assert par.world_problems(2) == [] and par.data_parallel_size(2) == 1
    assert "parallel.tp x parallel.pp x parallel.cp = 1 x 1 x 4 needs a multiple of 4" in ParallelConfig(
        cp=4).world_problems(2)[0]
    assert "parallel.etp x parallel.ep x parallel.pp = 1 x 4 x 1" in ParallelConfig(ep=4).world_problems(2)[0]
    run = load_config(None, ["data.path=/unused", "parallel.cp=2", "train.global_batch_size=3",
                             "train.micro_batch_size=1"])
    assert _layout_problems(run, world_size=2) == []  # dp = 1: any batch size works
    run4 = load_config(None, ["data.path=/unused", "parallel.cp=4"])
    assert "needs a multiple of 4 processes" in _layout_problems(run4, world_size=2)[0]


def test_memory_estimate_counts_context_parallelism():
    """Per rank: activations and logits of s/cp tokens, Adam sharded over DP x CP, weights and
    adapter grads unchanged; the all-gather-KV path adds the whole sequence's K and V (bf16) for
    one layer under full recompute, for every layer without recompute."""
    from megatron_mft.config import PRESETS
    from megatron_mft.peft.memory import estimate_memory

    arch, s, tp = PRESETS["codellama-34b"], 32768, 4
    kv_bytes = 2 * arch.num_attention_heads * arch.head_dim / tp * s * 2  # whole-sequence K and V per query head, bf16
    for recompute, layers in (("full", 1), ("none", arch.num_layers)):
        kw = dict(method="lora", rank=64, tp=tp, sp=True, seq_length=s, recompute=recompute)
        one, two = estimate_memory(arch, **kw), estimate_memory(arch, **kw, cp=2)
        gathered = estimate_memory(arch, **kw, cp=2, cp_gathered_kv=True)
        assert two.activations == pytest.approx(one.activations / 2) and two.logits == pytest.approx(one.logits / 2)
        assert two.optimizer == pytest.approx(one.optimizer / 2)
        assert (two.base_weights, two.adapters, two.grads) == (one.base_weights, one.adapters, one.grads)
        assert gathered.activations - two.activations == pytest.approx(kv_bytes * layers)
