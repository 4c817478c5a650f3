"""MoE configuration rules, checked when the config is loaded (all problems at once, each naming
its key), and the TransformerConfig the builder derives for megatron's MoE layer."""

import pytest

from megatron_mft.config import ConfigError, load_config

TINY_MOE = ["data.path=/unused", "model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=64"]


def test_layout_rules_name_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, TINY_MOE + ["parallel.ep=3", "parallel.etp=3", "parallel.tp=2"])
    msg = str(e.value)
    for needle in ("parallel.ep: 3 does not divide num_experts 4", "parallel.etp: 3 does not divide the expert "
                   "hidden size 64", "parallel.sp: megatron's MoE layers with parallel.tp > 1 need parallel.sp"):
        assert needle in msg, msg
    with pytest.raises(ConfigError) as e:
        load_config(None, TINY_MOE + ["model.moe_capacity_factor=0", "model.moe_aux_loss_coeff=-1"])
    assert "model.moe_capacity_factor" in str(e.value) and "model.moe_aux_loss_coeff" in str(e.value)


def test_expert_tensor_parallelism_rules():
    """ETP needs experts and, as megatron's MoE layer asserts at build time, no linear biases."""
    with pytest.raises(ConfigError, match=r"parallel.etp: expert parallelism \(parallel.etp=2\) needs a "
                       "mixture-of-experts model"):
        load_config(None, ["data.path=/unused", "parallel.etp=2"])
    with pytest.raises(ConfigError) as e:
        load_config(None, TINY_MOE + ["model.linear_bias=true", "parallel.etp=2", "parallel.tp=2", "parallel.sp=true"])
    assert "parallel.etp: 2 with linear biases (model.linear_bias): megatron's MoE layer supports biases only at " \
        "parallel.etp: 1" in str(e.value)
    run = load_config(None, TINY_MOE + ["parallel.etp=2", "parallel.tp=2", "parallel.sp=true"])
    assert run.parallel.expert_tp == 2 and not run.parallel.world_problems(2)
    assert "parallel.etp x parallel.ep x parallel.pp = 2 x 1 x 1 needs a multiple of 2 processes" in (
        " ".join(run.parallel.world_problems(1)))


def test_expert_parallelism_needs_experts_and_sane_routing():
    with pytest.raises(ConfigError, match="parallel.ep: expert parallelism .* needs a mixture-of-experts model"):
        load_config(None, ["data.path=/unused", "parallel.ep=2"])
    with pytest.raises(ConfigError, match="moe_top_k: 5 must be between 1 and num_experts 4"):
        load_config(None, TINY_MOE + ["model.moe_top_k=5"])
    with pytest.raises(ConfigError, match="a shared expert needs num_experts > 0"):
        load_config(None, ["data.path=/unused", "model.moe_shared_expert_size=32"])
    # LoRA on experts (docs/moe.md) needs expert TP 1; attention-only adapters do not care
    with pytest.raises(ConfigError, match="parallel.etp: 2 with peft.method lora on expert linears"):
        load_config(None, TINY_MOE + ["peft.method=lora", "parallel.etp=2", "parallel.ep=2"])
    load_config(None, TINY_MOE + ["peft.method=lora", "parallel.etp=2", "parallel.ep=2",
                                  "peft.target_modules=[linear_qkv]"])
    load_config(None, TINY_MOE + ["peft.method=qlora"])


def test_transformer_config_of_each_routing_style():
    from megatron_mft.compat import Environment
    from megatron_mft.model.builder import transformer_config

    cpu = Environment(cuda=False, te=False, flash_attn=False, apex=False, device_name="cpu")
    run = load_config(None, TINY_MOE + ["parallel.ep=2", "model.moe_aux_loss_coeff=0.01",
                                        "model.moe_capacity_factor=1.5", "model.moe_token_dispatcher=allgather"])
    cfg = transformer_config(run.model.arch(), run.model, run.parallel, cpu)
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (4, 2, 64)
    assert (cfg.expert_model_parallel_size, cfg.moe_token_dispatcher_type) == (2, "allgather")
    assert (cfg.moe_router_load_balancing_type, cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff) == (
        "aux_loss", 0.01, None)
    assert cfg.moe_expert_capacity_factor == 1.5 and not cfg.moe_router_pre_softmax and not cfg.moe_grouped_gemm
    off = load_config(None, TINY_MOE + ["model.moe_norm_topk=false"])
    cfg = transformer_config(off.model.arch(), off.model, off.parallel, cpu)
    # Qwen2-MoE style (no renormalisation): softmax over all experts, then top-k
    assert cfg.moe_router_pre_softmax and cfg.moe_router_load_balancing_type == "none"
    assert cfg.moe_expert_capacity_factor is None  # token dropping off by default
