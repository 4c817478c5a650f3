"""Under torchrun: every tiny family model (tests/test_families_fixtures.py) loaded through
``model.hf_init`` into the layout given on the command line (TP, PP, SP), its logits compared with
transformers' for unpacked rows and packed samples. Prints one ``RESULT {json}`` line (rank 0 of
the last stage): family -> [max diff unpacked, max diff packed]."""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mft.compat import setup_runtime  # noqa: E402
from megatron_mft.launch.env import init_distributed, read_dist_env  # noqa: E402


def main():
    root, tp, pp, sp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "sp"
    env = setup_runtime()
    init_distributed(read_dist_env(), backend="gloo")

    from megatron.core import parallel_state as ps

    from megatron_mft.checkpoint.hf import load_hf_into_chunks
    from megatron_mft.checkpoint.hf.hfconfig import model_config_from_hf, read_hf_config
    from megatron_mft.config import ParallelConfig
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel
    from test_families_fixtures import FAMILIES, parity

    parallel = ParallelConfig(tp=tp, pp=pp, sp=sp)
    init_parallel(parallel, env, 0)
    reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    results = {}
    for name in FAMILIES:
        hf_dir = root / name
        cfg = dataclasses.replace(model_config_from_hf(read_hf_config(hf_dir)), precision="fp32")
        chunks = build_model_chunks(cfg, parallel, env)
        load_hf_into_chunks(hf_dir, chunks, cfg, parallel)
        results[name] = parity(chunks, hf_dir, compare=reporter)
    if reporter:
        print("RESULT " + json.dumps(results), flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    from megatron_mft.training.parallel import teardown

    try:
        main()
    finally:  # gloo aborts at interpreter exit if its group is left up (pytorch#190489)
        teardown()
