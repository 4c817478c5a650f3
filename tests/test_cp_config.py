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
