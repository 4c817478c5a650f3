"""Load a checkpoint into the current layout (single process or torchrun) and print the
per-token loss of a fixed batch as JSON: TP/PP-invariant, so layouts can be compared."""

import json
import sys

import torch

from megatron_mft.compat import setup_runtime
from megatron_mft.launch.env import init_distributed, read_dist_env


def main():
    ckpt, overrides = sys.argv[1], sys.argv[2:]
    env = setup_runtime()
    init_distributed(read_dist_env(), backend="gloo")

    from megatron_mft.checkpoint.dist import load_model_weights
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.parallel import init_parallel

    cfg = load_config("examples/tiny_cpu.yaml", ["data.path=/unused"] + overrides)
    init_parallel(cfg.parallel, env, 0)
    (model,) = build_model_chunks(cfg.model, cfg.parallel, env)
    load_model_weights(ckpt, [model])
    model.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.arch().vocab_size, (2, 64), generator=g)
    with torch.no_grad():
        ce = model(tokens, torch.arange(64).expand(2, 64), None, labels=tokens.roll(-1, 1))
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(ce.double().flatten().tolist()))


if __name__ == "__main__":
    from megatron_mft.training.parallel import teardown

    try:
        main()
    finally:  # gloo aborts at interpreter exit if its group is left up (pytorch#190489)
        teardown()
