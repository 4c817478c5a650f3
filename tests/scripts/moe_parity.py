"""Under torchrun: every tiny MoE family model (tests/test_moe_fixtures.py) loaded through
``model.hf_init`` into the layout given on the command line (TP, PP, SP, EP, token dispatcher),
its logits compared with transformers' for unpacked rows and packed samples. Prints one
``RESULT {json}`` line (the first data-parallel rank of the last stage): family -> [max diff
unpacked, max diff packed]."""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mft.compat import setup_runtime  # noqa: E402
from megatron_mft.launch.env import init_distributed, read_dist_env  # noqa: E402


def main():
    root, tp, pp, sp, ep, dispatcher = (Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "sp",
                                        int(sys.argv[5]), sys.argv[6])
    env = setup_runtime()
    init_distributed(read_dist_env(), backend="gloo")

    from megatron.core import parallel_state as ps

    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.config import ParallelConfig
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel
    from test_families_fixtures import parity
    from test_moe_fixtures import MOE_FAMILIES

    parallel = ParallelConfig(tp=tp, pp=pp, sp=sp, ep=ep)
    init_parallel(parallel, env, 0)
    reporter = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank() == 0)
    results = {}
    for name in MOE_FAMILIES:
        hf_dir = root / name
        cfg = dataclasses.replace(model_config_from_hf(read_hf_config(hf_dir)), precision="fp32",
                                  moe_token_dispatcher=dispatcher)
        if ep > 1 and not cfg.arch().num_experts:
            continue  # dense Qwen3: no experts to split
        chunks = build_model_chunks(cfg, parallel, env)
        local = [m for c in chunks for m in c.modules() if type(m).__name__ == "SequentialMLP"]
        assert all(m.num_local_experts == cfg.arch().num_experts // ep for m in local), "experts not split over EP"
        load_hf_into_chunks(hf_dir, chunks, cfg, parallel)
        results[name] = parity(chunks, hf_dir, compare=reporter)
    if reporter:
        print("RESULT " + json.dumps(results), flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
