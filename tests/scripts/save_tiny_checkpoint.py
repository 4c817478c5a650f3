"""Save a tiny 2-layer model (seeded, so identical every time) as checkpoint step N of a
checkpoints folder: ``python save_tiny_checkpoint.py ROOT STEP SEED``. The reliability tests
run it under the fault hook (MFT_FAULT_SLEEP_IN_SAVE) and SIGKILL it mid-save."""

import sys

from megatron_mft.checkpoint.dist import save_checkpoint
from megatron_mft.compat import setup_runtime
from megatron_mft.config import load_config
from megatron_mft.model import build_model_chunks
from megatron_mft.training.parallel import init_parallel, teardown


def main() -> None:  # a guard: megatron's writer starts a spawn-context manager that re-imports this file
    root, step, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2"])
    env = setup_runtime()
    init_parallel(cfg.parallel, env, seed)
    chunks = build_model_chunks(cfg.model, cfg.parallel, env)
    save_checkpoint(root, step, chunks, common={"step": step}, run_info={"seed": seed})
    print("saved", flush=True)
    teardown()


if __name__ == "__main__":
    main()
