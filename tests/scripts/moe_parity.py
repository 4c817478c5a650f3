"""Under torchrun: every tiny MoE family model (tests/test_moe_fixtures.py) loaded through
``model.hf_init`` into each layout given on the command line (one process start for several
layouts of the same world size), its logits compared with transformers' for unpacked rows and
packed samples. A layout is ``TP:PP:SP:EP:DISPATCHER:ETP`` (SP ``sp`` or ``nosp``; ETP: expert
tensor parallelism). Rank 0 prints one ``RESULT {json}`` line (the differences measured on each
layout's first data-parallel rank of the last stage): layout -> family -> [max diff unpacked,
max diff packed]."""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mft.compat import setup_runtime  # noqa: E402
from megatron_mft.launch.env import init_distributed, read_dist_env  # noqa: E402


def run_layout(root: Path, layout: str, env) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.config import ParallelConfig
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel
    from test_families_fixtures import parity
    from test_moe_fixtures import MOE_FAMILIES

    tp, pp, sp, ep, dispatcher, etp = layout.split(":")
    tp, pp, ep, etp = int(tp), int(pp), int(ep), int(etp)
    parallel = ParallelConfig(tp=tp, pp=pp, sp=sp == "sp", ep=ep, etp=etp)
    init_parallel(parallel, env, 0)
    reporter = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank() == 0)
    results = {}
    for name in MOE_FAMILIES:
        hf_dir = root / name
        cfg = dataclasses.replace(model_config_from_hf(read_hf_config(hf_dir)), precision="fp32",
                                  moe_token_dispatcher=dispatcher)
        arch = cfg.arch()
        if (ep > 1 or etp > 1) and not arch.num_experts:
            continue  # dense Qwen3: no experts to split
        chunks = build_model_chunks(cfg, parallel, env)
        local = [m for c in chunks for m in c.modules() if type(m).__name__ == "SequentialMLP"]
        assert all(m.num_local_experts == arch.num_experts // ep for m in local), "experts not split over EP"
        fc2 = [e.linear_fc2.weight for m in local for e in m.local_experts]
        assert all(w.shape[1] == arch.expert_ffn // etp for w in fc2), "expert MLPs not split over ETP"
        load_hf_into_chunks(hf_dir, chunks, cfg, parallel)
        results[name] = parity(chunks, hf_dir, compare=reporter)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results if reporter else None)
    return next(r for r in gathered if r is not None)


def main():
    root, layouts = Path(sys.argv[1]), sys.argv[2:]
    env = setup_runtime()
    init_distributed(read_dist_env(), backend="gloo")
    out = {layout: run_layout(root, layout, env) for layout in layouts}
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    from megatron_mft.training.parallel import teardown

    try:
        main()
    finally:  # gloo aborts at interpreter exit if its group is left up (pytorch#190489)
        teardown()
