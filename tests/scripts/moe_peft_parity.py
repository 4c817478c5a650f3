"""Under torchrun (2 ranks, EP=2): a LoRA model of the tiny Qwen2-MoE in ROOT/<family> (HF
folders from tests/test_moe_fixtures.py) with adapters on attention, every routed expert and the
shared expert, B drawn per global adapter name (so the values do not depend on the layout).
Each rank must hold adapters for its own experts only. Writes, per family, the logits of fixed
tokens (ROOT/<family>_logits.pt) and an adapter-only training checkpoint saved at EP=2
(ROOT/<family>_run), which the test exports and compares with transformers; that checkpoint is
read back at TP=2 + SP x EP=2 and gives the same logits. Prints one ``RESULT {json}`` line on
rank 0: family -> {trainable, local_expert_adapters, expected_local, tp2_vs_ep2, trainable_tp2}."""

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mft.compat import setup_runtime  # noqa: E402
from megatron_mft.launch.env import init_distributed, read_dist_env  # noqa: E402

FAMILIES = ("qwen2_moe",)  # routed + gated shared expert; Mixtral is checked at EP=1 in-process


def main():
    root = Path(sys.argv[1])
    env = setup_runtime()
    init_distributed(read_dist_env(), backend="gloo")

    from megatron.core import parallel_state as ps

    from megatron_mft.checkpoint.dist import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.checkpoint.hf.verify import megatron_logits
    from megatron_mft.config import ParallelConfig, PeftConfig, RunConfig
    from megatron_mft.config.base import to_dict
    from megatron_mft.model import build_model_chunks
    from megatron_mft.peft import PeftPlan, global_adapter_names
    from megatron_mft.training.parallel import init_parallel
    from test_families_fixtures import VOCAB, tokens

    parallel = ParallelConfig(ep=2)
    init_parallel(parallel, env, 0)
    results = {}
    for name in FAMILIES:
        hf = root / name
        model = dataclasses.replace(model_config_from_hf(read_hf_config(hf)), precision="fp32", hf_init=str(hf))
        peft = PeftConfig(method="lora", rank=4, alpha=8.0)
        plan = PeftPlan(peft, env, seed=3)
        chunks = build_model_chunks(model, parallel, env, layer=plan.layer_spec(model))
        load_hf_into_chunks(hf, chunks, model, parallel)
        plan.prepare(chunks)
        arch = model.arch()
        ep_rank, local = ps.get_expert_model_parallel_rank(), arch.num_experts // 2
        experts = set()
        with torch.no_grad():
            for gname, m in global_adapter_names(chunks[0]):
                seed = int.from_bytes(hashlib.sha256(gname.encode()).digest()[:8], "little") & (2**63 - 1)
                m.lora_B.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
                if ".mlp.experts." in gname:
                    experts.add(int(gname.split(".mlp.experts.")[1].split(".")[0]))
        assert experts == set(range(ep_rank * local, (ep_rank + 1) * local)), (ep_rank, experts)
        n_local = sum(1 for g, _ in global_adapter_names(chunks[0]) if ".mlp.experts." in g)
        logits = megatron_logits(chunks, tokens(), VOCAB)
        run = RunConfig(model=model, peft=peft, parallel=parallel, output_dir=str(root / f"{name}_run"))
        save_checkpoint(root / f"{name}_run" / "checkpoints", 1, chunks, None, common={"step": 1},
                        run_info={"config": to_dict(run), "peft": "lora"}, trainable_only=True)
        if torch.distributed.get_rank() == 0:
            torch.save(logits, root / f"{name}_logits.pt")
        results[name] = {"trainable": plan.counts["trainable"], "local_expert_adapters": n_local,
                         "expected_local": arch.num_layers * local * 2}

        # the same adapters read back from that checkpoint at TP=2 + SP x EP=2 (allgather
        # dispatcher): attention and shared-expert adapters TP-split, routed experts' whole
        tp2 = ParallelConfig(tp=2, sp=True, ep=2)
        init_parallel(tp2, env, 0)
        model2 = dataclasses.replace(model, moe_token_dispatcher="allgather")
        plan2 = PeftPlan(peft, env, seed=3)
        chunks2 = build_model_chunks(model2, tp2, env, layer=plan2.layer_spec(model2))
        load_hf_into_chunks(hf, chunks2, model2, tp2)
        plan2.prepare(chunks2, init_adapters=False)
        load_checkpoint(latest_checkpoint(root / f"{name}_run" / "checkpoints"), chunks2, trainable_only=True)
        logits2 = megatron_logits(chunks2, tokens(), VOCAB)
        if torch.distributed.get_rank() == 0:
            results[name]["tp2_vs_ep2"] = (logits2 - logits).abs().max().item()
            results[name]["trainable_tp2"] = plan2.counts["trainable"]
        init_parallel(parallel, env, 0)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    from megatron_mft.training.parallel import teardown

    try:
        main()
    finally:  # gloo aborts at interpreter exit if its group is left up (pytorch#190489)
        teardown()
